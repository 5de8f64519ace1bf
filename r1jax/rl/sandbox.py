"""Runs untrusted, model-written Python in a throwaway, locked-down child process.

Why: the R1 recipe's rule rewards include "code run against tests" (REFERENCE.md §4, step 1), so
the trainer executes whatever the policy writes, and a policy under RL pressure will find any
shortcut: exiting early with status 0, printing what a checker looks for, or harming the host.

Each run is a fresh `python -I -S -X utf8 <this file>` (isolated mode: no PYTHON* variables, no
site-packages, so programs get the standard library only, as on a judge) with an empty environment
and its own session. This file's `_child_main` sets the run up before any untrusted line executes:

1. Namespaces (`unshare`): network (only a downed loopback: no connection leaves or arrives),
   PID (the program sees only its own processes; when the reaper, PID 1 of the namespace, exits,
   the kernel kills every process left, daemonised grandchildren included), mount and IPC.
   As root that is plain `unshare`; as any other user, a user namespace first, where the kernel
   allows unprivileged ones.
2. Filesystem (mount namespace): every host mount becomes read-only and private (`mount_setattr`
   with AT_RECURSIVE, Linux 5.12+), a size-capped tmpfs covers /tmp and also backs /var/tmp,
   /dev/shm and /run/lock, the working directory is /tmp/work on it, and /proc is remounted for
   the new PID namespace. Nothing the program writes reaches the host; it all vanishes with it.
   If the interpreter lives under a directory others may not enter (/root, 0700), that
   directory is covered by an empty tmpfs with only the interpreter's prefix bound back.
3. Identity: as root, the program runs as a fresh, unprivileged uid/gid drawn per run from
   [2**24, 2**25), with no supplementary groups. So RLIMIT_NPROC (counted per uid) is a
   per-run fork-bomb cap, and file permissions protect everything owned by others. In a user
   namespace all capabilities are dropped instead. PR_SET_NO_NEW_PRIVS stops setuid binaries.
4. Resource limits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_FSIZE, no core.
5. The host side kills the whole process group on timeout or when stdout/stderr passes its cap
   (read incrementally, never buffered past the cap), and removes the working directory.

Fallback when no namespace can be created (RunResult.isolation lists what a run got): an audit
hook refuses sockets, exec/spawn/subprocess and ctypes (best effort: it blocks the stdlib routes,
not hand-written machine code), the working directory is a host temporary directory (and the
host's /tmp is writable), and a uid sweep (`kill(-1)` as the run's uid) replaces the PID
namespace when we are root; the interpreter must then be readable by all. Without root and
without user namespaces, the program runs as the trainer's own user and could touch its files:
run the trainer as root in a container, or on a kernel that allows user namespaces.

Limits of this design: the limits are per process, so a run's memory is bounded by
max_processes x memory_bytes, not by one number (a cgroup would do that; none is used, as
delegated cgroups differ between hosts); world-readable host files stay readable (read-only).

A test passes only if its run ends with status 0 AND prints a 128-bit random marker that only
the harness knows, after the test ran (see `_execute`): printing "PASSED", `sys.exit(0)` or
`os._exit(0)` before the asserts earns nothing. The marker never appears in the program's source,
argv, environment or files; the one residual route is a program that deliberately digs through
the harness's own interpreter frames, or rewrites the test semantics (an object whose `__eq__`
is always True). A process boundary cannot stop those; they are reward hacking to watch for.
"""

from __future__ import annotations

import dataclasses
import marshal
import os
import resource
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

