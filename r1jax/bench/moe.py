"""MoE layer cost versus the total expert count, per dispatch implementation, and the weights/compute crossover.

    python -m r1jax.bench.moe [--size tiny|100m] [--experts 8,64,256] [--tokens 8192] [--out bench_results.jsonl]

Part 1 (flatness). `models.moe.moe_layer` (router, group-limited top-k, dropless dispatch, shared expert,
balance statistics) at a fixed top-k and token count, for E = 8, 64, 256 routed experts, with
moe_impl = "ragged_dot" (jax.lax.ragged_dot) and "tiled" (rows padded to expert tiles, a loop over the used
tiles). Timed: forward, and forward + backward (gradients for the weights and the input), medians of --runs
rounds that each time every configuration once (a shared machine's load changes hit every E alike). The
activated work per token is the same for every E, so a dropless dispatch should cost the same; `vs_E_min` is
each time over the smallest E's.
XLA:CPU lowers ragged_dot to a dense computation over all experts (cost ~ E), so on CPU a ragged_dot run whose
estimate (previous E's time x E ratio) exceeds --budget seconds is skipped and marked.

Part 2 (crossover). Forward time at E = max(--experts) over a sweep of token counts M, fitted as
t(M) = a + b M (least squares in relative error): `a` is the fixed cost (reading all E expert weights, routing
set-up), `b` the per-token compute.
The crossover M* = a / b is where compute starts to dominate reading the expert weights; the table also gives
the estimate from first principles, M*_est = (3 E D F x 4 bytes / memory bandwidth) / (6 k D F / matmul peak),
with the bandwidth (a large copy) and the peak (a 2048² matmul) measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import models
from r1jax.bench import peak as peak_lib
from r1jax.bench.common import append_result, median_time, print_table, tune_cpu_runtime
from r1jax.host import ensure_malloc_tunables
from r1jax.models import ModelConfig
from r1jax.models.moe import moe_layer

IMPLS = ("ragged_dot", "tiled")


@dataclasses.dataclass(frozen=True)
class Size:
    d_model: int
    moe_d_ff: int
    top_k: int
    tokens: int
    sweep: tuple[int, ...]  # token counts of the crossover fit


SIZES = {
    "tiny": Size(d_model=128, moe_d_ff=64, top_k=8, tokens=8192, sweep=(64, 256, 1024, 4096, 16384)),
    "100m": Size(d_model=768, moe_d_ff=256, top_k=8, tokens=8192, sweep=(64, 256, 1024, 4096, 16384)),
}


def layer_config(size: Size, n_experts: int, impl: str) -> ModelConfig:
    """One MoE layer, V3-style (sigmoid router, normalised top-k, 1 shared expert); no group limit, so the
    routing rule is the same for every E."""
    return ModelConfig(vocab_size=8, d_model=size.d_model, n_layers=1, d_ff=size.moe_d_ff, n_dense_layers=0,
                       attention="mla", n_heads=1, q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=8,
                       qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=n_experts, n_shared_experts=1,
                       n_experts_per_tok=size.top_k, moe_d_ff=size.moe_d_ff, routed_scaling_factor=2.5,
                       moe_impl=impl)


def layer_params(cfg: ModelConfig, seed: int = 0):
    """The MoE block's params (router, experts, shared expert) with the model's own initialisation."""
    params = models.init(cfg, jax.random.PRNGKey(seed))
    return jax.tree.map(lambda a: a[0], params["moe"]["mlp"])


def layer_fns(cfg: ModelConfig):
    """(forward, forward+backward) jitted over (params, x [1, M, D])."""

    def fwd(p, x):
        y, _ = moe_layer(p, x, jnp.ones(x.shape[:2], bool), cfg)
        return y

    def loss(p, x, ct):
        return jnp.sum(fwd(p, x) * ct)

    grad = jax.grad(loss, argnums=(0, 1))
    return jax.jit(fwd), jax.jit(grad)


def _inputs(size: Size, tokens: int, seed: int = 1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(k1, (1, tokens, size.d_model), jnp.float32)
    return x, jax.random.normal(k2, x.shape, jnp.float32)


def flatness(size: Size, experts: list[int], impls, *, runs: int, budget: float) -> list[dict]:
    """Forward and forward+backward per (impl, E). The runs are interleaved (each round times every
    configuration once), so that a change of load on a shared machine hits every E alike; medians."""
    rows, calls = [], []
    x, ct = _inputs(size, size.tokens)
    for impl in impls:
        prev = None
        for e in experts:
            row = {"impl": impl, "experts": e, "top_k": size.top_k, "tokens": size.tokens}
            rows.append(row)
            if prev is not None and prev[1] * e / prev[0] > budget:
                row["skipped"] = f"est {prev[1] * e / prev[0]:.0f}s/call > budget {budget:.0f}s"
                continue
            cfg = layer_config(size, e, impl)
            p = layer_params(cfg)
            fwd, grad = layer_fns(cfg)
            call_fwd, call_grad = functools.partial(fwd, p, x), functools.partial(grad, p, x, ct)
            prev = (e, median_time(call_grad, warmup=1, runs=1))  # compiles; the estimate for the next E
            jax.block_until_ready(call_fwd())  # compiles
            calls.append((row, call_fwd, call_grad))
    times = {id(row): ([], []) for row, _, _ in calls}
    for _ in range(runs):
        for row, call_fwd, call_grad in calls:
            times[id(row)][0].append(median_time(call_fwd, warmup=0, runs=1))
            times[id(row)][1].append(median_time(call_grad, warmup=0, runs=1))
    for row, _, _ in calls:
        row["fwd_ms"], row["fwd_bwd_ms"] = (1e3 * statistics.median(t) for t in times[id(row)])
    for impl in impls:
        timed = [r for r in rows if r["impl"] == impl and "fwd_ms" in r]
        for r in timed:
            r["fwd_vs_E_min"] = r["fwd_ms"] / timed[0]["fwd_ms"]
            r["fwd_bwd_vs_E_min"] = r["fwd_bwd_ms"] / timed[0]["fwd_bwd_ms"]
    return rows


def memory_bandwidth(n_bytes: int = 64 * 2**20) -> float:
    """Bytes/s of a jitted elementwise pass over a large array (read + write)."""
    a = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    return 2 * n_bytes / median_time(lambda: f(a), warmup=2, runs=5)


def crossover(size: Size, n_experts: int, impls, *, runs: int, budget: float, peak: float, bandwidth: float):
    """Forward time over the token sweep, the fit t = a + b M, and M* = a / b, per impl."""
    flops_per_token = 6 * size.top_k * size.d_model * size.moe_d_ff
    weight_bytes = 3 * n_experts * size.d_model * size.moe_d_ff * 4
    estimate = (weight_bytes / bandwidth) / (flops_per_token / peak)
    rows = []
    for impl in impls:
        cfg = layer_config(size, n_experts, impl)
        p = layer_params(cfg)
        fwd, _ = layer_fns(cfg)
        pts = []
        for m in size.sweep:
            if pts and pts[-1][1] * m / pts[-1][0] > budget:  # the next point would take too long
                break
            x, _ = _inputs(size, m)
            jax.block_until_ready(fwd(p, x))  # compile
            pts.append((m, median_time(lambda: fwd(p, x), warmup=0, runs=runs)))
        ms, ts = np.array([q[0] for q in pts], float), np.array([q[1] for q in pts])
        # relative residuals: the sweep spans 250x in M, and a plain fit would leave the small M to noise
        b, a = np.polyfit(ms, ts, 1, w=1 / ts) if len(pts) > 1 else (float("nan"), float("nan"))
        rows.append({"impl": impl, "experts": n_experts, "top_k": size.top_k,
                     "sweep_ms": {int(m): round(1e3 * t, 3) for m, t in pts},
                     "fixed_ms": 1e3 * a, "per_1k_tokens_ms": 1e6 * b,
                     "crossover_tokens": a / b if b > 0 else None,
                     "weights_read_ms_est": 1e3 * weight_bytes / bandwidth, "crossover_tokens_est": estimate})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="MoE layer cost vs expert count; dispatch crossover")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--experts", default="8,64,256")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--tokens", type=int, default=0, help="override the size's token count (part 1)")
    ap.add_argument("--sweep", default="", help="override the crossover token counts, e.g. 64,1024")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget", type=float, default=20.0, help="skip calls estimated slower than this (s)")
    ap.add_argument("--no-crossover", action="store_true")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak measurement")
    ap.add_argument("--out", default="bench_results.jsonl")
    args = ap.parse_args(argv)
    tune_cpu_runtime()
    size = SIZES[args.size]
    size = dataclasses.replace(size, tokens=args.tokens or size.tokens,
                               sweep=tuple(int(m) for m in args.sweep.split(",")) if args.sweep else size.sweep)
    experts = [int(e) for e in args.experts.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    rows = flatness(size, experts, impls, runs=args.runs, budget=args.budget)
    print(f"MoE layer, D={size.d_model} F={size.moe_d_ff} top-k={size.top_k}, {size.tokens} tokens, "
          f"backend {jax.default_backend()}")
    print_table(rows, ["impl", "experts", "fwd_ms", "fwd_vs_E_min", "fwd_bwd_ms", "fwd_bwd_vs_E_min", "skipped"])
    extra = {"size": args.size, "d_model": size.d_model, "moe_d_ff": size.moe_d_ff}
    cross = []
    if not args.no_crossover:
        peak = peak_lib.jax_peak(args.peak_n)
        bandwidth = memory_bandwidth()
        cross = crossover(size, max(experts), impls, runs=args.runs, budget=args.budget, peak=peak,
                          bandwidth=bandwidth)
        print(f"\ncrossover at E={max(experts)} (forward; matmul peak {peak / 1e9:.1f} GFLOP/s, "
              f"bandwidth {bandwidth / 1e9:.1f} GB/s)")
        print_table(cross, ["impl", "fixed_ms", "per_1k_tokens_ms", "crossover_tokens", "weights_read_ms_est",
                            "crossover_tokens_est", "sweep_ms"])
        extra.update(peak_flops=peak, bandwidth_bytes_s=bandwidth, crossover=cross)
    append_result(args.out, "moe", rows, **extra)
    return rows, cross


if __name__ == "__main__":
    ensure_malloc_tunables()  # the same process settings as `python -m r1jax.main`
    main()
