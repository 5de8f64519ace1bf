"""Runs untrusted, model-written Python in a throwaway, locked-down child process and judges it
from outside the program's reach.

Why: the R1 recipe's rule rewards include "code run against tests" (docs/reference.md §4, step 1),
so the trainer executes whatever the policy writes, and a policy under RL pressure will find any
shortcut: exiting early with status 0, printing what a checker looks for, rewriting the harness's
builtins, or returning an object that equals everything.

Each run is a fresh `python -I -S -X utf8 _child.py` (no PYTHON* variables, no site-packages: the
standard library only, as on a judge) with an empty environment and its own session. Before any
untrusted line, `_child.py` sets up:

1. Namespaces (`unshare`): network (a downed loopback only), PID, mount and IPC; as a non-root
   trainer, through a user namespace first, where the kernel allows unprivileged ones.
2. A minimal root (pivot_root): read-only binds of /usr, /bin, /lib* and the interpreter's
   prefixes, /dev/{null,zero,full,random,urandom}, a fresh /proc, and a size-capped tmpfs on
   /tmp (also /var/tmp and /dev/shm; the working directory is /tmp/work). No host unix socket,
   FIFO, /run, /sys, /etc or /home exists in it: path-based host IPC has nothing to open.
3. A fresh session keyring (KEYCTL_JOIN_SESSION_KEYRING): the trainer's keys are out of reach.
4. Two processes: the evaluator (PID 1 of the namespace; as root, a second fresh uid; never
   dumpable: no ptrace, no /proc/1/mem; the kernel drops SIGKILL sent to a namespace's init from
   inside) and the program's process forked from it, which joins the run's memory cgroup, sets rlimits
   (CPU, address space, processes, open files, file size, no message queues, no core), becomes a
   fresh uid/gid drawn per run from [2**24, 2**25) when the trainer is root (in a user namespace:
   drops all capabilities), sets PR_SET_NO_NEW_PRIVS and loads the syscall filter (_seccomp.py:
   no memfd, SysV IPC, new namespaces, mounts, keyrings, ptrace, io_uring, AF_UNIX sockets).
5. The host kills the whole process group on timeout or when stdout/stderr passes its cap (read
   incrementally, never buffered past the cap), reads the cgroup's peak, removes cgroup and files.

The verdict. The program's process never holds the test, the expected values or the verdict: the
test is read by the evaluator only after the program's process was forked off (it closed the pipe
that carries it). The evaluator runs the test itself; every name the test takes from the program
is a stub whose calls cross as plain data (JSON of None/bool/int/float/str/list/tuple/dict/set/
bytes, decoded into fresh builtin objects) and whose results the test compares. What crosses and
what a test may and may not do is in _wire.py's docstring. The verdict travels to the host on a
pipe only the evaluator holds. So replacing builtins.exec or compile, rebinding names in __main__,
reading frames or tracebacks, exiting early, forging markers, or returning an always-equal object
changes nothing the evaluator trusts.

Memory is one number, `memory_bytes`, for the whole program (every process it forks, its tmpfs
pages, pipes, kernel memory; not the interpreter pages it shares with the evaluator), where
the host has a writable memory cgroup (v2 with the memory controller delegated, else v1; isolation
"memcg", RunResult.memory_peak_bytes the measured peak). Without one, each process has RLIMIT_AS
= memory_bytes and the filter closes the routes around it (memfd, SysV shm, nested namespaces,
mounts), so the bound is max_processes x memory_bytes + max_disk_bytes.

Unsafe mode. Without namespaces (no root and no unprivileged user namespaces, or
`namespaces=False`), or with neither the syscall filter nor a memory cgroup, the run cannot hold
the program: every run raises RuntimeError unless `allow_unsafe=True`, and then
RunResult.isolation contains "unsafe" and `metrics()` counts it. Unsafe runs still get the
audit hook (sockets, exec, ctypes refused: best effort), the filter without any socket family,
a uid sweep as root, but see host FIFOs and world-writable files.

Limits: what is and is not covered, and why.
- Covered with namespaces and the filter or a cgroup (tests/test_sandbox_escapes.py, one class
  per route): forged verdicts (the evaluator decides), memory (one bound with a cgroup, closed
  routes without), host files, sockets, FIFOs and network (minimal root, netns, filter), the
  trainer's processes (PID namespace, uids, non-dumpable evaluator), its keyring, its environment.
- Names a test takes from the program are the program's to define: HumanEval/32's test calls the
  prompt's `poly`, so a program that redefines `poly` changes what that test checks (as it did
  before; the benchmark's design). A program that special-cases the tested inputs passes them:
  that is a wrong answer the tests did not catch, not an escape.
- Files under /usr and the interpreter's prefixes stay readable (Python needs them); put no
  secrets there. /proc shows the machine's CPUs and memory.
- Without a memory cgroup the bound is max_processes x memory_bytes + max_disk_bytes (plus pipe
  buffers, at most max_open_files x 1 MiB per process): per-process limits cannot add up to one.
- CPU time is per process (RLIMIT_CPU), so a run's CPU is bounded by the wall clock and
  max_processes; as a non-root trainer in a user namespace, RLIMIT_NPROC also counts the
  trainer's own processes.
- The kernel is shared: namespaces and the filter shrink its surface, they do not replace a VM
  (gVisor, Firecracker) for adversaries with kernel exploits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from . import _memcg, _seccomp

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")
_UID_BASE = 1 << 24  # far above distribution and container ranges; one fresh uid per run
_uids_in_use: set[int] = set()
_uid_lock = threading.Lock()
_metrics = {"sandbox/runs": 0, "sandbox/unsafe_runs": 0, "sandbox/memcg_runs": 0}


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `namespaces=False` forces the fallback, which runs only with
    `allow_unsafe=True` (module doc)."""

    timeout_s: float = 5.0  # wall clock for the whole run, interpreter start included
    cpu_s: int = 5  # RLIMIT_CPU: SIGXCPU at cpu_s, SIGKILL one second later
    memory_bytes: int = 512 << 20  # the run's memory (cgroup); also RLIMIT_AS of each process
    max_processes: int = 16  # RLIMIT_NPROC: processes and threads of the run's uid
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file it may write
    max_disk_bytes: int = 64 << 20  # size of the private tmpfs (all files together)
    max_output_bytes: int = 1 << 20  # per stream; one byte more kills the run
    namespaces: bool = True
    allow_unsafe: bool = False

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"SandboxLimits.{field.name}: expected a bool, got {value!r}")
                continue
            kind = (float, int) if field.type == "float" else int
            if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
                raise ValueError(f"SandboxLimits.{field.name}: expected a positive {field.type}, "
                                 f"got {value!r}")


