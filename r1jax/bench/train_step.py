"""Train step, r1jax versus PyTorch + transformers, side by side in one run.

    python -m r1jax.bench.train_step [--size tiny|100m] [--runs 5] [--out bench_results.jsonl]

One train step = forward + backward + global-norm clip + AdamW update over the same batch, for a DeepSeek-V3
model (MLA + DeepSeekMoE) and a dense Llama-style model:
  r1jax    the SFT step users run (`r1jax.train.step.make_train_step` with `r1jax.train.optimizer`), jitted,
           state donated.
  PyTorch  the same weights (`save_hf_checkpoint` -> `from_pretrained`), the same batch, next-token
           cross-entropy, `clip_grad_norm_`, `torch.optim.AdamW` (fused when torch has it, else foreach),
           `torch.set_num_threads(cores)`. Every attention implementation (eager, sdpa) and, for the MoE,
           every experts implementation of transformers (eager, batched_mm, grouped_mm) is timed first and
           the fastest combination is the baseline (the table names it).
Both compute in the same dtype (fp32 on CPU; `--dtype bfloat16` = bf16 compute over fp32 master weights:
r1jax's ModelConfig.dtype, torch autocast). MTP is off (transformers does not implement it); the balance
loss is off on both sides. The first step's loss of both sides is printed: equal losses show the same work.

r1jax runs its fastest remat policy on CPU (`--remat dots`: save the matmul outputs, recompute the
elementwise work; measured 10-20% faster than "none" on the MoE step), as torch runs its fastest attention.

Steps alternate r1jax / torch so that load from other processes hits both alike; the table reports the
median step time (and min..max over the runs) and tokens/s, r1jax's speed-up, the same ratio in CPU seconds
per step (`cpu_speedup`: robust to other processes on shared cores), and the achieved model FLOP/s
(analytic: 6 x activated matmul parameters x tokens + attention) against a 2048² matmul peak measured in the
same run by each framework. Both sides get `common.tune_cpu_runtime()` (malloc keeps freed memory; torch's
OpenMP threads sleep instead of spinning) and, as a command, the huge-page malloc tunable of `r1jax.host`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import tempfile
import time

import jax
import ml_collections as mlc
import numpy as np

from r1jax import models
from r1jax.bench import peak as peak_lib
from r1jax.bench.common import (TorchImplementations, append_result, print_table, spread, torch_device,
                                torch_sync, tune_cpu_runtime, cpu_seconds)
from r1jax.hf import save_hf_checkpoint
from r1jax.host import ensure_malloc_tunables
from r1jax.models import ModelConfig
from r1jax.sharding import DEFAULT_RULES, make_mesh
from r1jax.train import optimizer as opt_lib
from r1jax.train import state as state_lib
from r1jax.train import step as step_lib

# AdamW as both sides run it: constant LR, decoupled weight decay, global-norm clipping.
OPTIMIZER = dict(lr=1e-4, warmup_steps=0, schedule="constant", end_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.1, clip_norm=1.0)


def _llama_100m() -> ModelConfig:
    """~125M-parameter dense Llama-style model (GPT-2 small widths, Llama-3 layout): D=768, 12 layers."""
    return ModelConfig(vocab_size=32000, d_model=768, n_layers=12, d_ff=2048, n_dense_layers=12, attention="gqa",
                       n_heads=12, n_kv_heads=4, head_dim=64, max_position_embeddings=2048)


def _deepseek_100m() -> ModelConfig:
    """DeepSeek-V3 layout with the same activated MLP width as `_llama_100m` (6 routed + 2 shared experts of
    width 256 = 2048), MLA attention, 1 dense + 11 MoE layers of 32 experts (~280M total parameters)."""
    return ModelConfig(vocab_size=32000, d_model=768, n_layers=12, d_ff=2048, n_dense_layers=1, attention="mla",
                       n_heads=12, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                       v_head_dim=64, n_routed_experts=32, n_shared_experts=2, n_experts_per_tok=6, moe_d_ff=256,
                       n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_interleave=True,
                       max_position_embeddings=2048)


@dataclasses.dataclass(frozen=True)
class Size:
    batch: int
    seq: int
    models: tuple[tuple[str, ModelConfig], ...]


SIZES = {
    "tiny": lambda: Size(8, 128, (
        ("deepseek_v3", models.get_preset("tiny_moe", mtp_depth=0)),
        ("llama", models.get_preset("tiny_dense", qkv_bias=False)))),
    "100m": lambda: Size(2, 256, (("deepseek_v3", _deepseek_100m()), ("llama", _llama_100m()))),
}


# --------------------------------------------------------------------------------------------- FLOPs

def model_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one train step (forward + backward = 3x forward): 6 x activated matmul parameters x tokens
    (routed experts count k/E of their weights; the embedding lookup is not a matmul, a tied head is) plus the
    attention products QK^T and PV over the full T x T scores (neither side skips the masked half on CPU)."""
    matmul = 0
    for path, spec in jax.tree_util.tree_flatten_with_path(models.param_specs(cfg),
                                                          is_leaf=lambda x: isinstance(x, models.ParamSpec))[0]:
        keys = [k.key for k in path]
        if spec.init != "normal" or keys == ["embed"] or "mtp" in keys:
            continue
        n = math.prod(spec.shape)
        if keys[0] == "moe" and keys[-1] in ("w_gate", "w_up", "w_down") and "shared" not in keys:
            n = n * cfg.n_experts_per_tok // cfg.n_routed_experts
        matmul += n
    if cfg.tie_embeddings:
        matmul += cfg.vocab_size * cfg.d_model
    tokens = batch * seq
    qk, v = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.attention == "mla" else (cfg.head_dim, cfg.head_dim)
    attn = 2 * batch * seq * seq * cfg.n_heads * (qk + v) * cfg.n_layers
    return 6.0 * matmul * tokens + 3.0 * attn


