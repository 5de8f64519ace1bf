"""One memory cgroup per sandboxed run: the whole run's memory (every process, tmpfs and shared
memory pages, pipe buffers, kernel memory) is bounded by one number, and its peak is measured.

Where: cgroup v2 when this process's cgroup has the memory controller in its subtree_control and
is writable (a delegated subtree), else cgroup v1's memory hierarchy when this process's memory
cgroup is writable (hybrid hosts, e.g. containers run as root). Otherwise `create` returns None
and the sandbox falls back to per-process limits (sandbox module doc).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time


@dataclasses.dataclass(frozen=True)
class Cgroup:
    path: str
    version: int

    @property
    def procs(self) -> str:
        """The file the program's process writes "0" to, to move itself in."""
        return os.path.join(self.path, "cgroup.procs")

    def peak(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            with open(os.path.join(self.path, name)) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """rmdir once the last task is gone (the kernel frees it asynchronously after a kill)."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return  # an empty leftover directory; the next run uses a new name
                time.sleep(0.01)


def create(name: str, memory_bytes: int) -> Cgroup | None:
    """A new cgroup `name` limited to `memory_bytes` (swap included), or None where none can be made."""
    parent = _parent()
    if parent is None:
        return None
    path, version = os.path.join(parent[0], name), parent[1]
    try:
        os.mkdir(path)
    except OSError:
        return None
    limits = ((("memory.max", memory_bytes), ("memory.swap.max", 0)) if version == 2 else
              (("memory.limit_in_bytes", memory_bytes), ("memory.memsw.limit_in_bytes", memory_bytes)))
    try:
        _write(path, *limits[0])
    except OSError:
        os.rmdir(path)
        return None
    try:
        _write(path, *limits[1])
    except OSError:
        pass  # no swap accounting on this host: there is no swap to escape into either
    return Cgroup(path, version)


def _write(path: str, name: str, value: int) -> None:
    with open(os.path.join(path, name), "w") as f:
        f.write(str(value))


@functools.cache
def _parent() -> tuple[str, int] | None:
    """(directory under which per-run cgroups go, version), or None."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    v2_mount = next((m[4] for m in mounts if m[m.index("-") + 1] == "cgroup2"), None)
    v1_mount = next((m[4] for m in mounts if m[m.index("-") + 1] == "cgroup"
                     and "memory" in m[-1].split(",")), None)
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and v2_mount:
            candidate = os.path.join(v2_mount, path.lstrip("/"))
            if _has(candidate, "cgroup.subtree_control", "memory") and os.access(candidate, os.W_OK):
                return candidate, 2
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and v1_mount:
            candidate = os.path.join(v1_mount, path.lstrip("/"))
            if os.path.exists(os.path.join(candidate, "memory.limit_in_bytes")) and os.access(candidate, os.W_OK):
                return candidate, 1
    return None


def _has(directory: str, name: str, word: str) -> bool:
    try:
        with open(os.path.join(directory, name)) as f:
            return word in f.read().split()
    except OSError:
        return False