@dataclasses.dataclass
class RunResult:
    """What one sandboxed run did.

    returncode: a program run's exit status, 128+N when signal N killed it inside the sandbox
      (SIGXCPU = 152); a test run's is the evaluator's: 0 passed, 1 failed; -9 when the host
      killed the run (timeout, output cap).
    completed: the program's last line ran (reported by the program's process, so it is the
      program's word, never a verdict).
    passed: a test run's verdict, decided by the evaluator; None for a program run.
    isolation: the mechanisms this run got, e.g. "uid,memcg,keyring,netns,...,seccomp".
    memory_peak_bytes: the program's peak memory measured by its cgroup (None without one).
    error: why a test run failed, as the evaluator saw it (e.g. "AssertionError: ").
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool
    completed: bool
    wall_s: float
    isolation: str
    passed: bool | None = None
    memory_peak_bytes: int | None = None
    error: str | None = None  # why the test failed, in the evaluator's words

    @property
    def ok(self) -> bool:
        """A test run: the test passed; a program run: it ran to the end and exited 0; both
        within every limit."""
        within = not self.timed_out and not self.output_truncated
        if self.passed is not None:
            return self.passed and within
        return self.completed and self.returncode == 0 and within


def run_program(code: str, *, stdin: str = "",
                limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Runs `code` as `__main__` with `stdin` as its standard input. Raises RuntimeError when
    the sandbox cannot start or would be unsafe (a host matter, never the program's doing);
    TypeError / ValueError for arguments that are not str or not encodable as UTF-8."""
    _check_str("code", code)
    _check_str("stdin", stdin)
    return _run("program", code, "", stdin.encode(), limits)