# ------------------------------------------------------------------------------------------- batches

def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One unpacked document per row, every position trained (the packing contract of r1jax.train.step)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


# ---------------------------------------------------------------------------------------------- r1jax

class R1jaxStep:
    """The real SFT step on one device. `initial` = host copy of the weights before any update; `metrics` = the
    first (compiling) step's metrics; `step()` runs one more update."""

    def __init__(self, cfg: ModelConfig, batch: dict[str, np.ndarray], seed: int = 0):
        mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
        tx, schedule = opt_lib.make_optimizer(mlc.ConfigDict(OPTIMIZER), cfg, total_steps=10**6)
        shardings = state_lib.state_shardings(cfg, tx, mesh, DEFAULT_RULES)
        self.step_fn = step_lib.make_train_step(cfg, tx, schedule, micro_batches=1, mesh=mesh, rules=DEFAULT_RULES,
                                                shardings=shardings, batch_shape=batch["inputs"].shape)
        self.state = state_lib.init_state(cfg, tx, seed, shardings)
        self.initial = jax.device_get(self.state.params)  # the state is donated by every step
        self.batch = step_lib.put_batch(batch, self.step_fn.batch_shardings)
        t = time.perf_counter()
        self.metrics = jax.block_until_ready(self._run())
        self.compile_s = time.perf_counter() - t

    def _run(self):
        self.state, metrics = self.step_fn(self.state, self.batch)
        return metrics

    def step(self):
        jax.block_until_ready((self._run(), self.state))


# ---------------------------------------------------------------------------------------------- torch

