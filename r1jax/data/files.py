"""The one data-file resolver: what a config's file list may name.

    expand(("data/train.jsonl", "shards/*.parquet", "math_dir"), field="data.train_files") -> [paths]

An entry is a file, a glob (`*`, `?`, `[`, `**`) or a directory (its JSONL / Parquet / ArrayRecord files, sorted,
not recursive). Every entry must name at least one data file: an empty glob or directory, or a missing path, is an
error that names the config field and the entry (before anything heavy runs). `holdout_split` splits a small
set into train and eval files.
"""

from __future__ import annotations

import glob
import json
import os
import random
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


def holdout_split(files: list[str], out_dir: str, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle the records of `files` (seeded) and write the first n_eval to eval.jsonl, the rest to
    train.jsonl under out_dir; redone only when the inputs change. For small datasets: it reads every record."""
    from r1jax.data.sources import iterate_records  # noqa: PLC0415

    train_path, eval_path = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "eval.jsonl")
    spec_path = os.path.join(out_dir, "split.json")
    spec = {"files": [os.path.abspath(f) for f in files], "n_eval": n_eval, "seed": seed}
    if os.path.isfile(spec_path):
        with open(spec_path) as f:
            if json.load(f) == spec:
                return [train_path], [eval_path]
    records = list(iterate_records(files))
    if n_eval >= len(records):
        raise ValueError(f"data.eval_holdout={n_eval} but {files} hold only {len(records)} records")
    random.Random(seed).shuffle(records)
    os.makedirs(out_dir, exist_ok=True)
    for path, part in ((eval_path, records[:n_eval]), (train_path, records[n_eval:]), (spec_path, None)):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            if part is None:
                json.dump(spec, f)
            else:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        os.replace(path + ".tmp", path)
    return [train_path], [eval_path]