def run_test(program: str, test: str, *, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Runs `program`, then the `test` snippet (e.g. `assert f(1) == 2`) in the evaluator against
    it (module doc); `.ok` says whether the test passed. Raises like run_program."""
    _check_str("program", program)
    _check_str("test", test)
    return _run("test", program, test, b"", limits)


def run_tests(program: str, tests: Sequence[str], *, limits: SandboxLimits = SandboxLimits(),
              max_workers: int = 1) -> float:
    """Share of `tests` that `program` passes, each test in its own sandboxed run."""
    return run_many([(program, tests)], limits=limits, max_workers=max_workers)[0]


def run_many(items: Sequence[tuple[str, Sequence[str]]], *, limits: SandboxLimits = SandboxLimits(),
             max_workers: int | None = None) -> list[float]:
    """Share of tests passed for each `(program, tests)` item.

    Every distinct (program, test) pair is its own run, once (sampled groups repeat programs: a pair
    that recurs shares the one run's outcome); at most `max_workers` (default: CPU count) run at once,
    so a batch with one slow item still keeps every worker busy.
    """
    jobs = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"items[{i}]: expected a (program, tests) pair, got {item!r:.80}")
        program, tests = item
        _check_str(f"items[{i}] program", program)
        if isinstance(tests, str) or not tests:
            raise ValueError(f"items[{i}]: expected a non-empty list of test snippets, "
                             f"got {tests!r:.80}")
        for j, test in enumerate(tests):
            _check_str(f"items[{i}] tests[{j}]", test)
            jobs.append((i, program, test))
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max_workers: expected >= 1, got {max_workers}")
    workers = max_workers or os.cpu_count() or 1
    distinct = list(dict.fromkeys((program, test) for _, program, test in jobs))
    with ThreadPoolExecutor(workers) as pool:
        ok = dict(zip(distinct, pool.map(lambda pair: run_test(*pair, limits=limits).ok, distinct)))
    passed = [0] * len(items)
    for i, program, test in jobs:
        passed[i] += ok[(program, test)]
    return [passed[i] / len(item[1]) for i, item in enumerate(items)]


def metrics() -> dict[str, int]:
    """Counts since the process started: runs, runs in unsafe mode, runs under a memory cgroup."""
    return dict(_metrics)


def _check_str(name: str, value) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: not encodable as UTF-8 ({e.reason} at position {e.start})") from None


# ---------------------------------------------------------------- host side: spawn, pump, kill


def _run(mode: str, code: str, test: str, stdin: bytes, limits: SandboxLimits) -> RunResult:
    uid, evaluator_uid = _claim_uid(), _claim_uid()
    workdir = tempfile.mkdtemp(prefix="r1jax-sandbox-")
    cgroup = _memcg.create(f"r1jax-sandbox-{uid}", limits.memory_bytes)
    job = json.dumps({"mode": mode, "code": code, "uid": uid, "evaluator_uid": evaluator_uid,
                      "workdir": workdir,
                      "parent": os.getpid(), "limits": dataclasses.asdict(limits),
                      "seccomp": _seccomp.filters(), "expose": _interpreter_dirs(),
                      "cgroup": cgroup and cgroup.procs}).encode()
    control = b"%d\n" % len(job) + job + (b"%d\n" % len(test.encode()) + test.encode() if mode == "test" else b"")
    ctl_r, ctl_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-X", "utf8", _CHILD_SCRIPT, str(ctl_r), str(verdict_w)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={},
            cwd=workdir, close_fds=True, pass_fds=(ctl_r, verdict_w), start_new_session=True)
        os.close(ctl_r)
        os.close(verdict_w)
        ctl_r = verdict_w = -1
        writes, ctl_w = {proc.stdin.fileno(): stdin, ctl_w: control}, -1  # _pump closes them
        try:
            streams = _pump(proc, writes,
                            [proc.stdout.fileno(), proc.stderr.fileno(), verdict_r],
                            start + limits.timeout_s, limits.max_output_bytes)
        finally:
            # The session leader is not reaped yet, so its pid (= the group id) cannot be reused:
            # killing the group here cannot hit an unrelated process.
            _kill_group(proc.pid)
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        out, err, verdict, timed_out, truncated = streams
        frames = _frames(verdict)
        if not frames and not timed_out:  # no untrusted code ran: a broken host setup
            raise RuntimeError("sandbox failed to start: " + err.decode("utf-8", "replace")[-2000:])
        for key in ("refused", "setup_error"):
            if key in frames:
                raise RuntimeError(f"sandbox {key.replace('_', ' ')}: {frames[key]}\n"
                                   + err.decode("utf-8", "replace")[-2000:])
        isolation = frames.get("isolation", "")
        if "uid" in isolation.split(",") and "pidns" not in isolation.split(","):
            _kill_uid(uid)  # no PID namespace: escaped (setsid) descendants share only the uid
        _metrics["sandbox/runs"] += 1
        _metrics["sandbox/unsafe_runs"] += "unsafe" in isolation.split(",")
        _metrics["sandbox/memcg_runs"] += "memcg" in isolation.split(",")
        passed = bool(frames.get("passed")) if mode == "test" else None
        return RunResult(returncode=proc.returncode, stdout=out.decode("utf-8", "replace"),
                         stderr=err.decode("utf-8", "replace"), timed_out=timed_out,
                         output_truncated=truncated, completed=frames.get("completed") is True,
                         wall_s=time.monotonic() - start, isolation=isolation, passed=passed,
                         memory_peak_bytes=cgroup and cgroup.peak(),
                         error=frames.get("error") if isinstance(frames.get("error"), str) else None)
    finally:
        for fd in (ctl_r, ctl_w, verdict_r, verdict_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if cgroup:
            cgroup.remove()
        with _uid_lock:
            _uids_in_use.difference_update((uid, evaluator_uid))
        shutil.rmtree(workdir, ignore_errors=True)


def _frames(verdict: bytes) -> dict:
    """The evaluator's JSON lines merged into one dict (only it holds the pipe)."""
    merged = {}
    for line in verdict.splitlines():
        try:
            merged.update(json.loads(line))
        except ValueError:
            break  # cut off by the host's kill: what came before stands
    return merged


def _interpreter_dirs() -> list[str]:
    """The interpreter's prefixes and the directory of sys.executable (and of every link on the
    way to the binary), so the program finds its standard library and can run sys.executable."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    path = sys.executable
    for _ in range(16):
        dirs.add(os.path.dirname(os.path.abspath(path)))
        if not os.path.islink(path):
            break
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    return sorted({d for p in dirs for d in (p, os.path.realpath(p))})


def _claim_uid() -> int:
    while True:
        uid = _UID_BASE + secrets.randbelow(_UID_BASE)
        with _uid_lock:
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _pump(proc: subprocess.Popen, writes: dict[int, bytes], reads: list[int], deadline: float,
          cap: int):
    """Feeds `writes` (fd -> bytes, each closed when done or on return) and drains `reads` until they close,
    the deadline passes, or a stream passes `cap` bytes. Returns (*read bytes, timed_out,
    truncated); the process may still run (the caller kills its group)."""
    sel = selectors.DefaultSelector()
    buffers = {fd: bytearray() for fd in reads}
    pending = {fd: memoryview(data) for fd, data in writes.items()}
    for fd in buffers:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    for fd in pending:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_WRITE)
    timed_out = truncated = False
    try:
        while sel.get_map() and not truncated:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            events = sel.select(min(remaining, 0.1))
            if not events and _exited(proc.pid):
                break  # only descendants that escaped the group still hold the pipes
            for key, _ in events:
                fd = key.fd
                if fd in pending:
                    try:
                        pending[fd] = pending[fd][os.write(fd, pending[fd][:1 << 16]):]
                    except BrokenPipeError:
                        pending[fd] = pending[fd][:0]
                    if not pending[fd]:
                        sel.unregister(fd)
                        _close_writer(proc, fd)
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    sel.unregister(fd)
                    continue
                buffers[fd] += chunk
                if len(buffers[fd]) > cap:
                    del buffers[fd][cap:]
                    truncated = True
        if not (timed_out or truncated):
            timed_out = not _exited_by(proc.pid, deadline)
    finally:
        for fd in pending:
            if fd in sel.get_map():
                _close_writer(proc, fd)
        sel.close()
    return (*(bytes(buffers[fd]) for fd in reads), timed_out, truncated)


def _close_writer(proc: subprocess.Popen, fd: int) -> None:
    if not proc.stdin.closed and fd == proc.stdin.fileno():
        proc.stdin.close()
    else:
        os.close(fd)


def _exited_by(pid: int, deadline: float) -> bool:
    """Waits (without reaping) until `pid` exits or the deadline passes; the output pipes have
    closed, so this is immediate unless the program closed them itself and kept running."""
    while not _exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _exited(pid: int) -> bool:
    """Whether child `pid` has exited, leaving it unreaped (so its pid cannot be reused)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """Kills every process of `uid` (kill(-1) as that uid spares only the killer itself)."""
    subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[], env={},
                   cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                   check=False)