_CHILD_SCRIPT = os.path.abspath(__file__)
_TAG = b"r1jax-sandbox isolation: "
_UID_BASE = 1 << 24  # far above distribution and container ranges; one fresh uid per run
_uids_in_use: set[int] = set()
_uid_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. `namespaces=False` forces the weak fallback (for tests and debugging)."""

    timeout_s: float = 5.0  # wall clock for the whole run, interpreter start included
    cpu_s: int = 5  # RLIMIT_CPU: SIGXCPU at cpu_s, SIGKILL one second later
    memory_bytes: int = 512 << 20  # RLIMIT_AS (address space) of each process
    max_processes: int = 16  # RLIMIT_NPROC: processes and threads of the run's uid
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file it may write
    max_disk_bytes: int = 64 << 20  # size of the private tmpfs (all files together)
    max_output_bytes: int = 1 << 20  # per stream; one byte more kills the run
    namespaces: bool = True

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), (float, int) if field.type == "float" else int
            if field.name == "namespaces":
                continue
            if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
                raise ValueError(f"SandboxLimits.{field.name}: expected a positive {field.type}, "
                                 f"got {value!r}")


@dataclasses.dataclass
class RunResult:
    """What one sandboxed run did.

    returncode: exit status; 128+N when a signal N killed the program inside the sandbox
      (SIGXCPU = 152, SIGXFSZ = 153); negative (-9) when the harness killed the run.
    completed: the end-of-run marker arrived: the code (and its test) ran to the last line.
    isolation: the mechanisms this run got, e.g. "uid,netns,pidns,mntns,ro-root" (module doc).
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool
    completed: bool
    wall_s: float
    isolation: str

    @property
    def ok(self) -> bool:
        """Ran to the end and exited 0 within every limit; for a test run: the test passed."""
        return (self.completed and self.returncode == 0 and not self.timed_out
                and not self.output_truncated)


