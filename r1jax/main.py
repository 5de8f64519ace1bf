"""Run one stage: `python -m r1jax.main --config configs/<stage>.py[:preset] --workdir DIR [--config.a.b=v]`.

The config file's `get_config(arg)` builds the config (arg = the text after ':'); overrides are applied to
the locked config, so a misspelt field is an error: one line that names the full field and its close matches,
before anything is loaded. `config.stage` picks the stage (r1jax.stages.STAGES). A config file may live
anywhere (a researcher's fork outside the repository): the repository's `configs` package is importable from any
working directory. Every host of a multi-host job runs the same command. Bad data, a missing checkpoint or a config
that cannot work (r1jax.main.user_errors) end the run with exit code 1 and one message naming the file:line, field or
path, without a traceback.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import r1jax
from r1jax.host import ensure_malloc_tunables

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(r1jax.__file__)))


def add_configs_to_path() -> None:
    """Makes the repository's `configs` package importable from any working directory (after what is already on
    sys.path, so a `configs` package of the user's own still wins)."""
    if os.path.isfile(os.path.join(REPO_ROOT, "configs", "__init__.py")) and REPO_ROOT not in sys.path:
        sys.path.append(REPO_ROOT)


add_configs_to_path()
_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for this run's checkpoints, metrics and outputs")
flags.mark_flags_as_required(["config", "workdir"])


def load_config_file(spec: str):
    """get_config(preset) of "path/to/file.py[:preset]", as config_flags loads it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"--config={spec}: no such config file {path!r} (from {os.getcwd()})")
    module_spec = importlib.util.spec_from_file_location("_r1jax_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def override_error(config, flag_path: str) -> str | None:
    """Why `--config.<flag_path>` names no field of `config` (one line, with the close matches), or None."""
    node, walked = config, []
    for key in flag_path.split("."):
        if not hasattr(node, "keys"):
            return (f"--config.{flag_path}: config.{'.'.join(walked)} is a value ({type(node).__name__}), not a "
                    "block with fields")
        if key not in node.keys():
            names = sorted(node.keys())
            close = difflib.get_close_matches(key, names, n=3)
            where = f"config.{'.'.join(walked)}" if walked else "config"
            hint = (f"did you mean {', '.join('config.' + '.'.join(walked + [c]) for c in close)}?" if close
                    else f"its fields: {', '.join(names)}")
            return f"--config.{flag_path}: {where} has no field {key!r}; {hint}"
        node, walked = node[key], walked + [key]
    return None


def check_overrides(argv: list[str]) -> None:
    """Exits with one line when an override names a field the config does not have (instead of a traceback)."""
    spec, paths = None, []
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith("--config."):
            paths.append(arg[len("--config."):].split("=", 1)[0])
    if spec is None or not paths:
        return
    config = load_config_file(spec)
    for path in paths:
        if (error := override_error(config, path)) is not None:
            raise SystemExit(error)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's data, checkpoint or config (each message names the file:line, field or path): main
    prints them as one message and exits 1, without a traceback."""
    from r1jax.data.chat import ChatTemplateError
    from r1jax.data.sources import DataError
    from r1jax.hf import CheckpointError, HFConfigError
    from r1jax.sharding import ShardingError
    from r1jax.train.loop import NonFiniteError
    from r1jax.train.run import ConfigError

    return (DataError, ChatTemplateError, CheckpointError, HFConfigError, ShardingError, NonFiniteError, ConfigError,
            FileNotFoundError)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # library INFO logs (orbax's, per save) only on --verbosity=0
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("r1jax").setLevel(logging.INFO)
    from r1jax import distributed, stages

    distributed.initialize_from_env()  # before anything touches a device
    try:
        result = stages.run(_CONFIG.value, _WORKDIR.value)
    except user_errors() as e:  # bad data or config: the message says what and where; a traceback would not help
        from r1jax.train.checkpoint import close_open  # noqa: PLC0415

        close_open()  # the run opened its checkpoints before the error: nothing of orbax's runs past the exit
        raise SystemExit(f"error: {type(e).__name__}: {e}") from None
    print(json.dumps(result.to_dict(), indent=1, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    ensure_malloc_tunables()
    check_overrides(sys.argv)
    app.run(main)
