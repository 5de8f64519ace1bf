"""One pipeline stage in a child process: how a pipeline with `config.parallel > 1` runs stages side by side.

    python -m r1jax.stages.child STAGE_DIR PIPELINE_PID      (the resolved stage config arrives pickled on stdin)

r1jax/stages/pipeline.py starts a child with `start` and reaps whichever ends first with `wait_any`, which also
gives the child's own wall and CPU seconds. A child writes its stdout and stderr to STAGE_DIR/stage.log and runs
the stage exactly as the pipeline's own process would (`r1jax.stages.run`: config.json, result.json). It dies
with the pipeline (PR_SET_PDEATHSIG): a killed pipeline leaves no stage writing to its directories, and a rerun
resumes the stage from its checkpoints. `terminate` forwards a SIGTERM, so that running stages checkpoint first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import subprocess
import sys
import time

LOG_NAME = "stage.log"


@dataclasses.dataclass
class Child:
    name: str
    stage_dir: str
    proc: subprocess.Popen
    started: float

    @property
    def log_path(self) -> str:
        return os.path.join(self.stage_dir, LOG_NAME)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the pipeline process exits (Linux; set here rather than between fork and exec,
    where a multithreaded parent must not run Python), and exit now if it already has."""
    if sys.platform == "linux":
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit(f"the pipeline process {parent} is gone")


def start(name: str, config: dict, stage_dir: str, env: dict[str, str] | None = None) -> Child:
    """Starts stage `name` (its resolved config as a dict) in `stage_dir`; returns at once."""
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, LOG_NAME), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "r1jax.stages.child", stage_dir, str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    proc.stdin.write(pickle.dumps(config))
    proc.stdin.close()
    return Child(name, stage_dir, proc, time.time())


def wait_any(children: dict[str, Child], poll_s: float = 0.2) -> tuple[Child, int, float, float]:
    """Blocks until one of `children` exits: (child, exit code, wall seconds, CPU seconds user + system)."""
    while True:
        for child in children.values():
            pid, status, usage = os.wait4(child.proc.pid, os.WNOHANG)
            if pid:
                child.proc.returncode = os.waitstatus_to_exitcode(status)
                return (child, child.proc.returncode, time.time() - child.started,
                        usage.ru_utime + usage.ru_stime)
        time.sleep(poll_s)


def terminate(children: dict[str, Child]) -> None:
    """SIGTERM to every running child: its stage saves a checkpoint after the current step and ends as preempted."""
    for child in children.values():
        if child.proc.returncode is None:
            child.proc.send_signal(signal.SIGTERM)


def stop_all(children: dict[str, Child], timeout_s: float = 300.0) -> None:
    """`terminate`, then wait for every child (SIGKILL after `timeout_s`): no stage outlives a pipeline that stops."""
    terminate(children)
    deadline = time.time() + timeout_s
    for child in children.values():
        try:
            child.proc.wait(max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


def main(stage_dir: str, parent: int) -> None:
    _die_with_parent(parent)
    from r1jax.host import ensure_malloc_tunables

    ensure_malloc_tunables()
    import ml_collections as mlc

    config = mlc.ConfigDict(pickle.load(sys.stdin.buffer))
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s%(asctime)s %(name)s] %(message)s")
    logging.getLogger("r1jax").setLevel(logging.INFO)
    from r1jax import stages

    stages.run(config, stage_dir)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m r1jax.stages.child STAGE_DIR PIPELINE_PID  (the stage config pickled on "
                         "stdin)")
    main(sys.argv[1], int(sys.argv[2]))
