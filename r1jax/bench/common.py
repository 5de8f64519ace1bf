"""Shared benchmark plumbing: timing (warm-up, median of runs), a printed table, a JSON-lines results file."""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable, Sequence

import jax


def block(x):
    return jax.block_until_ready(x)


def median_time(fn: Callable[[], object], *, warmup: int = 1, runs: int = 5) -> float:
    """Median wall seconds of fn() over `runs` calls after `warmup` calls (results are blocked on)."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> dict:
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": dev.device_kind, "n_devices": jax.device_count(),
            "host": platform.node(), "jax": jax.__version__}


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def append_result(path: str, name: str, rows: Sequence[dict], **extra) -> None:
    """Append one JSON line {bench, time, machine, rows, ...} to `path`."""
    record = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "rows": list(rows), **extra}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
