"""The sandbox's child: `python -I -S -X utf8 _child.py CTL VERDICT`, started by the host side
(`__init__.py`, whose docstring describes the design). Everything here runs before any untrusted
line, as the trainer's user (root, or the owner of a user namespace).

fd CTL (read): `<len>\\n<job JSON>` then `<len>\\n<test>`; the test is read only after the
program's process has been forked off and has closed CTL, so it never holds the test.
fd VERDICT (write): JSON lines for the host: {"isolation": ...} once set up, then one final
{"passed": ..., "completed": ..., "returncode": ...} or {"refused"/"setup_error": why}.
"""

import ctypes
import json
import os
import platform
import resource
import signal
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _wire  # noqa: E402 - the sibling module, found through the line above (-I drops the script dir)

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE, _MNT_DETACH = 0x1000, 0x4000, 0x40000, 0x2
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000  # 442 on every 64-bit Linux ABI
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
_KEYCTL_JOIN_SESSION_KEYRING = 1
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
_SECCOMP_MODE_FILTER = 2
_ROOT_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_BLOCKED_EVENTS = ("socket.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                   "subprocess.Popen", "ctypes.", "os.startfile", "pty.")
_SETUP_FAILED = 111

libc = ctypes.CDLL(None, use_errno=True)


def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def main() -> None:
    ctl, verdict = int(sys.argv[1]), int(sys.argv[2])
    check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    job = json.loads(_read_frame(ctl))
    if os.getppid() != job["parent"]:  # the trainer died before PDEATHSIG was armed
        os._exit(1)
    limits, root = job["limits"], os.geteuid() == 0
    features = ["uid"] if root else []
    cgroup = os.open(job["cgroup"], os.O_WRONLY) if job["cgroup"] else None
    if cgroup is not None:
        features.append("memcg")
    namespaces = limits["namespaces"] and _unshare(root)
    if _join_fresh_keyring():
        features.append("keyring")
    if namespaces:
        features += ["netns", "pidns", "mntns", "ipcns", "minroot"]
        pid = os.fork()  # the child becomes PID 1 of the new namespace: the evaluator
        if pid:
            os.close(ctl)
            os.close(verdict)
            _exit_like(pid)
        check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        owner = (job["uid"], job["uid"]) if root else (os.getuid(), os.getgid())
        _minimal_root(limits["max_disk_bytes"], owner, job["expose"])
        workdir = "/tmp/work"
    else:
        features.append("audit-hook")
        workdir = job["workdir"]
        if root:
            os.chown(workdir, job["uid"], job["uid"])
    seccomp = job["seccomp"][0 if namespaces else 1] if job["seccomp"] else None
    if seccomp:
        features.append("seccomp")
    unsafe = not namespaces or not ({"seccomp", "memcg"} & set(features))
    if unsafe:
        if not limits["allow_unsafe"]:
            _wire.send(verdict, {"refused": f"isolation {','.join(features)} cannot hold the program "
                                 "(no namespaces, or neither seccomp nor a memory cgroup); set "
                                 "SandboxLimits(allow_unsafe=True) to run it anyway"})
            os._exit(0)
        features.append("unsafe")
    _wire.send(verdict, {"isolation": ",".join(features)})
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    # Not dumpable (no ptrace, no /proc/N/mem, no /proc/N/fd) before the program's process exists.
    check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(DUMPABLE)")
    pid = os.fork()
    if pid == 0:  # the program's process: never holds CTL, VERDICT or the evaluator's pipe ends
        for fd in (ctl, verdict, requests_w, replies_r):
            os.close(fd)
        check(libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(DUMPABLE)")  # its own /proc/self
        _program(job, seccomp, cgroup, requests_r, replies_w, workdir, root, namespaces)
    if namespaces:  # the test is trusted, but needs no privilege either (the fallback keeps root
        _drop_privileges(job["evaluator_uid"] if root else None)  # to read a stdlib under /root)
        check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(DUMPABLE)")  # setuid may reset it
    for fd in (requests_r, replies_w) + (() if cgroup is None else (cgroup,)):
        os.close(fd)
    test = _read_frame(ctl).decode() if job["mode"] == "test" else None
    os.close(ctl)
    _evaluate(job, test, pid, _wire.Channel(requests_w, replies_r, limits["max_output_bytes"]), verdict)


def _read_frame(fd: int) -> bytes:
    """Reads `<length>\\n<bytes>` from `fd` exactly."""
    size = b""
    while not size.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            raise SystemExit("sandbox: truncated job")
        size += byte
    data, need = b"", int(size)
    while len(data) < need:
        chunk = os.read(fd, need - len(data))
        if not chunk:
            raise SystemExit("sandbox: truncated job")
        data += chunk
    return data


# ---------------------------------------------------------------- namespaces and filesystem


def _unshare(root: bool) -> bool:
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


def _join_fresh_keyring() -> bool:
    """An anonymous session keyring of our own: the trainer's session keyring is out of reach."""
    number = _SYS_KEYCTL.get(platform.machine())
    return number is not None and libc.syscall(number, _KEYCTL_JOIN_SESSION_KEYRING, None) > 0


def _minimal_root(disk_bytes: int, owner: tuple[int, int], expose: list[str]) -> None:
    """A new root holding only the system's program directories and the interpreter's prefixes
    (read-only binds), a few device nodes, /proc, and a size-capped tmpfs for /tmp (also backing
    /var/tmp and /dev/shm). No host socket, FIFO, /run, /sys, /home or /etc is in it. Runs as
    PID 1 of the new PID namespace (its /proc is this namespace's)."""
    check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    new = "/tmp"  # exists everywhere; the tmpfs mounted on it here is ours alone
    check(libc.mount(b"tmpfs", new.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                     b"size=1048576,mode=0755"), "mount the new root")
    bound = []
    for path in list(_ROOT_DIRS) + sorted(set(expose)):
        if not os.path.lexists(path) or any(path == b or path.startswith(b + "/") for b in bound):
            continue
        if path in _ROOT_DIRS and os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), new + path)
            continue
        os.makedirs(new + path, 0o755, exist_ok=True)
        check(libc.mount(path.encode(), (new + path).encode(), None, _MS_BIND | _MS_REC, None),
              f"bind {path}")
        bound.append(path)
    for path in ("/dev", "/dev/shm", "/proc", "/tmp", "/var/tmp"):
        os.makedirs(new + path, 0o755, exist_ok=True)
    # Our PID namespace's /proc, mounted while the host's is still in view (a user namespace may
    # only mount a procfs when a full one is visible).
    check(libc.mount(b"proc", f"{new}/proc".encode(), b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                     None), "mount /proc")
    for device in _DEVICES:
        open(f"{new}/dev/{device}", "w").close()
        check(libc.mount(f"/dev/{device}".encode(), f"{new}/dev/{device}".encode(), None, _MS_BIND,
                         None), f"bind /dev/{device}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{new}/dev/{name}")
    os.chdir(new)
    pivot = _SYS_PIVOT_ROOT[platform.machine()]
    check(libc.syscall(ctypes.c_long(pivot), b".", b"."), "pivot_root")  # old root stacked below
    check(libc.umount2(b".", _MNT_DETACH), "detach the host root")
    os.chdir("/")
    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    check(libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), b"/",
                       ctypes.c_uint(_AT_RECURSIVE), attr, ctypes.c_size_t(32)), "read-only root")
    check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", _MS_NOSUID | _MS_NODEV,
                     f"size={disk_bytes},mode=1777".encode()), "mount tmpfs on /tmp")
    for target in ("/var/tmp", "/dev/shm"):
        source = "/tmp/." + target.strip("/").replace("/", "_")
        os.mkdir(source)
        os.chmod(source, 0o1777)
        check(libc.mount(source.encode(), target.encode(), None, _MS_BIND, None), f"bind {target}")
    os.mkdir("/tmp/work", 0o700)
    os.chown("/tmp/work", *owner)


