"""Compile time versus depth: train step (forward + backward) and decode step, for 4, 16 and 61 layers.

    python -m r1jax.bench.compile [--preset tiny_moe] [--depths 4,16,61] [--out bench_results.jsonl]

Layers are stacked and run with lax.scan, so the compiled program (and compile time) should not grow with
depth; the table shows compile seconds and the optimized HLO size per depth, and the ratio to the shallowest.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from r1jax import models as M
from r1jax.bench.common import append_result, print_table
from r1jax.host import ensure_malloc_tunables


def _train_step(cfg):
    def loss(params, tokens):
        logits, aux = M.forward(params, tokens, cfg)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean() + aux["aux_loss"]

    return jax.jit(jax.value_and_grad(loss))


def compile_stats(cfg, batch: int = 2, seq: int = 64) -> dict:
    """Seconds to lower+compile the train step and the decode step, and their optimized HLO sizes (lines)."""
    params = M.abstract_params(cfg)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    out = {}
    t = time.perf_counter()
    compiled = _train_step(cfg).lower(params, tokens).compile()
    out["train_compile_s"] = time.perf_counter() - t
    out["train_hlo_lines"] = compiled.as_text().count("\n")
    cache = jax.eval_shape(lambda: M.init_cache(cfg, batch, seq))
    step = jax.jit(lambda p, tok, c: M.decode_step(p, tok, cfg, c))
    t = time.perf_counter()
    compiled = step.lower(params, jax.ShapeDtypeStruct((batch,), jnp.int32), cache).compile()
    out["decode_compile_s"] = time.perf_counter() - t
    out["decode_hlo_lines"] = compiled.as_text().count("\n")
    return out


def depth_config(preset: str, depth: int):
    base = M.get_preset(preset)
    return base.replace(n_layers=depth, n_dense_layers=min(base.n_dense_layers, depth - 1) if base.is_moe else depth)


def main(argv=None):
    ap = argparse.ArgumentParser(description="compile time vs depth")
    ap.add_argument("--preset", default="tiny_moe")
    ap.add_argument("--depths", default="4,16,61")
    ap.add_argument("--out", default="bench_results.jsonl")
    args = ap.parse_args(argv)
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        rows.append({"layers": depth, **compile_stats(depth_config(args.preset, depth))})
    for r in rows:
        r["train_ratio"] = r["train_compile_s"] / rows[0]["train_compile_s"]
        r["decode_ratio"] = r["decode_compile_s"] / rows[0]["decode_compile_s"]
    print_table(rows, ["layers", "train_compile_s", "train_ratio", "train_hlo_lines", "decode_compile_s",
                       "decode_ratio", "decode_hlo_lines"])
    append_result(args.out, "compile", rows, preset=args.preset)
    return rows


if __name__ == "__main__":
    ensure_malloc_tunables()  # the same process settings as `python -m r1jax.main`
    main()
