"""Rehearse a pod job on one machine: N processes of `python -m r1jax.main`, each with its own fake CPU devices.

    python -m r1jax.launch_local --processes 2 --devices-per-process 4 -- \
        --config configs/sft.py:tiny --workdir /tmp/sft_2x4

Every process gets `JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT` (a free port), `JAX_NUM_PROCESSES=N`,
`JAX_PROCESS_ID=i`, `JAX_PLATFORMS=cpu` and `XLA_FLAGS=--xla_force_host_platform_device_count=D`, which
r1jax/distributed.py hands to `jax.distributed.initialize`: the same code path as the hosts of a TPU slice
(a global mesh over N x D devices, per-process data shards, orbax's multi-process checkpoints, process-0-only
logs, the preemption sync), with gloo for the collectives.

The launcher prefixes each line of output with `[i]`, forwards SIGTERM / SIGINT to every process (so they save a
checkpoint at the same step and end as preempted), stops the group when one process fails (the others would
otherwise wait in a collective until the coordinator's heartbeat timeout), kills what is still running
`--grace` seconds after a stop, and with `--timeout` stops the whole group after that many seconds. Each process
dies with the launcher (PR_SET_PDEATHSIG on Linux). The exit code is the group's: 0 when every process exited 0,
else the first failure's (128 + signal number for a process killed by a signal).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, processes: int, devices: int, port: int) -> dict[str, str]:
    """The environment of process `process_id`: the JAX_* variables, CPU, and `devices` fake devices (replacing
    any device count already in XLA_FLAGS, keeping its other flags)."""
    flags = re.sub(rf"{DEVICE_FLAG}=\S+", "", base.get("XLA_FLAGS", "")).split()
    return {**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
            "JAX_PROCESS_ID": str(process_id), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": " ".join([*flags, f"{DEVICE_FLAG}={devices}"])}


def _die_with_launcher() -> None:  # runs in the child between fork and exec: the launcher has no threads yet
    if sys.platform == "linux":
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _relay(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode("utf-8", "replace"))
        out.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Group:
    """N processes of `command` started together, each with its JAX_* environment; `wait` returns the group's
    exit code."""

    def __init__(self, command: Sequence[str], *, processes: int, devices: int, out=None, env=None):
        out = sys.stdout if out is None else out
        port = free_port()
        base = dict(os.environ if env is None else env)
        # Own session: a terminal's Ctrl-C reaches the launcher once, which forwards it once to each process.
        self.procs = [subprocess.Popen(
            list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=process_env(base, process_id=i, processes=processes, devices=devices, port=port),
            preexec_fn=_die_with_launcher, start_new_session=True) for i in range(processes)]
        self._relays = [threading.Thread(target=_relay, args=(p.stdout, f"[{i}] ", out), daemon=True)
                        for i, p in enumerate(self.procs)]
        for t in self._relays:
            t.start()

    def signal(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def kill_after(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while any([p.poll() is None for p in self.procs]) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, *, timeout_s: float = 0.0, grace_s: float = 60.0, poll_s: float = 0.1) -> int:
        """Until every process has exited. The first failure stops the others (SIGTERM, then SIGKILL after
        grace_s); so does timeout_s > 0 running out (exit code 124)."""
        start, code = time.monotonic(), None
        while any([p.poll() is None for p in self.procs]):  # a list: poll every process, not up to the first
            failed = [p.returncode for p in self.procs if p.returncode not in (None, 0)]
            if failed and code is None:
                code = _exit_code(failed[0])
                print(f"[launch_local] a process exited with {code}: stopping the group", file=sys.stderr)
                self.signal(signal.SIGTERM)
                self.kill_after(grace_s)
                break
            if timeout_s and time.monotonic() - start > timeout_s:
                code = 124
                print(f"[launch_local] --timeout {timeout_s:g}s reached: stopping the group", file=sys.stderr)
                self.signal(signal.SIGTERM)
                self.kill_after(grace_s)
                break
            time.sleep(poll_s)
        for t in self._relays:
            t.join(timeout=5.0)
        if code is None:
            code = next((_exit_code(p.returncode) for p in self.procs if p.returncode), 0)
        return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1jax.launch_local", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --processes N --devices-per-process D [options] -- MAIN_ARGS")
    parser.add_argument("--processes", type=int, required=True, help="processes (the hosts of the rehearsed job)")
    parser.add_argument("--devices-per-process", type=int, required=True, help="fake CPU devices per process")
    parser.add_argument("--timeout", type=float, default=0.0, help="stop the group after this many seconds (0: no limit)")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds between SIGTERM and SIGKILL when the group is stopped")
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help="after --: the arguments of python -m r1jax.main")
    args = parser.parse_args(argv)
    main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be >= 1")
    if not main_args:
        parser.error("give the arguments of python -m r1jax.main after --, e.g. -- --config configs/sft.py:tiny "
                     "--workdir /tmp/run")
    group = Group([sys.executable, "-m", "r1jax.main", *main_args], processes=args.processes,
                  devices=args.devices_per_process)

    def forward(signum, frame):
        group.signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    return group.wait(timeout_s=args.timeout, grace_s=args.grace)


if __name__ == "__main__":
    sys.exit(main())
