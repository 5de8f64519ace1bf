"""Reward models: the decoder with a scalar head, the Bradley-Terry loss, and the rewards that use them.

A reward model (REFERENCE.md §4.5) is `{"decoder": model params, "head": {"w_d": [D], "b": []}}`: the final-normed
hidden state of the last real token (`models.hidden_states`) times w_d, plus b. It is trained on preference pairs
with the Bradley-Terry loss, `-log sigmoid(r(chosen) - r(rejected))` (r1jax/stages/reward_model.py).

What it reads depends on its aspect (R1's all-scenario RL):
  helpful    the final summary only: the text after `<|summary|>` (or the `<answer>` content), so a long or
             odd chain of thought is neither rewarded nor punished by it
  harmless   the whole response, reasoning included: harm in the reasoning counts too
The scored text is `render_prompt(template, question) + scored part`, the same in training and in use.

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
from r1jax.data import templates
from r1jax.rl import answers, rewards

ASPECTS = ("helpful", "harmless")
LENGTH_BUCKET = 64  # scored sequences are padded to a multiple of this (one compile per multiple)


# ------------------------------------------------------------------------------------------ model


def init_head(cfg: models.ModelConfig) -> dict:
    """A zero head: every response scores 0 before training."""
    return {"w_d": jnp.zeros((cfg.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def scores(params, tokens_bt, lengths_b, cfg: models.ModelConfig):
    """Scalar reward per row [B] of right-padded tokens [B, T] (real tokens: the first lengths_b), and aux."""
    segment_ids_bt = (jnp.arange(tokens_bt.shape[1])[None, :] < lengths_b[:, None]).astype(jnp.int32)
    hidden_btd, aux = models.hidden_states(params["decoder"], tokens_bt, cfg, segment_ids=segment_ids_bt)
    last_bd = jnp.take_along_axis(hidden_btd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    return last_bd.astype(jnp.float32) @ params["head"]["w_d"] + params["head"]["b"], aux


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


def rm_text(question: str, response: str, aspect: str, template: str) -> str:
    return templates.render_prompt(template, question) + scored_part(response, aspect)


def encode(tokenizer, text: str, max_len: int) -> list[int]:
    """BOS + tokens, keeping the last max_len (the score is read at the last token)."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return (bos + tokenizer.encode(text))[-max_len:]


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
        rows = [encode(self.tokenizer, rm_text(q, r, aspect, self.template), self.max_len)
                for q, r in zip(questions, responses, strict=True)]
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            tokens, lengths = pad_rows(chunk, self.tokenizer.pad_id, self.batch_size)
            out.append(np.asarray(_jitted_scores(self.cfg)(self.params, tokens, lengths))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


@functools.lru_cache(maxsize=8)
def _jitted_scores(cfg: models.ModelConfig):
    return jax.jit(lambda params, tokens, lengths: scores(params, tokens, lengths, cfg)[0])


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
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract_rm_params(cfg))
    params = ckpt.restore_params(step, abstract)
    ckpt.close()
    return RewardModel(cfg=cfg, params=params, tokenizer=load_tokenizer(meta["tokenizer"]), aspect=meta["aspect"],
                       template=meta["template"], max_len=int(meta["max_len"]))


# ------------------------------------------------------------------------------------------ rewards


@rewards.register("reward_model")
def reward_model(prompts, completions, *, checkpoint: str, aspect: str | None = None, question=None,
                 **_) -> list[float]:
    """The RM at `checkpoint` scores each completion; the question is the `question` field when the dataset has
    one (rendered with the RM's own template), else the prompt text as given."""
    rm = load(os.path.abspath(checkpoint))
    questions = list(question) if question is not None else list(prompts)
    return [float(s) for s in rm.score(questions, list(completions), aspect)]


@rewards.register("by_source")
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