def _exit_like(pid: int) -> None:
    """Waits for `pid` and exits with its status (128+N for signal N)."""
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


# ---------------------------------------------------------------- the program's process


def _program(job, seccomp, cgroup, requests: int, replies: int, workdir: str, root: bool,
             namespaces: bool) -> None:
    """Drops every privilege, tells the evaluator it is set up, runs the program as __main__,
    then answers the test's calls. Never returns."""
    try:
        if cgroup is not None:
            os.write(cgroup, b"0")  # this process and all it forks: one memory bound
            os.close(cgroup)
        _restrict(job["limits"], job["uid"] if root else None, namespaces, seccomp)
        os.chdir(workdir)
        os.umask(0o077)
        _wire.send(replies, {"set_up": 1})
    except BaseException:  # noqa: BLE001 - a host problem: the evaluator reports it
        traceback.print_exc()
        os._exit(_SETUP_FAILED)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    code = job.pop("code")
    del job
    exec(compile(code, "<program>", "exec"), namespace)  # noqa: S102 - sandboxed
    for stream in (sys.stdout, sys.__stdout__):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a program may have replaced or closed its stdout
            pass
    _wire.send(replies, {"done": 1})
    _wire.serve(namespace, requests, replies)
    sys.exit(0)


def _restrict(limits: dict, uid: int | None, namespaces: bool, seccomp: str | None) -> None:
    """Resource limits, then an unprivileged identity, then no way back to privilege, then the
    syscall filter (it is inherited by every process and exec that follows)."""
    cpu = limits["cpu_s"]
    for which, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_AS, limits["memory_bytes"]),
                         (resource.RLIMIT_NPROC, limits["max_processes"]),
                         (resource.RLIMIT_NOFILE, limits["max_open_files"]),
                         (resource.RLIMIT_FSIZE, limits["max_file_bytes"]),
                         (resource.RLIMIT_MSGQUEUE, 0),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, value if isinstance(value, tuple) else (value, value))
    if uid is not None or namespaces:
        _drop_privileges(uid)
    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    if seccomp:
        program = bytes.fromhex(seccomp)

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
        check(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
              "seccomp")
    if not namespaces:
        sys.addaudithook(_deny_escape_hatches)


