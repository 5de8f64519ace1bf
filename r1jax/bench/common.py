"""Shared benchmark plumbing: timing (warm-up, median of runs), a printed table, a JSON-lines results file."""

from __future__ import annotations

import json
import os
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


def tune_cpu_runtime() -> None:
    """Process settings that both sides of a CPU comparison get (call before torch is imported):

    * glibc malloc keeps freed memory (no mmap for big blocks, no trimming). By default every large buffer an
      XLA or torch step allocates is a fresh mmap, so each step page-faults its whole working set again
      (12k faults = 48 MB per tiny train step here); with this, ~0.
    * OMP_WAIT_POLICY=PASSIVE (unless set): torch's OpenMP threads sleep at barriers instead of spinning. On a
      machine whose cores are shared with other processes, spinning threads wait for descheduled peers and
      torch's step slowed 10-40x here; XLA's own thread pool does not use OpenMP.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def torch_device() -> str:
    """Where the torch side of a comparison runs: cuda when available, else cpu (with one thread per core)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(cpu_cores())
    return "cpu"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_sync(x=None):
    """Wait for queued torch work (a no-op on CPU); returns x so it can wrap a timed call."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads): a step's CPU time is robust to other
    processes competing for the cores, where its wall time is not."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def spread(times: Sequence[float]) -> dict:
    """Median, min and max of a list of seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def machine() -> dict:
    dev = jax.devices()[0]
    out = {"backend": jax.default_backend(), "device": dev.device_kind, "n_devices": jax.device_count(),
           "cpu_cores": cpu_cores(), "host": platform.node(), "jax": jax.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    return out


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


class TorchImplementations:
    """The transformers-side options a benchmark tries, fastest kept as the baseline: every attention
    implementation and, for MoE models, every experts implementation. Needs self.model and self.is_moe."""

    def options(self) -> list[dict]:
        attn = [{"attn": a} for a in ("eager", "sdpa")]
        if not self.is_moe:
            return attn
        experts = ["eager", "batched_mm", "grouped_mm"]
        if batched_mm_bytes(self.model.config, int(self.inputs.numel())) > available_memory() / 8:
            experts.remove("batched_mm")  # it would not fit: a fair baseline, not a killed process
        return [{**a, "experts": e} for a in attn for e in experts]

    def use(self, option: dict):
        self.model.set_attn_implementation(option["attn"])
        if "experts" in option:
            self.model.set_experts_implementation(option["experts"])


def batched_mm_bytes(config, tokens: int, itemsize: int = 4) -> int:
    """Bytes of the expert weights transformers' `batched_mm` experts gather per routed token in one MoE layer
    (gate, up and down of each of tokens x top-k rows), which its backward keeps for every layer. At the 100m bench
    size (512 tokens x top-6, D 768, F 256) that is 7 GB a layer: the process ran out of a 24 GB machine."""
    d, f = config.hidden_size, config.moe_intermediate_size
    return tokens * config.num_experts_per_tok * 3 * d * f * itemsize


def available_memory() -> int:
    """Physical memory of this host in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
