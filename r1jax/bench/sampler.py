"""Group sampling throughput, r1jax's sampler versus transformers `generate`, side by side in one run.

    python -m r1jax.bench.sampler [--size tiny|100m] [--prompts 8] [--group 8] [--new 128] [--runs 5] \
        [--out bench_results.jsonl]

The GRPO rollout workload: B prompts (random tokens, all --prompt_len long, so neither side pads), G samples
each at temperature 1 (no top-k / top-p), exactly --new tokens per sample (EOS can not end a row early on
either side), on the same random weights:
  r1jax         `r1jax.rl.sampler.make_sampler`: B prefills, the cache repeated G times, one jitted
                while_loop over the MLA latent cache (GQA K/V for the dense model).
  transformers  the same weights (`save_hf_checkpoint` -> `from_pretrained`), `generate(do_sample=True,
                num_return_sequences=G, top_k=0, min_new_tokens=max_new_tokens=new)` with its KV cache,
                under `torch.inference_mode`; every attention implementation (eager, sdpa) and, for the MoE,
                experts implementation (eager, batched_mm, grouped_mm) is timed and the fastest is the baseline.
Runs alternate r1jax / transformers after warm-up; the table shows the median wall time of one whole
generation (prefill included) as generated tokens per second, and the speed-up. It also reports the values
cached per token per layer by both sides, read off the cache arrays: r1jax's MLA cache must hold exactly
kv_lora_rank + qk_rope_head_dim (576 at full size); transformers 5's DeepSeek-V3 also caches the latent.
The same command runs on GPU / TPU (jax's default backend, torch on cuda when present, bf16 compute there).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import jax
import numpy as np

from r1jax import models
from r1jax.bench.common import (TorchImplementations, append_result, print_table, spread, torch_device,
                                torch_sync, tune_cpu_runtime)
from r1jax.bench.train_step import SIZES, default_dtype
from r1jax.hf import save_hf_checkpoint
from r1jax.host import ensure_malloc_tunables
from r1jax.models import ModelConfig
from r1jax.rl import sampler as sampler_lib


def cache_values_per_token(cfg: ModelConfig) -> int:
    """Values one token occupies in one layer of r1jax's decode cache, read off `init_cache`'s arrays."""
    cache = jax.eval_shape(lambda: models.init_cache(cfg, 1, 1))  # one row, one slot
    layers = cache["dense"] if "dense" in cache else cache["moe"]
    return sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(layers))  # [L, ...] -> per layer


class R1jaxSampler:
    def __init__(self, cfg: ModelConfig, params, prompts: np.ndarray, group: int, new: int, seed: int = 0):
        spec = sampler_lib.SamplerSpec(sampler_lib.Temperature(1.0), group_size=group, max_new_tokens=new,
                                       eos_id=cfg.vocab_size)  # an id that is never sampled: every row runs to `new`
        self.fn = sampler_lib.make_sampler(cfg, spec)
        self.params = jax.device_put(params)
        self.prompts = jax.device_put(prompts)
        self.lengths = jax.device_put(np.full((prompts.shape[0],), prompts.shape[1], np.int32))
        self.key = jax.random.PRNGKey(seed)
        t = time.perf_counter()
        self.out = self.run()
        self.compile_s = time.perf_counter() - t

    def run(self):
        self.key, key = jax.random.split(self.key)
        return jax.block_until_ready(self.fn(self.params, self.prompts, self.lengths, key))


class HFSampler(TorchImplementations):
    def __init__(self, hf_dir: str, prompts: np.ndarray, group: int, new: int, dtype: str, device: str):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32).to(device).eval()
        self.is_moe = getattr(self.model.config, "n_routed_experts", None) is not None
        self.inputs = torch.from_numpy(prompts).long().to(device)
        self.kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=group,
                       max_new_tokens=new, min_new_tokens=new, use_cache=True, pad_token_id=0)

    def run(self):
        with self.torch.inference_mode():
            out = self.model.generate(self.inputs, attention_mask=self.torch.ones_like(self.inputs), **self.kw)
        return torch_sync(out)

    def cache_values_per_token(self) -> int:
        """Values per token per layer in transformers' cache after one forward (keys + values of layer 0)."""
        with self.torch.inference_mode():
            cache = self.model(self.inputs[:1, :2], use_cache=True).past_key_values
        layer = cache.layers[0]
        return int(np.prod(layer.keys.shape[1:]) // layer.keys.shape[2] + np.prod(layer.values.shape[1:])
                   // layer.values.shape[2])


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(name: str, cfg: ModelConfig, *, prompts: int, group: int, new: int, prompt_len: int, runs: int,
            warmup: int, dtype: str, seed: int = 0) -> dict:
    cfg = cfg.replace(dtype=dtype, param_dtype="float32", max_position_embeddings=max(cfg.max_position_embeddings,
                                                                                     prompt_len + new))
    params = models.init(cfg, jax.random.PRNGKey(seed))
    prompt_bp = np.random.default_rng(seed).integers(4, cfg.vocab_size, (prompts, prompt_len)).astype(np.int32)
    rj = R1jaxSampler(cfg, params, prompt_bp, group, new, seed)
    assert rj.out.tokens.shape == (prompts * group, new) and bool((rj.out.lengths == new).all())
    with tempfile.TemporaryDirectory() as hf_dir:
        save_hf_checkpoint(hf_dir, cfg, jax.device_get(params))
        hf = HFSampler(hf_dir, prompt_bp, group, new, dtype, torch_device())
    option_times = {}
    for option in hf.options():  # the fastest transformers implementation is the baseline
        hf.use(option)
        hf.run()
        option_times["/".join(option.values())] = float(np.median([_timed(hf.run) for _ in range(2)]))
    best = min(option_times, key=option_times.get)
    hf.use(next(o for o in hf.options() if "/".join(o.values()) == best))
    generated = hf.run()
    assert tuple(generated.shape) == (prompts * group, prompt_len + new), generated.shape
    for _ in range(warmup):
        rj.run()
        hf.run()
    r_times, h_times = [], []
    for _ in range(runs):  # alternate so that outside load hits both sides alike
        r_times.append(_timed(rj.run))
        h_times.append(_timed(hf.run))
    r, h = spread(r_times), spread(h_times)
    tokens = prompts * group * new
    cached = cache_values_per_token(cfg)
    expected = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.attention == "mla" else 2 * cfg.n_kv_heads * cfg.head_dim
    row = {
        "model": name, "attention": cfg.attention, "params_M": models.count_params(cfg)["total"] / 1e6,
        "prompts": prompts, "group": group, "new_tokens": new, "prompt_len": prompt_len, "dtype": dtype,
        "r1jax_tok_s": tokens / r["median"], "hf_tok_s": tokens / h["median"], "speedup": h["median"] / r["median"],
        "r1jax_s": r["median"], "r1jax_s_range": f"{r['min']:.4g}..{r['max']:.4g}",
        "hf_s": h["median"], "hf_s_range": f"{h['min']:.4g}..{h['max']:.4g}", "hf_impl": best,
        "hf_impl_s": option_times, "r1jax_compile_s": rj.compile_s,
        "cache_per_token": cached, "cache_per_token_expected": expected, "cache_ok": cached == expected,
        "hf_cache_per_token": hf.cache_values_per_token(), "r1jax_runs_s": r_times, "hf_runs_s": h_times,
    }
    del hf, rj
    gc.collect()
    return row


COLUMNS = ["model", "attention", "params_M", "r1jax_tok_s", "hf_tok_s", "speedup", "r1jax_s_range", "hf_s_range",
           "hf_impl", "cache_per_token", "cache_ok", "hf_cache_per_token"]


def main(argv=None):
    ap = argparse.ArgumentParser(description="group sampling: r1jax sampler vs transformers generate")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES), help="model size (as r1jax.bench.train_step)")
    ap.add_argument("--models", default="", help="comma-separated subset of the size's models (default: all)")
    ap.add_argument("--prompts", type=int, default=8, help="B prompts")
    ap.add_argument("--group", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--new", type=int, default=128, help="new tokens per sample")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--dtype", default="", help="float32 | bfloat16 (default: float32 on CPU, else bfloat16)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="bench_results.jsonl")
    args = ap.parse_args(argv)
    tune_cpu_runtime()
    wanted = [m for m in args.models.split(",") if m]
    dtype = args.dtype or default_dtype()
    rows = [compare(name, cfg, prompts=args.prompts, group=args.group, new=args.new, prompt_len=args.prompt_len,
                    runs=args.runs, warmup=args.warmup, dtype=dtype)
            for name, cfg in SIZES[args.size]().models if not wanted or name in wanted]
    print(f"{args.prompts} prompts x {args.group} samples x {args.new} new tokens (prompt {args.prompt_len}), "
          f"temperature 1, {dtype}; tokens/s = generated tokens / median wall time of a whole generation")
    print_table(rows, COLUMNS)
    append_result(args.out, "sampler", rows, size=args.size)
    return rows


if __name__ == "__main__":
    ensure_malloc_tunables()  # the same process settings as `python -m r1jax.main`
    main()
