"""The GRPO rollout on long-tailed lengths: the static sampler, the slot engine and transformers `generate`, side by
side in one run, at equal cache memory; and the whole GRPO step with either sampler.

    python -m r1jax.bench.rollout [--prompts 32] [--group 8] [--prompt_len 32] [--new 256] [--static_rows 32] \
        [--slots 64] [--page 16] [--runs 3] [--hf_runs 1] [--padded] [--out bench_results.jsonl]

Workload: B prompts of random tokens (all --prompt_len long), G samples each at temperature 1, on the tiny
DeepSeek-V3 (MLA) weights. Completion lengths follow an R1-like long tail, forced by a per-row stop position so
that every engine does the same work: L = clip(round(exp(N(ln(T/4), σ))), 1, T) with σ = ln 4 / 1.645, i.e.
log-normal with median T/4 and 5% of the rows reaching T (truncated); drawn once from --seed.
  static   `rl.sampler.make_sampler` over the N rows in batches of --static_rows rows (whole groups): each batch
           decodes until its longest row ends, the next starts when it is done. Its rows all have the same length
           at every step, so its decode attention reads them as one run (decode_row_groups = 1, its fastest).
  engine   `rl.engine.make_engine` with a paged cache: --slots slots over pages of --page positions, as many
           pages as fit the static batch's cache memory beside the prompt cache of all B prompts
           (`engine.pages_for_budget`); chunks of at most --chunk steps, drain down to S/8 slots; decode attention in
           the model's runs of rows sorted by length (decode_row_groups).
  engine_rows  the same engine with a cache of rows: as many slots of P + T positions as fit the same memory
           (`engine.slots_for_budget`).
  generate transformers on the same weights (`save_hf_checkpoint`), `generate(do_sample=True, top_k=0,
           num_return_sequences=G)` over the same batches as static, each row stopped at its length by a
           per-row StoppingCriteria.
Columns: generated tokens/s (the sum of the lengths / median wall time), useful share (generated tokens / slot-
steps: every slot decoded in a step counts, busy or not), peak cache memory (positions x bytes per position).
The GRPO step: rollout, a pure-Python reward over the rows, `trainer.build_batch` and its packing
(`trainer.trainer_batch`, as rl.pack does; --padded: the [N, P+T] batch), one fused update (`make_update`, μ = 1);
the same update for both samplers, so only the rollout differs. The update is also timed on the padded batch
(engine rollouts) and the forward positions of both are reported (packed R x L vs N x (P+T)).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import models
from r1jax.bench.common import append_result, print_table, spread, torch_device, torch_sync, tune_cpu_runtime
from r1jax.bench.train_step import OPTIMIZER
from r1jax.hf import save_hf_checkpoint
from r1jax.host import ensure_malloc_tunables
from r1jax.rl import engine as engine_lib
from r1jax.rl import grpo
from r1jax.rl import sampler as sampler_lib
from r1jax.rl import trainer as trainer_lib
from r1jax.sharding import DEFAULT_RULES, make_mesh
from r1jax.train import state as state_lib


def long_tail_lengths(n: int, t: int, seed: int) -> np.ndarray:
    """[N] lengths: log-normal, median T/4, P(L >= T) = 5% (z_0.95 = 1.645), clipped to [1, T]."""
    sigma = math.log(4) / 1.645
    x = np.random.default_rng(seed).normal(math.log(t / 4), sigma, n)
    return np.clip(np.round(np.exp(x)), 1, t).astype(np.int32)


def distinct_tokens(tokens_nt: np.ndarray, lengths_n: np.ndarray) -> np.ndarray:
    """The reward: share of distinct tokens in each completion (pure Python, as a host reward is)."""
    return np.asarray([len(set(row[:n].tolist())) / max(int(n), 1) for row, n in zip(tokens_nt, lengths_n)],
                      np.float32)


class Rollouts:
    """The three rollouts of one workload."""

    def __init__(self, cfg, params, prompts_bp, limit_n, group: int, new: int, static_rows: int, chunk: int,
                 slots: int = 64, page: int = 16):
        b, p = prompts_bp.shape
        self.cfg, self.params, self.prompts_bp, self.limit_n = cfg, params, prompts_bp, limit_n
        self.lengths_b = np.full((b,), p, np.int32)
        self.group, self.new = group, new
        self.per_batch = static_rows // group  # prompts per static batch
        if static_rows % group or b % self.per_batch:
            raise SystemExit(f"--static_rows={static_rows} must be whole groups of {group} dividing {b} prompts")
        spec = sampler_lib.SamplerSpec(sampler_lib.Temperature(1.0), group_size=group, max_new_tokens=new,
                                       eos_id=cfg.vocab_size)  # never sampled: the forced lengths end the rows
        # The static batch's rows all have the prompt length here, so sorting them into runs of similar length
        # (cfg.decode_row_groups) gains it nothing: it reads one run, its fastest setting.
        self.static = sampler_lib.make_sampler(cfg.replace(decode_row_groups=1), spec)
        per_position = engine_lib.cache_bytes_per_position(cfg)
        self.static_bytes = static_rows * (p + new) * per_position
        self.slots = {"engine": slots, "engine_rows": engine_lib.slots_for_budget(cfg, self.static_bytes, p, new,
                                                                                  prompts=b)}
        pages = engine_lib.pages_for_budget(cfg, self.static_bytes, page, p, b)
        self.bytes = {"static": self.static_bytes, "engine": (pages * page + b * p) * per_position,
                      "engine_rows": (self.slots["engine_rows"] * (p + new) + b * p) * per_position}
        self.engine = engine_lib.make_engine(cfg, spec, engine_lib.EngineSpec(
            slots=slots, chunk_steps=chunk, page=page, pages=pages))
        self.engine_rows = engine_lib.make_engine(cfg, spec, engine_lib.EngineSpec(
            slots=self.slots["engine_rows"], chunk_steps=chunk))
        rows = self.limit_n.reshape(-1, static_rows)
        self.static_slot_steps = int((rows.max(axis=1) * static_rows).sum())

    def run_static(self, key):
        outs = []
        k = self.per_batch
        for i in range(0, self.prompts_bp.shape[0], k):
            rows = slice(i * self.group, (i + k) * self.group)
            outs.append(self.static(self.params, self.prompts_bp[i:i + k], self.lengths_b[i:i + k],
                                    jax.random.fold_in(key, i), self.limit_n[rows]))
        outs = jax.device_get(outs)
        return sampler_lib.Completions(*(np.concatenate([getattr(o, f) for o in outs])
                                         for f in ("tokens", "logprobs", "lengths", "truncated")))

    def run_engine(self, key, engine=None):
        engine = engine or self.engine
        return jax.device_get(engine(self.params, self.prompts_bp, self.lengths_b, key, self.limit_n))


class HFGenerate:
    """transformers `generate` over the static batches, each row stopped at its forced length."""

    def __init__(self, hf_dir: str, rollouts: Rollouts, device: str):
        import torch
        import transformers

        self.torch, self.r = torch, rollouts
        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
        self.inputs = torch.from_numpy(rollouts.prompts_bp).long().to(device)
        self.device = device

        class StopAt(transformers.StoppingCriteria):
            def __init__(self, limits, prompt_len):
                self.limits, self.prompt_len = limits, prompt_len

            def __call__(self, input_ids, scores, **kw):
                return (input_ids.shape[1] - self.prompt_len) >= self.limits

        self.stop_at = StopAt

    def run(self):
        r, torch = self.r, self.torch
        k, g, p = r.per_batch, r.group, r.prompts_bp.shape[1]
        with torch.inference_mode():
            for i in range(0, r.prompts_bp.shape[0], k):
                limits = torch.from_numpy(r.limit_n[i * g:(i + k) * g]).to(self.device)
                ids = self.inputs[i:i + k]
                out = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    num_return_sequences=g, max_new_tokens=r.new, pad_token_id=0, eos_token_id=None,
                    stopping_criteria=transformers_list(self.stop_at(limits, p)))
                assert out.shape[1] - p == int(limits.max()), (out.shape, int(limits.max()))
        torch_sync()


def transformers_list(criterion):
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([criterion])


class GRPOStep:
    """Rollout (either sampler) + reward + trainer batch + one fused update, as the GRPO stage runs them
    (pack: the rows packed as rl.pack does, `trainer.trainer_batch`)."""

    def __init__(self, cfg, rollouts: Rollouts, seed: int = 0, pack: bool = True):
        mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
        self.mesh, self.r, self.pack = mesh, rollouts, pack
        self.loss = trainer_lib.LossSpec(temperature=1.0, max_len=rollouts.new)
        self.update = trainer_lib.make_update(cfg, tuple(sorted(OPTIMIZER.items())), 10**6, self.loss, mesh=mesh,
                                              rules=DEFAULT_RULES, pack=pack)
        self.state = state_lib.init_state(cfg, self.update.tx, seed, self.update.shardings)
        self.prompts = [list(row) for row in rollouts.prompts_bp for _ in range(rollouts.group)]
        self.update_s: list[float] = []
        self.tokens = {}  # the last update's forward positions: real ones and all

    def step(self, sample) -> float:
        t0 = time.perf_counter()
        r = self.r
        rng, key, shuffle = jax.random.split(self.state.rng, 3)
        self.state = self.state.replace(rng=rng)
        out = sample(key)
        t1 = time.perf_counter()
        adv, _ = grpo.group_advantages(jnp.asarray(distinct_tokens(out.tokens, out.lengths)), r.group)
        host = trainer_lib.build_batch(self.prompts, out.tokens, out.lengths, prompt_buckets=(r.prompts_bp.shape[1],),
                                       completion_buckets=(r.new,), pad_id=0)
        host, layout = trainer_lib.trainer_batch(
            host, self.pack, trainer_lib.row_multiple(self.mesh, DEFAULT_RULES, self.loss))
        batch = jax.device_put(host, trainer_lib.batch_shardings(self.mesh, DEFAULT_RULES, self.pack))
        self.state, metrics, _ = self.update(self.state, batch, None, None, layout.rows(np.asarray(adv)), shuffle,
                                             layout.rows(trainer_lib.pad_columns(out.logprobs, r.new)))
        jax.block_until_ready(metrics)
        self.update_s.append(time.perf_counter() - t1)
        self.tokens = {"real": int((host["segment_ids"] > 0).sum()), "all": int(host["segment_ids"].size)}
        return time.perf_counter() - t0


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(args) -> list[dict]:
    cfg = models.get_preset("tiny_moe", mtp_depth=0)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, args.prompt_len + args.new))
    params = models.init(cfg, jax.random.PRNGKey(args.seed))
    b, g = args.prompts, args.group
    prompts_bp = np.random.default_rng(args.seed).integers(4, cfg.vocab_size, (b, args.prompt_len)).astype(np.int32)
    limit_n = long_tail_lengths(b * g, args.new, args.seed)
    r = Rollouts(cfg, params, prompts_bp, limit_n, g, args.new, args.static_rows, args.chunk, args.slots, args.page)
    tokens = int(limit_n.sum())
    key = jax.random.PRNGKey(1)
    outs = r.run_static(key), r.run_engine(key), r.run_engine(key, r.engine_rows)  # compiles
    assert all((out.lengths == limit_n).all() for out in outs)
    times = {"static": [], "engine": [], "engine_rows": []}
    for i in range(args.runs):  # alternate, so that outside load hits all alike
        times["static"].append(_timed(lambda: r.run_static(jax.random.PRNGKey(10 + i))))
        times["engine"].append(_timed(lambda: r.run_engine(jax.random.PRNGKey(10 + i))))
        times["engine_rows"].append(_timed(lambda: r.run_engine(jax.random.PRNGKey(10 + i), r.engine_rows)))
    stats = {"engine": dict(r.engine.stats), "engine_rows": dict(r.engine_rows.stats)}
    if args.hf_runs:
        with tempfile.TemporaryDirectory() as hf_dir:
            save_hf_checkpoint(hf_dir, cfg, jax.device_get(params))
            hf = HFGenerate(hf_dir, r, torch_device())
        times["generate"] = [_timed(hf.run) for _ in range(args.hf_runs)]
    step = GRPOStep(cfg, r, pack=not args.padded)
    step.step(r.run_static), step.step(r.run_engine)  # compile the update
    step.update_s.clear()
    step_times = {"static": [], "engine": []}
    for _ in range(args.step_runs):
        step_times["static"].append(step.step(r.run_static))
        step_times["engine"].append(step.step(r.run_engine))
    padded = {}
    if not args.padded:  # the same update on the padded [N, P+T] batch, for its time and token count
        unpacked = GRPOStep(cfg, r, pack=False)
        unpacked.step(r.run_engine)
        unpacked.update_s.clear()
        for _ in range(args.step_runs):
            unpacked.step(r.run_engine)
        padded = {"padded_update_s": spread(unpacked.update_s)["median"], "padded_tokens": unpacked.tokens["all"]}
    rows = []
    slot_steps = {"static": r.static_slot_steps, "generate": r.static_slot_steps,
                  **{name: st["slot_steps"] for name, st in stats.items()}}
    for name, ts in times.items():
        s = spread(ts)
        st = spread(step_times[name]) if name in step_times else None
        rows.append({
            "sampler": name, "tok_s": tokens / s["median"], "rollout_s": s["median"],
            "rollout_range": f"{s['min']:.3g}..{s['max']:.3g}", "useful_share": tokens / slot_steps[name],
            "cache_MiB": r.bytes[name] / 2**20 if name in r.bytes else None,
            "slots": r.slots.get(name, args.static_rows),
            "grpo_step_s": st["median"] if st else None,
            "grpo_step_range": f"{st['min']:.3g}..{st['max']:.3g}" if st else None, "runs_s": ts,
        })
    base = rows[0]
    for row in rows:
        row["tok_s_vs_static"] = row["tok_s"] / base["tok_s"]
        row["step_speedup"] = base["grpo_step_s"] / row["grpo_step_s"] if row["grpo_step_s"] else None
    meta = {"B": b, "G": g, "P": args.prompt_len, "T": args.new, "tokens": tokens,
            "median_len": float(np.median(limit_n)), "truncated_frac": float((limit_n == args.new).mean()),
            "engine_stats": stats, "page": args.page, "pack": not args.padded, "update_s": spread(step.update_s)["median"],
            "update_tokens": step.tokens["all"], "real_tokens": step.tokens["real"], **padded}
    for row in rows:
        row.update(meta)
    return rows


COLUMNS = ["sampler", "slots", "cache_MiB", "tok_s", "tok_s_vs_static", "useful_share", "rollout_range",
           "grpo_step_s", "step_speedup"]


def main(argv=None):
    ap = argparse.ArgumentParser(description="long-tailed GRPO rollout: static sampler vs slot engine vs generate")
    ap.add_argument("--prompts", type=int, default=32, help="B prompts")
    ap.add_argument("--group", type=int, default=8, help="G samples per prompt")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new", type=int, default=256, help="T, the most new tokens per row")
    ap.add_argument("--static_rows", type=int, default=32, help="rows per static batch (sets the cache memory)")
    ap.add_argument("--chunk", type=int, default=256, help="engine: most decode steps between host checks")
    ap.add_argument("--slots", type=int, default=64, help="paged engine: decode slots")
    ap.add_argument("--page", type=int, default=16, help="paged engine: positions per cache page")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--step_runs", type=int, default=2)
    ap.add_argument("--hf_runs", type=int, default=1, help="generate runs (0 = skip)")
    ap.add_argument("--padded", action="store_true", help="the GRPO step's update on the padded batch (no packing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_results.jsonl")
    args = ap.parse_args(argv)
    tune_cpu_runtime()
    rows = measure(args)
    m = rows[0]
    print(f"{m['B']} prompts x G {m['G']}, prompt {m['P']}, T {m['T']}: {m['tokens']} tokens, median length "
          f"{m['median_len']:.0f}, {m['truncated_frac']:.1%} truncated")
    print(f"update ({'packed' if m['pack'] else 'padded'}): {m['update_s']:.3g} s over {m['update_tokens']} positions "
          f"({m['real_tokens']} real)" + (f"; padded: {m['padded_update_s']:.3g} s over {m['padded_tokens']} positions"
                                           if "padded_tokens" in m else ""))
    print_table(rows, COLUMNS)
    append_result(args.out, "rollout", rows)
    return rows


if __name__ == "__main__":
    ensure_malloc_tunables()  # the same process settings as `python -m r1jax.main`
    main()
