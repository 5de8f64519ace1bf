"""One GRPO step, r1jax versus TRL's GRPOTrainer, side by side in one run, on the same model and prompts.

    python -m r1jax.bench.grpo_step [--size tiny] [--steps 3] [--out bench_results.jsonl]

A step = sample G completions for each of B prompts (exactly T new tokens: no EOS can end a row early on
either side), decode them, score them with the same Python reward function, group advantages, the GRPO loss
(seq-mean-token-mean, ε = 0.2, β = 0, μ = 1) and one AdamW update.
  r1jax  the real pieces the GRPO stage composes: `rl.sampler.make_sampler` (prefill once, G samples share the
         cache, one jitted while_loop), `rl.grpo.group_advantages`, `rl.trainer.build_batch`, `make_update`
         (jitted loss + update, state donated; at μ = 1 π_old is the update's own forward, as in the stage).
  TRL    `trl.GRPOTrainer` (transformers `generate`, no vLLM) on the same weights (`save_hf_checkpoint`) and a
         word-level tokenizer both sides share, `min_new_tokens = max_completion_length = T`, offline from a
         local directory, on torch with one thread per core.
TRL's steps run inside its own `train()` loop; after each TRL step a callback runs one r1jax step, so the two
alternate. Times are per step (median, min..max) and tokens/s counts sampled completion tokens (B x G x T).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import models
from r1jax.bench.common import append_result, print_table, spread, torch_device, tune_cpu_runtime
from r1jax.bench.train_step import OPTIMIZER
from r1jax.hf import save_hf_checkpoint
from r1jax.host import ensure_malloc_tunables
from r1jax.models import ModelConfig
from r1jax.rl import grpo
from r1jax.rl import sampler as sampler_lib
from r1jax.rl import trainer as trainer_lib
from r1jax.sharding import DEFAULT_RULES, make_mesh
from r1jax.train import state as state_lib

PAD, EOS = 0, 1  # token ids of the shared word-level tokenizer; words w2 .. w{V-1}


@dataclasses.dataclass(frozen=True)
class Size:
    prompts: int  # B
    group: int  # G
    prompt_len: int  # P
    new_tokens: int  # T
    models: tuple[tuple[str, ModelConfig], ...]


SIZES = {
    "tiny": lambda: Size(4, 8, 32, 64, (
        ("deepseek_v3", models.get_preset("tiny_moe", mtp_depth=0)),
        ("llama", models.get_preset("tiny_dense", qkv_bias=False)))),
}


def distinct_words(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """The reward both sides call: share of distinct words in the completion (cheap, pure Python)."""
    out = []
    for text in completions:
        words = text.split()
        out.append(len(set(words)) / max(len(words), 1))
    return out


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer over "<pad>", "<eos>", "w2" .. "w{V-1}" (a transformers PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_prompts(size: Size, vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(2, vocab, size.prompt_len)) for _ in range(n)]


class R1jaxGRPO:
    """The GRPO stage's rollout + update on one device, for fixed prompts."""

    def __init__(self, cfg: ModelConfig, size: Size, prompts: list[list[int]], tokenizer, seed: int = 0):
        mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
        self.mesh, self.size, self.tokenizer, self.prompts = mesh, size, tokenizer, prompts
        loss = trainer_lib.LossSpec(temperature=1.0, eps_low=0.2, eps_high=0.2, beta=0.0,
                                    agg="seq-mean-token-mean", max_len=size.new_tokens)
        self.update = trainer_lib.make_update(cfg, tuple(sorted(OPTIMIZER.items())), 10**6, loss, mesh=mesh,
                                              rules=DEFAULT_RULES)
        self.scorer = trainer_lib.make_scorer(cfg, 1.0, mesh=mesh, rules=DEFAULT_RULES)
        spec = sampler_lib.SamplerSpec(method=sampler_lib.Temperature(1.0), group_size=size.group,
                                       max_new_tokens=size.new_tokens, eos_id=-1, pad_id=PAD)  # never stops early
        self.sample = sampler_lib.make_sampler(cfg, spec, mesh=mesh, rules=DEFAULT_RULES)
        self.state = state_lib.init_state(cfg, self.update.tx, seed, self.update.shardings)
        self.initial = jax.device_get(self.state.params)
        self.prompts_bp, self.lengths_b = sampler_lib.pad_prompts(prompts, (size.prompt_len,), PAD)
        self.prompt_texts = [t for t in tokenizer.batch_decode(prompts) for _ in range(size.group)]
        t = time.perf_counter()
        self.metrics = self.step()  # compiles
        self.compile_s = time.perf_counter() - t

    def step(self) -> dict:
        size = self.size
        rng, sample_key, shuffle_key = jax.random.split(self.state.rng, 3)
        self.state = self.state.replace(rng=rng)
        out = jax.device_get(self.sample(self.state.params, self.prompts_bp, self.lengths_b, sample_key))
        texts = self.tokenizer.batch_decode([row[:n] for row, n in zip(out.tokens, out.lengths)])
        rewards = np.asarray(distinct_words(self.prompt_texts, texts), np.float32)
        adv, _ = grpo.group_advantages(jnp.asarray(rewards), size.group)
        host = trainer_lib.build_batch([p for p in self.prompts for _ in range(size.group)], out.tokens,
                                       out.lengths, prompt_buckets=(size.prompt_len,),
                                       completion_buckets=(size.new_tokens,), pad_id=PAD)
        batch = jax.device_put(host, trainer_lib.batch_shardings(self.mesh, DEFAULT_RULES))
        old_logp = None if self.update.fused else self.scorer(self.state.params, batch)[0]
        self.state, metrics, _ = self.update(self.state, batch, old_logp, None, adv, shuffle_key)
        metrics = jax.device_get(metrics)
        return {"loss": float(metrics["loss"]), "reward": float(rewards.mean()),
                "completion_tokens": int(out.lengths.sum())}