def run_program(code: str, *, stdin: str = "",
                limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Runs `code` as `__main__` with `stdin` as its standard input. Raises RuntimeError when
    the sandbox itself cannot start (a host problem, never the program's doing)."""
    _check_str("code", code)
    _check_str("stdin", stdin)
    return _run("program", code, "", stdin.encode(), limits)


def run_test(program: str, test: str, *, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Runs `program`, then the `test` snippet (e.g. `assert f(1) == 2`) in its namespace;
    `.ok` says whether the test passed. Raises like run_program."""
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


def _check_str(name: str, value) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__}")


# ---------------------------------------------------------------- host side: spawn, pump, kill


def _run(mode: str, code: str, test: str, stdin: bytes, limits: SandboxLimits) -> RunResult:
    nonce = secrets.token_hex(16)
    uid = _claim_uid()
    workdir = tempfile.mkdtemp(prefix="r1jax-sandbox-")
    header = marshal.dumps({"mode": mode, "code": code, "test": test, "nonce": nonce, "uid": uid,
                            "workdir": workdir, "parent": os.getpid(),
                            "limits": dataclasses.asdict(limits)})
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-X", "utf8", _CHILD_SCRIPT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={}, cwd=workdir, close_fds=True, start_new_session=True)
        try:
            out, err, timed_out, truncated = _pump(
                proc, b"%d\n" % len(header) + header + stdin, start + limits.timeout_s,
                limits.max_output_bytes)
        finally:
            # The session leader is not reaped yet, so its pid (= the group id) cannot be reused:
            # killing the group here cannot hit an unrelated process.
            _kill_group(proc.pid)
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
        isolation = ""
        if err.startswith(_TAG):
            line, _, rest = err.partition(b"\n")
            isolation, err = line[len(_TAG):].decode(), rest
        elif not timed_out:  # no untrusted code ran: a broken host setup, not a failing program
            raise RuntimeError("sandbox failed to start: " + err.decode("utf-8", "replace")[-2000:])
        if "uid" in isolation.split(",") and "pidns" not in isolation.split(","):
            _kill_uid(uid)  # no PID namespace: escaped (setsid) descendants share only the uid
        marker = b"\n" + nonce.encode() + b"\n"
        completed = out.endswith(marker)
        if completed:
            out = out[:-len(marker)]
        return RunResult(returncode=proc.returncode, stdout=out.decode("utf-8", "replace"),
                         stderr=err.decode("utf-8", "replace"), timed_out=timed_out,
                         output_truncated=truncated, completed=completed,
                         wall_s=time.monotonic() - start, isolation=isolation)
    finally:
        with _uid_lock:
            _uids_in_use.discard(uid)
        shutil.rmtree(workdir, ignore_errors=True)


def _claim_uid() -> int:
    while True:
        uid = _UID_BASE + secrets.randbelow(_UID_BASE)
        with _uid_lock:
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _pump(proc: subprocess.Popen, payload: bytes, deadline: float, cap: int):
    """Feeds stdin and drains stdout/stderr until both close, the deadline passes, or a stream
    passes `cap` bytes. Returns (stdout, stderr, timed_out, truncated); the process may still
    run (the caller kills its group)."""
    sel = selectors.DefaultSelector()
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    for fd in buffers:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd, pending = proc.stdin.fileno(), memoryview(payload)
    os.set_blocking(stdin_fd, False)
    sel.register(stdin_fd, selectors.EVENT_WRITE)
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
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending[:1 << 16]):]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
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
        sel.close()
    out, err = (bytes(buffers[stream.fileno()]) for stream in (proc.stdout, proc.stderr))
    return out, err, timed_out, truncated


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


# ---------------------------------------------------------------- child side: runs as __main__

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE, _MNT_DETACH = 0x1000, 0x4000, 0x40000, 0x2
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000  # 442 on every 64-bit Linux ABI
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_BLOCKED_EVENTS = ("socket.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                   "subprocess.Popen", "ctypes.", "os.startfile", "pty.")


def _child_main() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result, what):
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    header = _read_header()
    job = marshal.loads(header)
    limits = job["limits"]
    check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    if os.getppid() != job["parent"]:  # the trainer died before PDEATHSIG was armed
        os._exit(1)
    root = os.geteuid() == 0
    features = ["uid"] if root else []
    namespaces = limits["namespaces"] and _unshare(libc, root)
    if namespaces:
        features += ["netns", "pidns", "mntns"]
        owner = (job["uid"], job["uid"]) if root else (os.getuid(), os.getgid())
        if _private_filesystem(libc, check, limits["max_disk_bytes"], owner):
            features.append("ro-root")
        workdir = "/tmp/work"
    else:
        features.append("audit-hook")
        workdir = job["workdir"]
        if root:
            os.chown(workdir, job["uid"], job["uid"])
    if namespaces:
        _wait_and_exit_unless_child(os.fork())  # the child becomes PID 1 of the new namespace
        check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        check(libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None),
              "mount /proc")
        _wait_and_exit_unless_child(os.fork())  # PID 1 stays the reaper; its exit kills the rest
    _restrict(libc, check, limits, job["uid"] if root else None, namespaces)
    os.chdir(workdir)
    os.umask(0o077)
    os.write(2, _TAG + ",".join(features).encode() + b"\n")  # set up: the harness trusts this
    _execute(job)


def _read_header() -> bytes:
    """Reads `<length>\\n<marshal bytes>` from stdin exactly, leaving the rest to the program."""
    size = b""
    while not size.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            raise SystemExit("sandbox: truncated header")
        size += byte
    header, need = b"", int(size)
    while len(header) < need:
        chunk = os.read(0, need - len(header))
        if not chunk:
            raise SystemExit("sandbox: truncated header")
        header += chunk
    return header


def _unshare(libc, root: bool) -> bool:
    """New network, PID, mount and IPC namespaces; through a user namespace when not root."""
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags if root else flags | _CLONE_NEWUSER) != 0:
        return False
    if not root:  # map our own ids to themselves: the program stays an ordinary user inside
        for path, text in (("/proc/self/setgroups", "deny"),
                           ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
    return True


def _private_filesystem(libc, check, disk_bytes: int, owner: tuple[int, int]) -> bool:
    """Host mounts read-only and private, a private tmpfs for every world-writable place.
    Returns whether the read-only remount worked (it needs Linux 5.12+)."""
    import ctypes

    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, _MS_PRIVATE, 0)
    read_only = libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), b"/",
                             ctypes.c_uint(_AT_RECURSIVE), attr, ctypes.c_size_t(32)) == 0
    if not read_only:  # at least keep our mounts from propagating to the host
        check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", _MS_NOSUID | _MS_NODEV,
                     f"size={disk_bytes},mode=1777".encode()), "mount tmpfs on /tmp")
    for target in ("/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(target):
            source = "/tmp/." + target.strip("/").replace("/", "_")
            os.mkdir(source)
            os.chmod(source, 0o1777)
            check(libc.mount(source.encode(), target.encode(), None, _MS_BIND, None),
                  f"bind {target}")
    for prefix in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}:
        _expose(libc, check, prefix)
    os.mkdir("/tmp/work", 0o700)
    os.chown("/tmp/work", *owner)
    return read_only


def _expose(libc, check, path: str) -> None:
    """Makes `path` reachable for an unprivileged program when an ancestor (say /root, 0700)
    bars the way: that ancestor is covered by an empty tmpfs and only `path` is bound back into
    it. The program needs the interpreter's standard library; the rest stays hidden."""
    parts = path.strip("/").split("/")
    ancestors = ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]
    blocked = [a for a in ancestors if not os.stat(a).st_mode & 0o001]
    if not blocked:
        return
    stash = "/tmp/.stash"
    os.mkdir(stash)
    check(libc.mount(path.encode(), stash.encode(), None, _MS_BIND | _MS_REC, None), f"bind {path}")
    check(libc.mount(b"tmpfs", blocked[0].encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                     b"size=65536,mode=0755"), f"mount tmpfs on {blocked[0]}")
    os.makedirs(path, 0o755)
    check(libc.mount(stash.encode(), path.encode(), None, _MS_BIND | _MS_REC, None), f"bind {path}")
    check(libc.umount2(stash.encode(), _MNT_DETACH), f"unmount {stash}")
    os.rmdir(stash)


def _wait_and_exit_unless_child(pid: int) -> None:
    """In the parent: wait for `pid` and exit with its status (128+N for signal N). In the
    child (pid 0): return and carry on."""
    if pid == 0:
        return
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def _restrict(libc, check, limits: dict, uid: int | None, namespaces: bool) -> None:
    """Resource limits, then an unprivileged identity, then no way back to privilege."""
    cpu = limits["cpu_s"]
    for which, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_AS, limits["memory_bytes"]),
                         (resource.RLIMIT_NPROC, limits["max_processes"]),
                         (resource.RLIMIT_NOFILE, limits["max_open_files"]),
                         (resource.RLIMIT_FSIZE, limits["max_file_bytes"]),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, value if isinstance(value, tuple) else (value, value))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    elif namespaces:  # unshare(CLONE_NEWUSER) granted every capability inside: give them back
        import ctypes

        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    if not namespaces:
        sys.addaudithook(_deny_escape_hatches)


def _deny_escape_hatches(event: str, args) -> None:
    if event.startswith(_BLOCKED_EVENTS):
        raise PermissionError(f"sandbox: {event} is not allowed")


def _execute(job: dict) -> None:
    """Runs the program (and the test) as `__main__`, then writes the marker straight to fd 1.
    Anything that ends the run early (an exception, sys.exit, os._exit) skips the marker."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(job.pop("code"), "<program>", "exec"), namespace)  # noqa: S102 - sandboxed
    if job["mode"] == "test":
        exec(compile(job.pop("test"), "<test>", "exec"), namespace)  # noqa: S102 - sandboxed
    for stream in (sys.stdout, sys.__stdout__):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a program may have replaced or closed its stdout
            pass
    os.write(1, b"\n" + job["nonce"].encode() + b"\n")


if __name__ == "__main__":
    _child_main()
