"""r1jax.host: the malloc tunable that `python -m r1jax.main` and the benchmarks re-execute themselves with."""

import subprocess
import sys

import pytest

from helpers import REPO, subprocess_env

GLIBC = sys.platform == "linux" and __import__("platform").libc_ver()[0] == "glibc"


def _run(code, check=True, **extra):
    env = {k: v for k, v in subprocess_env().items() if k not in ("GLIBC_TUNABLES", "R1JAX_MALLOC_TUNABLES")}
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 or not check, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_command_reexecs_once_with_the_malloc_tunable():
    code = ("import os; from r1jax import host; print('run', flush=True); host.ensure_malloc_tunables(); "
            "print(os.environ.get('GLIBC_TUNABLES'))")
    assert _run(code) == ["run", "run", "glibc.malloc.hugetlb=1"]  # the same command again, once, with the tunable
    assert _run(code, GLIBC_TUNABLES="glibc.malloc.arena_max=2") == [
        "run", "run", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"]
    assert _run(code, GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == ["run", "glibc.malloc.hugetlb=0"]  # the user's wins
    assert _run(code, R1JAX_MALLOC_TUNABLES="0") == ["run", "None"]


@pytest.mark.skipif(not GLIBC, reason="glibc only")
@pytest.mark.parametrize("module", ["r1jax.main", "r1jax.bench.train_step"])
def test_entry_points_run_with_the_malloc_tunable(module):
    # the module as `python -m` runs it; the re-exec repeats this whole command, so "run" is printed twice
    code = (f"import os, runpy, sys; print('run', os.environ.get('GLIBC_TUNABLES'), flush=True); "
            f"sys.argv = ['{module}', '--help']; runpy.run_module('{module}', run_name='__main__')")
    out = _run(code, check=False)  # absl's --help exits with 1
    assert out[:4] == ["run", "None", "run", "glibc.malloc.hugetlb=1"]