def run_trl(hf_dir: str, size: Size, prompts: list[list[int]], tokenizer, *, steps: int, between, device: str):
    """GRPOTrainer.train() for `steps` steps; `between()` runs after each TRL step. Returns (step seconds,
    completion tokens per step, the torch options used)."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokens_seen = []

    def reward(prompts, completions, **fields):
        tokens_seen.append(sum(len(c.split()) for c in completions))
        return distinct_words(prompts, completions, **fields)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            between()

    texts = tokenizer.batch_decode(prompts)
    data = datasets.Dataset.from_dict({"prompt": [texts[i % len(texts)] for i in range(size.prompts * steps)]})
    init_kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if "deepseek" in open(os.path.join(hf_dir, "config.json")).read():
        init_kwargs["experts_implementation"] = "grouped_mm"
    args = GRPOConfig(
        output_dir=os.path.join(hf_dir, "trl"), per_device_train_batch_size=size.prompts * size.group,
        num_generations=size.group, max_completion_length=size.new_tokens,
        generation_kwargs={"min_new_tokens": size.new_tokens}, temperature=1.0, beta=0.0, num_iterations=1,
        epsilon=0.2, loss_type="grpo", learning_rate=OPTIMIZER["lr"], adam_beta1=OPTIMIZER["b1"],
        adam_beta2=OPTIMIZER["b2"], adam_epsilon=OPTIMIZER["eps"], weight_decay=OPTIMIZER["weight_decay"],
        max_grad_norm=OPTIMIZER["clip_norm"], lr_scheduler_type="constant", warmup_steps=0, max_steps=steps,
        logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=device == "cpu", bf16=False,
        shuffle_dataset=False, disable_tqdm=True, model_init_kwargs=init_kwargs, seed=0)
    timer = Timer()
    trainer = GRPOTrainer(model=hf_dir, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.times, tokens_seen, {"attn": "sdpa", **({"experts": init_kwargs["experts_implementation"]}
                                                          if "experts_implementation" in init_kwargs else {}),
                                      "optim": trainer.args.optim}


def compare(name: str, cfg: ModelConfig, size: Size, *, steps: int, warmup: int) -> dict:
    tokenizer = make_tokenizer(cfg.vocab_size)
    prompts = make_prompts(size, cfg.vocab_size, size.prompts)
    rj = R1jaxGRPO(cfg, size, prompts, tokenizer)
    r_times = []

    def r1jax_step():
        t = time.perf_counter()
        rj.step()
        r_times.append(time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as hf_dir:
        save_hf_checkpoint(hf_dir, cfg, rj.initial)
        tokenizer.save_pretrained(hf_dir)
        t_times, t_tokens, option = run_trl(hf_dir, size, prompts, tokenizer, steps=warmup + steps,
                                            between=r1jax_step, device=torch_device())
    r, t = spread(r_times[warmup:]), spread(t_times[warmup:])
    tokens = size.prompts * size.group * size.new_tokens
    return {
        "model": name, "B": size.prompts, "G": size.group, "P": size.prompt_len, "T": size.new_tokens,
        "r1jax_s": r["median"], "r1jax_range": f"{r['min']:.3g}..{r['max']:.3g}",
        "trl_s": t["median"], "trl_range": f"{t['min']:.3g}..{t['max']:.3g}", "speedup": t["median"] / r["median"],
        "r1jax_tok_s": tokens / r["median"], "trl_tok_s": tokens / t["median"],
        "trl_tokens_per_step": t_tokens[-1] if t_tokens else None, "r1jax_compile_s": rj.compile_s,
        "trl_options": option, "r1jax_step_s": r_times, "trl_step_s": t_times,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description="GRPO step: r1jax vs TRL GRPOTrainer")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--models", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--prompts", type=int, default=0, help="override B")
    ap.add_argument("--group", type=int, default=0, help="override G")
    ap.add_argument("--prompt-len", type=int, default=0, help="override P")
    ap.add_argument("--new-tokens", type=int, default=0, help="override T")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="bench_results.jsonl")
    args = ap.parse_args(argv)
    tune_cpu_runtime()
    size = SIZES[args.size]()
    size = dataclasses.replace(size, prompts=args.prompts or size.prompts, group=args.group or size.group,
                               prompt_len=args.prompt_len or size.prompt_len,
                               new_tokens=args.new_tokens or size.new_tokens)
    wanted = [m for m in args.models.split(",") if m]
    rows = [compare(name, cfg, size, steps=args.steps, warmup=args.warmup)
            for name, cfg in size.models if not wanted or name in wanted]
    print_table(rows, ["model", "B", "G", "P", "T", "r1jax_s", "r1jax_range", "trl_s", "trl_range", "speedup",
                       "r1jax_tok_s", "trl_tok_s", "trl_tokens_per_step"])
    append_result(args.out, "grpo_step", rows, size=args.size)
    return rows


if __name__ == "__main__":
    ensure_malloc_tunables()  # the same process settings as `python -m r1jax.main`
    main()
