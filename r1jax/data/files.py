"""The one data-file resolver: what a config's file list may name.

    expand(("data/train.jsonl", "shards/*.parquet", "math_dir"), field="data.train_files") -> [paths]

An entry is a file, a glob (`*`, `?`, `[`, `**`) or a directory (its JSONL / Parquet / ArrayRecord files, sorted,
not recursive). Every entry must name at least one data file: an empty glob or directory, or a missing path, is an
error that names the config field and the entry (before anything heavy runs). `holdout_split` splits a small
set into train and eval files.
"""

from __future__ import annotations

import glob
import os
import re

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".array_record", ".arrayrecord")


def is_data_file(path: str) -> bool:
    """A file name the data layer opens (r1jax.data.sources), a shard suffix -00000-of-00008 allowed."""
    return re.sub(r"-\d+-of-\d+$", "", os.path.basename(path)).endswith(DATA_SUFFIXES)


def expand(entries, *, field: str) -> list[str]:
    """The files `entries` name (absolute paths, in order, each once). See the module docstring."""
    out: list[str] = []
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        if any(c in entry for c in "*?["):
            found = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            what = "glob"
        elif os.path.isdir(entry):
            found = sorted(os.path.join(entry, n) for n in os.listdir(entry)
                           if is_data_file(n) and os.path.isfile(os.path.join(entry, n)))
            what = f"directory (looked for {', '.join(DATA_SUFFIXES)})"
        elif os.path.isfile(entry):
            found, what = [entry], "file"
        else:
            raise FileNotFoundError(f"{field}: {entry!r} is neither a file, a directory nor a glob that exists")
        if not found:
            raise FileNotFoundError(f"{field}: the {what} {entry!r} names no data file")
        out += [os.path.abspath(p) for p in found if os.path.abspath(p) not in out]
    return out

