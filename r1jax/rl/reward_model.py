"""Reward models: the decoder with a scalar head, the Bradley-Terry loss, and the rewards that use them.

A reward model (docs/reference.md §4.5) is `{"decoder": model params, "head": {"w_d": [D], "b": [], "w_lp": []}}`. Its
score of a text = prompt + scored part is

    r = w_d . h_last + b + w_lp * mean log p(scored part | what precedes it)

h_last: the final-normed hidden state of the last real token (the EOS that ends every scored text,
`models.hidden_states`); the log-likelihood is the decoder's own, through its LM head, per scored token. w_d and b
start at zero, w_lp at config.rm.likelihood_init, and the whole model is trained on preference pairs with the
Bradley-Terry loss, `-log sigmoid(r(chosen) - r(rejected))` (r1jax/stages/reward_model.py).

Why the likelihood term: an RM initialised from a base model should use what the base knows. A head on the last
token alone has to learn to read that knowledge out of preference pairs, and at tiny scale it does not: on the tiny
world's held-out helpfulness pairs it stays near chance on wrong facts and slipped arithmetic that the base model's
own likelihood ranks right (docs/results.md). likelihood_init 0 starts as the plain last-token head.

What it reads depends on its aspect (R1's all-scenario RL):
  helpful    the final summary only: the text after `<|summary|>` (or the `<answer>` content), so a long or
             odd chain of thought is neither rewarded nor punished by it
  harmless   the whole response, reasoning included: harm in the reasoning counts too
The scored text is the question rendered with the template (chat.render: "checkpoint" = the checkpoint's own chat
template) + the scored part, the same in training and in use.

Two rewards are registered for GRPO (signature of r1jax.rl.rewards):
  reward_model   (kwargs: checkpoint, aspect=None) the RM run at `checkpoint` scores each (question, completion);
                 loaded on first use and cached; aspect defaults to the one it was trained for
  by_source      (kwargs: routes={source: [reward specs]}) each sample is scored by the specs of its
                 `reward_source` field (all-scenario RL: rule rewards for reasoning prompts, reward models for
                 general prompts); specs are summed per sample, each spec evaluated on its own so one route
                 may use a reward twice (two reward models)

Scoring runs on this host's devices with the RM's params replicated (tiny / single-host scale); a 671B RM would be
served on its own slice instead.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import models
from r1jax.data import chat
from r1jax.rl import answers, rewards

ASPECTS = ("helpful", "harmless")
LENGTH_BUCKET = 64  # scored sequences are padded to a multiple of this (one compile per multiple)


# ------------------------------------------------------------------------------------------ model


def init_head(cfg: models.ModelConfig, likelihood_init: float = 0.0) -> dict:
    """A head that scores what the decoder's likelihood says, times likelihood_init (0: every response scores 0)."""
    return {"w_d": jnp.zeros((cfg.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32),
            "w_lp": jnp.full((), likelihood_init, jnp.float32)}


def continuation_logprob(decoder, hidden_btd, tokens_bt, lengths_b, starts_b, cfg: models.ModelConfig):
    """Per row [B]: (sum of log p(tokens[t] | tokens[:t]) over starts_b <= t < lengths_b, that count), from the
    decoder's final-normed hidden states [B, T, D] of right-padded tokens [B, T]."""
    logp_bt = models.token_logprobs(decoder, hidden_btd[:, :-1], tokens_bt[:, 1:], cfg)[0]  # log p(token t+1)
    t = jnp.arange(1, tokens_bt.shape[1])[None, :]
    mask_bt = (t >= starts_b[:, None]) & (t < lengths_b[:, None])
    return jnp.sum(jnp.where(mask_bt, logp_bt, 0.0), axis=1), jnp.sum(mask_bt, axis=1)


def scores(params, tokens_bt, lengths_b, starts_b, cfg: models.ModelConfig):
    """Reward per row [B] of right-padded tokens [B, T] (real tokens: the first lengths_b, scored part from
    starts_b on; module docstring), and aux."""
    segment_ids_bt = (jnp.arange(tokens_bt.shape[1])[None, :] < lengths_b[:, None]).astype(jnp.int32)
    hidden_btd, aux = models.hidden_states(params["decoder"], tokens_bt, cfg, segment_ids=segment_ids_bt)
    last_bd = jnp.take_along_axis(hidden_btd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    logp_b, n_b = continuation_logprob(params["decoder"], hidden_btd, tokens_bt, lengths_b, starts_b, cfg)
    head = params["head"]
    mean_logp_b = logp_b / jnp.maximum(n_b, 1)  # per token: the term does not favour short responses
    return last_bd.astype(jnp.float32) @ head["w_d"] + head["b"] + head["w_lp"] * mean_logp_b, aux


def bradley_terry(chosen_b, rejected_b) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean -log sigmoid(r_chosen - r_rejected), and pairwise accuracy / margin of the batch."""
    margin_b = chosen_b - rejected_b
    loss = -jnp.mean(jax.nn.log_sigmoid(margin_b))
    return loss, {"bt_loss": loss, "pair_accuracy": jnp.mean(margin_b > 0), "margin": jnp.mean(margin_b)}


# ------------------------------------------------------------------------------------------ text


def scored_part(response: str, aspect: str) -> str:
    """What an RM of `aspect` reads of a response: the final summary (helpful) or everything (harmless)."""
    if aspect not in ASPECTS:
        raise ValueError(f"reward model aspect {aspect!r}: expected one of {ASPECTS}")
    if aspect == "harmless":
        return response
    _, summary = answers.split_reasoning(response)
    if summary is not None:
        return summary
    return response  # a response without a reasoning section is all summary


def encode(tokenizer, question: str, response: str, aspect: str, template: str, max_len: int) -> tuple:
    """(BOS + rendered prompt + scored part + EOS as tokens, keeping the last max_len; index of the first scored
    token). Prompt and scored part are tokenised apart, as the policy produced them. The EOS makes the likelihood
    term that of a *complete* response, so an empty or cut-off one is not the likeliest."""
    head = chat.encode_prompt(tokenizer, chat.render(template, tokenizer, question))  # "checkpoint": its chat template
    row = head + tokenizer.encode(scored_part(response, aspect)) + [tokenizer.eos_id]
    cut = max(len(row) - max_len, 0)
    return row[cut:], max(len(head) - cut, 1)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, batch: int | None = None,
             bucket: int = LENGTH_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """([B, T] right-padded, [B] lengths); T rounded up to `bucket`; rows appended (copies of the last) up to
    `batch` so the compiled shape stays fixed."""
    rows = list(rows) + [rows[-1]] * max((batch or 0) - len(rows), 0)
    width = -(-max(len(r) for r in rows) // bucket) * bucket
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out, np.asarray([len(r) for r in rows], np.int32)


def pad_starts(starts: Sequence[int], batch: int) -> np.ndarray:
    """[B] first-scored-token indices for pad_rows' batch (its appended copies repeat the last)."""
    starts = list(starts)
    return np.asarray(starts + starts[-1:] * (batch - len(starts)), np.int32)


# ------------------------------------------------------------------------------------------ loading


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A trained RM ready to score (params on this host's default device)."""

    cfg: models.ModelConfig
    params: Any
    tokenizer: Any
    aspect: str
    template: str
    max_len: int
    batch_size: int = 32

    def score(self, questions: Sequence[str], responses: Sequence[str], aspect: str | None = None) -> np.ndarray:
        """RM score of every (question, response) pair [N], read as `aspect` (default: the trained one)."""
        aspect = aspect or self.aspect
        rows, starts = zip(*[encode(self.tokenizer, q, r, aspect, self.template, self.max_len)
                             for q, r in zip(questions, responses, strict=True)]) if len(responses) else ((), ())
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            tokens, lengths = pad_rows(chunk, self.tokenizer.pad_id, self.batch_size)
            start = pad_starts(starts[i:i + self.batch_size], self.batch_size)
            out.append(np.asarray(_jitted_scores(self.cfg)(self.params, tokens, lengths, start))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


@functools.lru_cache(maxsize=8)
def _jitted_scores(cfg: models.ModelConfig):
    return jax.jit(lambda params, tokens, lengths, starts: scores(params, tokens, lengths, starts, cfg)[0])


def abstract_rm_params(cfg: models.ModelConfig):
    return {"decoder": models.abstract_params(cfg), "head": jax.eval_shape(lambda: init_head(cfg))}


@functools.lru_cache(maxsize=4)
def load(path: str) -> RewardModel:
    """The RM of an r1jax reward_model run (its directory, checkpoints/ or a step dir), cached per path."""
    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.train import checkpoint as ckpt_lib

    found = ckpt_lib.find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no reward-model checkpoint (a reward_model run dir, its checkpoints/ "
                                "or a step dir)")
    directory, step = found
    ckpt = ckpt_lib.Checkpointer(directory, read_only=True)
    meta = ckpt.restore_meta(step)
    if meta.get("stage") != "reward_model":
        raise ValueError(f"{directory}/{step} was written by stage {meta.get('stage')!r}, not reward_model")
    cfg = models.ModelConfig(**meta["model"])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's: each scores its own groups
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract_rm_params(cfg))
    params = ckpt.restore_params(step, abstract)
    ckpt.close()
    return RewardModel(cfg=cfg, params=params, tokenizer=load_tokenizer(meta["tokenizer"]), aspect=meta["aspect"],
                       template=meta["template"], max_len=int(meta["max_len"]))


# ------------------------------------------------------------------------------------------ rewards


def reward_model(prompts, completions, *, checkpoint: str, aspect: str | None = None, question=None,
                 **_) -> list[float]:
    """The RM at `checkpoint` scores each completion; the question is the `question` field when the dataset has
    one (rendered with the RM's own template), else the prompt text as given."""
    rm = load(os.path.abspath(checkpoint))
    questions = list(question) if question is not None else list(prompts)
    return [float(s) for s in rm.score(questions, list(completions), aspect)]


def by_source(prompts, completions, *, routes: Mapping, reward_source, **fields) -> list[float]:
    """Per sample, the sum of the reward specs that `routes` lists for its `reward_source` field."""
    routes = {str(k): tuple(tuple(s) for s in v) for k, v in dict(routes).items()}
    unknown = sorted(set(reward_source) - set(routes))
    if unknown:
        raise ValueError(f"by_source: reward_source value(s) {unknown} have no route; routes: {sorted(routes)}")
    total = np.zeros(len(completions))
    for source, specs in routes.items():
        rows = [i for i, s in enumerate(reward_source) if s == source]
        if not rows:
            continue
        sub = {k: [v[i] for i in rows] for k, v in fields.items()}
        sub["reward_source"] = [source] * len(rows)
        for spec in specs:
            value, _, errors = rewards.score((spec,), [prompts[i] for i in rows], [completions[i] for i in rows], sub)
            if any(errors.values()):
                raise RuntimeError(f"by_source: reward {spec[0]!r} failed on {sum(errors.values())} "
                                   f"'{source}' samples")
            total[rows] += value
    return total.tolist()