def _drop_privileges(uid: int | None) -> None:
    """As root: become `uid` (no groups). In a user namespace (uid None): drop every capability
    that unshare(CLONE_NEWUSER) granted inside."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        return
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")


def _deny_escape_hatches(event: str, args) -> None:
    if event.startswith(_BLOCKED_EVENTS):
        raise PermissionError(f"sandbox: {event} is not allowed")


# ---------------------------------------------------------------- the evaluator (trusted)


def _evaluate(job: dict, test: str | None, pid: int, channel: _wire.Channel, verdict: int) -> None:
    """Decides the run's outcome outside the program's interpreter and reports it on VERDICT."""
    try:
        channel.expect("set_up")
    except _wire.ProtocolError:
        _, status = os.waitpid(pid, 0)
        _wire.send(verdict, {"setup_error": f"the program's process failed to set up (status "
                                            f"{os.waitstatus_to_exitcode(status)}; see stderr)"})
        os._exit(_SETUP_FAILED)
    completed, failure = False, None
    try:
        channel.expect("done")
        completed = True
        if test is not None:
            _wire.run_test(channel, test)
    except BaseException as e:  # noqa: BLE001 - anything that ends the test early fails it
        failure = f"{type(e).__name__}: {e}"[:2000]
    if test is not None:
        _wire.send(verdict, {"passed": failure is None, "completed": completed, "error": failure})
        try:  # as PID 1 our exit kills the namespace; without one, this and the host's sweep
            os.kill(pid, signal.SIGKILL)
        except OSError:  # another uid (the namespace case) or already gone
            pass
        os._exit(0 if failure is None else 1)
    os.close(channel.requests)  # the program's server sees EOF and exits
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    code = code if code >= 0 else 128 - code
    _wire.send(verdict, {"completed": completed, "returncode": code})
    os._exit(code)


if __name__ == "__main__":
    main()
