"""Shared by the tests that run r1jax in a subprocess: the repo root and the subprocess environment."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(cache_dir=None, xla_flags=""):
    """Environment of a run in a test: CPU, the repo importable, XLA's cheapest backend optimisation (these runs
    are bound by compile time) plus `xla_flags`, and with `cache_dir` a persistent compilation cache that every
    program enters, so runs sharing it compile each program once."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_backend_optimization_level=0 {xla_flags}".strip())
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env
