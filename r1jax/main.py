"""Run one stage: `python -m r1jax.main --config configs/<stage>.py[:preset] --workdir DIR [--config.a.b=v]`.

The config file's `get_config(arg)` builds the config (arg = the text after ':'); overrides are applied to
the locked config, so a misspelt field is an error. `config.stage` picks the stage (r1jax.stages.STAGES).
Every host of a multi-host job runs the same command.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for this run's checkpoints, metrics and outputs")
flags.mark_flags_as_required(["config", "workdir"])


# glibc (>= 2.35) backs malloc's large blocks with transparent huge pages. XLA:CPU allocates a step's temporary
# buffer afresh from a worker thread at every execution; glibc maps such a block (~270 MB for the tiny pretraining
# step) with mmap, and without huge pages touching it costs ~70k page faults per step: the step took ~520 ms
# instead of ~400 (docs/performance.md). glibc reads tunables only at process start, hence the re-exec.
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


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax's, per save) only on --verbosity=0
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("r1jax").setLevel(logging.INFO)
    from r1jax import sharding, stages

    sharding.maybe_initialize_distributed()
    result = stages.run(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(result.to_dict(), indent=1, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    ensure_malloc_tunables()
    app.run(main)
