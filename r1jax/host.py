"""Process-level settings of the host, applied before anything runs: glibc malloc's huge-page tunable.

Used by `python -m r1jax.main` and the `python -m r1jax.bench.*` commands, so the benchmarks measure the process
users run. Touches nothing but the environment of its own process (and re-executes it once).
"""

from __future__ import annotations

import os
import platform
import sys

# glibc (>= 2.35) backs malloc's large blocks with transparent huge pages. XLA:CPU allocates a step's temporary
# buffer afresh from a worker thread at every execution, and glibc serves a block that large from a worker
# thread's arena with a fresh mmap (M_MMAP_MAX does not apply there). Without huge pages, touching it costs a page
# fault per 4 KB every step: ~70k per tiny pretraining step (~270 MB; ~520 instead of ~400 ms) and ~600k per
# 100m DeepSeek-V3 bench step (2.4 GB; 6.6 instead of 5.2 s). docs/performance.md. glibc reads tunables only at
# process start, hence the re-exec.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def ensure_malloc_tunables() -> None:
    """Re-exec this command once with MALLOC_TUNABLE added to GLIBC_TUNABLES (Linux + glibc only; a tunable of
    that name already set, or R1JAX_MALLOC_TUNABLES=0, leaves the process as it is)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "glibc.malloc.hugetlb" in tunables
            or os.environ.get("R1JAX_MALLOC_TUNABLES", "1") == "0"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, MALLOC_TUNABLE) if t))
    os.execve(sys.executable, sys.orig_argv, env)
