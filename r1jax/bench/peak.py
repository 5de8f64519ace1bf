"""The machine's measured matmul peak: one n x n @ n x n matmul (default 2048², f32) in jax and in torch.

    python -m r1jax.bench.peak [--n 2048] [--dtype float32] [--out bench_results.jsonl]

The other benches divide their achieved FLOP/s by these numbers (measured in the same run, so a busy machine
lowers both). FLOPs of one matmul = 2 n³.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from r1jax.bench.common import append_result, median_time, print_table, torch_device, torch_sync
from r1jax.host import ensure_malloc_tunables


def jax_peak(n: int = 2048, dtype: str = "float32", runs: int = 10) -> float:
    """FLOP/s of a jitted [n,n] @ [n,n] on jax's default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / median_time(lambda: mm(a, b), warmup=2, runs=runs)


def torch_peak(n: int = 2048, dtype: str = "float32", runs: int = 10, device: str | None = None) -> float:
    """FLOP/s of torch.mm at the same size, on `device` (default: cuda if available, else cpu)."""
    import torch

    device = device or torch_device()
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    return 2 * n**3 / median_time(lambda: torch_sync(torch.mm(a, b)), warmup=2, runs=runs)


def measure(n: int = 2048, dtype: str = "float32", runs: int = 10) -> dict:
    """{"jax_peak_flops", "torch_peak_flops"} (torch omitted when it is not installed)."""
    out = {"peak_n": n, "peak_dtype": dtype, "jax_peak_flops": jax_peak(n, dtype, runs)}
    try:
        out["torch_peak_flops"] = torch_peak(n, dtype, runs)
    except ImportError:
        pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="matmul peak FLOP/s in jax and torch")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default="bench_results.jsonl")
    args = ap.parse_args(argv)
    peak = measure(args.n, args.dtype, args.runs)
    rows = [{"impl": k.split("_")[0], "GFLOP/s": v / 1e9} for k, v in peak.items() if k.endswith("_flops")]
    print_table(rows, ["impl", "GFLOP/s"])
    append_result(args.out, "peak", rows, **peak)
    return peak


if __name__ == "__main__":
    ensure_malloc_tunables()  # the same process settings as `python -m r1jax.main`
    main()