class TorchStep(TorchImplementations):
    """transformers model + torch AdamW over the same batch. `step()` runs one update and returns the loss."""

    def __init__(self, hf_dir: str, batch: dict[str, np.ndarray], dtype: str, device: str):
        import torch
        import transformers

        self.torch = torch
        self.device = device
        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
        self.model.train()
        self.is_moe = getattr(self.model.config, "n_routed_experts", None) is not None
        self.inputs = torch.from_numpy(batch["inputs"]).long().to(device)
        self.targets = torch.from_numpy(batch["targets"]).long().to(device).reshape(-1)
        self.autocast = dtype == "bfloat16"
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        kw = dict(lr=OPTIMIZER["lr"], betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]), eps=OPTIMIZER["eps"],
                  weight_decay=OPTIMIZER["weight_decay"])
        try:
            self.opt = torch.optim.AdamW(params, fused=True, **kw)
            self.fused = True
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(params, foreach=True, **kw)
            self.fused = False

    def step(self) -> float:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=self.inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), self.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, OPTIMIZER["clip_norm"])
        self.opt.step()
        torch_sync()
        return loss


# ------------------------------------------------------------------------------------------- compare

def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _timed_cpu(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    t, c = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - t, cpu_seconds() - c


def pick_torch_option(ts: TorchStep, runs: int = 2) -> tuple[dict, dict[str, float]]:
    """Time every attention / experts implementation; return the fastest and all median step times."""
    times = {}
    for option in ts.options():
        ts.use(option)
        ts.step()  # warm-up (lazy init, allocator)
        times["/".join(option.values())] = float(np.median([_timed(ts.step) for _ in range(runs)]))
    best = min(times, key=times.get)
    return next(o for o in ts.options() if "/".join(o.values()) == best), times


def compare(name: str, cfg: ModelConfig, size: Size, *, runs: int, warmup: int, dtype: str, peaks: dict,
            remat: str, torch_impl: str = "", seed: int = 0) -> dict:
    cfg = cfg.replace(dtype=dtype, param_dtype="float32", remat=remat)
    batch = make_batch(cfg.vocab_size, size.batch, size.seq, seed)
    tokens = size.batch * size.seq
    rj = R1jaxStep(cfg, batch, seed)
    r1jax_loss = float(rj.metrics["loss"])
    with tempfile.TemporaryDirectory() as hf_dir:
        save_hf_checkpoint(hf_dir, cfg, rj.initial)
        del rj.initial
        ts = TorchStep(hf_dir, batch, dtype, torch_device())
    torch_loss = float(ts.step().detach())  # at the same initial weights as r1jax's first step
    if torch_impl:
        option, option_times = dict(zip(("attn", "experts") if ts.is_moe else ("attn",), torch_impl.split("/"))), {}
    else:
        option, option_times = pick_torch_option(ts)
    ts.use(option)
    for _ in range(warmup):
        rj.step()
        ts.step()
    r_times, t_times, r_cpu, t_cpu = [], [], [], []
    for _ in range(runs):  # alternate so that outside load hits both sides alike
        wall, cpu = _timed_cpu(rj.step)
        r_times.append(wall)
        r_cpu.append(cpu)
        wall, cpu = _timed_cpu(ts.step)
        t_times.append(wall)
        t_cpu.append(cpu)
    r, t = spread(r_times), spread(t_times)
    r_cpu_s, t_cpu_s = float(np.median(r_cpu)), float(np.median(t_cpu))
    flops = model_flops(cfg, size.batch, size.seq)
    counts = models.count_params(cfg)
    row = {
        "model": name, "params_M": counts["total"] / 1e6, "active_M": counts["activated"] / 1e6,
        "batch": size.batch, "seq": size.seq, "dtype": dtype,
        "r1jax_tok_s": tokens / r["median"], "torch_tok_s": tokens / t["median"],
        "speedup": t["median"] / r["median"], "cpu_speedup": t_cpu_s / r_cpu_s,
        "r1jax_cpu_ms": 1e3 * r_cpu_s, "torch_cpu_ms": 1e3 * t_cpu_s, "r1jax_remat": remat,
        "r1jax_ms": 1e3 * r["median"], "r1jax_ms_range": f"{1e3 * r['min']:.4g}..{1e3 * r['max']:.4g}",
        "torch_ms": 1e3 * t["median"], "torch_ms_range": f"{1e3 * t['min']:.4g}..{1e3 * t['max']:.4g}",
        "torch_impl": "/".join(option.values()) + ("/fused-adamw" if ts.fused else "/foreach-adamw"),
        "torch_impl_ms": {k: 1e3 * v for k, v in option_times.items()},
        "model_gflop": flops / 1e9,
        "r1jax_gflop_s": flops / r["median"] / 1e9, "torch_gflop_s": flops / t["median"] / 1e9,
        "r1jax_peak_frac": flops / r["median"] / peaks["jax_peak_flops"],
        "torch_peak_frac": flops / t["median"] / peaks["torch_peak_flops"],
        "r1jax_loss0": r1jax_loss, "torch_loss0": torch_loss, "r1jax_compile_s": rj.compile_s,
        "r1jax_step_s": r_times, "torch_step_s": t_times,
    }
    del ts, rj
    gc.collect()
    return row


COLUMNS = ["model", "params_M", "active_M", "r1jax_tok_s", "torch_tok_s", "speedup", "r1jax_ms", "r1jax_ms_range",
           "torch_ms", "torch_ms_range", "cpu_speedup", "torch_impl", "r1jax_remat", "r1jax_peak_frac", "torch_peak_frac", "r1jax_loss0",
           "torch_loss0"]


def default_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def main(argv=None):
    ap = argparse.ArgumentParser(description="train step: r1jax vs PyTorch/transformers")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--models", default="", help="comma-separated subset of the size's models (default: all)")
    ap.add_argument("--batch", type=int, default=0, help="override the size's batch")
    ap.add_argument("--seq", type=int, default=0, help="override the size's sequence length")
    ap.add_argument("--layers", type=int, default=0, help="override the models' depth (MoE models keep 1 dense layer)")
    ap.add_argument("--dtype", default="", help="float32 | bfloat16 (default: float32 on CPU, else bfloat16)")
    ap.add_argument("--remat", default="dots", help="r1jax remat policy (none | dots | dots_no_batch | full); "
                    "dots measured fastest on CPU")
    ap.add_argument("--torch-impl", default="", help="fix torch's attention[/experts] implementation, e.g. "
                    "sdpa/grouped_mm (default: time all, use the fastest)")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak measurement")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="bench_results.jsonl")
    args = ap.parse_args(argv)
    tune_cpu_runtime()
    size = SIZES[args.size]()
    size = dataclasses.replace(size, batch=args.batch or size.batch, seq=args.seq or size.seq)
    wanted = [m for m in args.models.split(",") if m]
    dtype = args.dtype or default_dtype()
    peaks = peak_lib.measure(args.peak_n, "float32")
    if dtype != "float32":
        peaks = {**peaks, **{k: v for k, v in peak_lib.measure(args.peak_n, dtype).items() if k.endswith("_flops")}}
    if args.layers:
        size = dataclasses.replace(size, models=tuple(
            (n, c.replace(n_layers=args.layers, n_dense_layers=min(c.n_dense_layers, 1) if c.is_moe else args.layers))
            for n, c in size.models))
    rows = [compare(name, cfg, size, runs=args.runs, warmup=args.warmup, dtype=dtype, peaks=peaks, remat=args.remat,
                    torch_impl=args.torch_impl)
            for name, cfg in size.models if not wanted or name in wanted]
    print(f"matmul peak ({args.peak_n}², {dtype}): jax {peaks['jax_peak_flops'] / 1e9:.1f} GFLOP/s, "
          f"torch {peaks['torch_peak_flops'] / 1e9:.1f} GFLOP/s; batch {size.batch} x seq {size.seq}")
    print_table(rows, COLUMNS)
    append_result(args.out, "train_step", rows, size=args.size, **peaks)
    return rows


if __name__ == "__main__":
    ensure_malloc_tunables()  # the same process settings as `python -m r1jax.main`
    main()
