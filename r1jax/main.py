"""Run one stage: `python -m r1jax.main --config configs/<stage>.py[:preset] --workdir DIR [--config.a.b=v]`.

The config file's `get_config(arg)` builds the config (arg = the text after ':'); overrides are applied to
the locked config, so a misspelt field is an error. `config.stage` picks the stage (r1jax.stages.STAGES).
Every host of a multi-host job runs the same command.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from r1jax.host import ensure_malloc_tunables

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for this run's checkpoints, metrics and outputs")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax's, per save) only on --verbosity=0
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("r1jax").setLevel(logging.INFO)
    from r1jax import distributed, stages

    distributed.initialize_from_env()  # before anything touches a device
    result = stages.run(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(result.to_dict(), indent=1, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    ensure_malloc_tunables()
    app.run(main)
