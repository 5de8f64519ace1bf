"""The sandbox's syscall filter, compiled on the host with libseccomp (through its Python binding
`seccomp`, e.g. Debian's python3-seccomp, or the API-compatible `pyseccomp` from PyPI) and
loaded by the child with prctl(PR_SET_SECCOMP) just before the program runs.

Everything is allowed except what a judged program never needs and an attack does (EPERM):
- memory outside RLIMIT_AS: memfd_create, SysV shm / message queues / semaphores, userfaultfd;
- new namespaces (a nested user namespace would mount its own tmpfs past every cap): unshare,
  setns, clone with any CLONE_NEW* flag, and clone3 (its flags sit in memory a filter cannot
  read: ENOSYS, so glibc falls back to clone for threads and processes);
- mounts of any kind, chroot, pivot_root;
- keyrings (keyctl, add_key, request_key): nothing of the trainer's, nothing left behind;
- other processes' memory (ptrace, process_vm_readv/writev, pidfd_getfd) and kernel entry points
  that bypass the filter or have no use here (io_uring, bpf, perf_event_open);
- AF_UNIX sockets (socket(); socketpair stays, for multiprocessing.Pipe): no path or abstract
  socket of the host is reachable even where the filesystem or network view would allow it.
The fallback filter (no namespaces) also refuses every other socket() family: no network.
libseccomp's filter checks the architecture first (a 32-bit syscall from a 64-bit process is
killed), so the numbers above cannot be dodged through another ABI.
"""

from __future__ import annotations

import errno
import functools
import socket
import tempfile

DENIED = ("memfd_create", "memfd_secret", "shmget", "shmat", "shmctl", "msgget", "msgsnd", "semget",
          "mq_open", "userfaultfd", "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
          "mount_setattr", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
          "keyctl", "add_key", "request_key", "ptrace", "process_vm_readv", "process_vm_writev",
          "pidfd_getfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
          "perf_event_open")
NAMESPACE_FLAGS = (0x00000080, 0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                   0x20000000, 0x40000000)  # CLONE_NEWTIME, NS, CGROUP, UTS, IPC, USER, PID, NET


@functools.cache
def filters() -> tuple[str, str] | None:
    """(with namespaces, without) as hex BPF programs; None where libseccomp is unavailable."""
    for module in ("seccomp", "pyseccomp"):  # libseccomp's own binding, or its ctypes twin (PyPI)
        try:
            binding = __import__(module)
        except (ImportError, OSError):  # the binding or libseccomp.so.2 is missing
            continue
        return _build(binding, network=True).hex(), _build(binding, network=False).hex()
    return None


def _build(sc, *, network: bool) -> bytes:
    f = sc.SyscallFilter(sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        try:
            f.add_rule(deny, name)
        except (RuntimeError, ValueError, OSError):  # not a syscall of this architecture
            pass
    for flag in NAMESPACE_FLAGS:
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    if network:
        f.add_rule(sc.ERRNO(errno.EACCES), "socket", sc.Arg(0, sc.EQ, socket.AF_UNIX))
    else:
        f.add_rule(sc.ERRNO(errno.EACCES), "socket")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()
