"""k completions per prompt text with the group sampler: what the eval and rejection-sampling stages sample with.

    text = render(template, tokenizer, question, system)               # "checkpoint": the model's chat template
    kept, prompts = encode_prompts(tokenizer, texts, max_tokens=max(prompt_buckets))
    out = generate(cfg, params, tokenizer, prompts, samples=k, ...)     # out.texts[p][j], truncated, lengths

Prompts longer than the largest prompt bucket are left out by `encode_prompts` and counted (as TRL's
max_prompt_length), so one long question does not end a run; the caller reports the count. A row ends on any of
the tokenizer's EOS ids (`eos_ids`: every id of an HF checkpoint's generation_config.json) or a stop string
(matched on text), and never samples an id beyond the tokenizer's vocabulary (a real checkpoint pads its embedding).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from r1jax.data import chat
from r1jax.rl import sampler as sampler_lib
from r1jax.rl import stops
from r1jax.rl.rollouts import render_prompt


class Generations(NamedTuple):
    texts: list[list[str]]  # [P][k] completion texts
    truncated: list[list[bool]]  # [P][k] hit max_new_tokens without EOS / stop string
    lengths: list[list[int]]  # [P][k] completion tokens


def render(template: str, tokenizer, question, system: str | None = None) -> str:
    """The prompt text of a question (or a conversation): "checkpoint" renders it with the tokenizer's chat
    template, another name with that template of r1jax.data.templates, "" gives the question verbatim; `system`: a
    system turn (None = the template's default, if any). The GRPO stage's rendering (rollouts.render_prompt)."""
    return render_prompt(template, tokenizer, question, system)


def encode_prompts(tokenizer, texts: list[str], max_tokens: int) -> tuple[list[int], list[list[int]]]:
    """(indices of the prompts kept, their tokens: BOS, unless the text already starts with it, + encoding): prompts
    over `max_tokens` tokens are left out."""
    kept, tokens = [], []
    for i, text in enumerate(texts):
        ids = chat.encode_prompt(tokenizer, text)
        if len(ids) <= max_tokens:
            kept.append(i)
            tokens.append(ids)
    return kept, tokens


def sampler_spec(tokenizer, *, method, samples: int, max_new_tokens: int, stop_strings: tuple = ()
                 ) -> sampler_lib.SamplerSpec:
    """The sampler's spec for `tokenizer`: any of its EOS ids ends a row, stop strings on text, no id beyond its
    vocabulary."""
    return sampler_lib.SamplerSpec(method=method, group_size=samples, max_new_tokens=max_new_tokens,
                                   eos_id=tuple(tokenizer.eos_ids), pad_id=tokenizer.pad_id,
                                   stop_sequences=stops.stop_strings(tokenizer, tuple(stop_strings)),
                                   vocab_size=tokenizer.vocab_size)


def generate(cfg, params, tokenizer, prompts: list[list[int]], *, mesh, rules, samples: int, max_new_tokens: int,
             method, stop_strings: tuple = (), batch_prompts: int, prompt_buckets: tuple, seed: int) -> Generations:
    """`samples` completions of every prompt (token lists, see encode_prompts) with the group sampler,
    `batch_prompts` prompts per call (the last batch padded, so one compile per prompt bucket). Batch i uses the
    key fold_in(PRNGKey(seed), i): the same call gives the same completions."""
    spec = sampler_spec(tokenizer, method=method, samples=samples, max_new_tokens=max_new_tokens,
                        stop_strings=stop_strings)
    sample_fn = sampler_lib.make_sampler(cfg, spec, mesh=mesh, rules=rules)
    out_all = Generations([], [], [])
    for i, start in enumerate(range(0, len(prompts), batch_prompts)):
        chunk = prompts[start:start + batch_prompts]
        prompts_bp, lengths_b = sampler_lib.pad_prompts(chunk, prompt_buckets, tokenizer.pad_id, batch_prompts)
        out = jax.device_get(sample_fn(params, prompts_bp, lengths_b, jax.random.fold_in(jax.random.PRNGKey(seed), i)))
        for b in range(len(chunk)):
            rows = range(b * samples, (b + 1) * samples)
            out_all.texts.append([tokenizer.decode(out.tokens[r, :out.lengths[r]]) for r in rows])
            out_all.truncated.append([bool(out.truncated[r]) for r in rows])
            out_all.lengths.append([int(out.lengths[r]) for r in rows])
    return out_all


def sampler_smoke_step(config) -> dict:
    """Samples with config.sampling from a fresh tiny model of config.smoke_model for two prompts (no files, no
    checkpoint): the eval and rejection-sampling stages' check for tests/test_configs.py. "loss" is the mean negative
    log-likelihood per sampled token."""
    from r1jax import models  # noqa: PLC0415
    from r1jax.train.run import mesh_and_rules, model_config  # noqa: PLC0415

    mesh, rules = mesh_and_rules(config.mesh)
    cfg = model_config(config.smoke_model)
    params = models.init(cfg, jax.random.PRNGKey(config.seed))
    s = config.sampling
    spec = sampler_lib.SamplerSpec(
        method=sampler_lib.method_from_config(s.method, float(s.temperature), int(s.top_k), float(s.top_p)),
        group_size=int(s.samples), max_new_tokens=8, eos_id=2, pad_id=0)
    prompts_bp, lengths_b = sampler_lib.pad_prompts([[1, 5, 6], [1, 7]], tuple(s.prompt_buckets), 0)
    out = jax.device_get(sampler_lib.make_sampler(cfg, spec, mesh=mesh, rules=rules)(
        params, prompts_bp, lengths_b, jax.random.PRNGKey(0)))
    return {"loss": float(-out.logprobs.sum() / max(out.lengths.sum(), 1)), "tokens": float(out.lengths.sum())}
