"""GRPO rollouts on the host side: sample and score groups, the prompt stream, samples.jsonl, the reference store.

    records = read_prompt_records(config.data, files)   # checked, before the model: file:line and field when bad
    records, dropped = encode_prompt_records(config.data, records, tokenizer, max(rl.prompt_buckets))
    stream = PromptStream(records, seed)                 # seeded shuffle per epoch; its state goes in checkpoints
    groups = sample_groups(sample_fn, params, stream.take(B), rng, group_size=G, tokenizer=..., reward_specs=...)
    behaviour_metrics(groups)                            # rewards, accuracy, format, lengths, truncation, reflection

On several processes each process scores only its own block of the prompts and the scores are exchanged
(`sample_groups`), so the returned groups are the same everywhere.

The GRPO stage (r1jax/stages/grpo.py) strings these together with the sampler, the advantages and the update.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import NamedSharding

from r1jax import models
from r1jax.data import chat, fields as fields_lib
from r1jax.data.sources import iterate_records
from r1jax.rl import answers, rewards as rewards_lib
from r1jax.rl import sampler as sampler_lib
from r1jax.sharding import logical_to_spec
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train.metrics import append_jsonl

log = logging.getLogger(__name__)

REFLECTION = re.compile(r"re-check|\bwait\b|\bverify\b|\bcheck\b|等等|检查", re.I)


# ------------------------------------------------------------------------------------------ rollouts


@dataclasses.dataclass
class Group:
    """One prompt and its G scored completions (host arrays)."""

    record: dict
    prompt: list[int]
    tokens: np.ndarray  # [G, T]
    logprobs: np.ndarray  # [G, T] sampler log-probs
    lengths: np.ndarray  # [G]
    truncated: np.ndarray  # [G] bool
    texts: list[str]
    rewards: np.ndarray  # [G] weighted sum
    per_reward: dict[str, np.ndarray]  # name -> [G]
    errors: dict[str, int]  # reward errors of the sampled batch, counted on its first group only

    @property
    def informative(self) -> bool:
        """Rewards not all equal: the group has a non-zero advantage."""
        return bool(np.any(self.rewards != self.rewards[0]))


def sample_groups(sample_fn, params, prompts: list[dict], rng, *, group_size: int, tokenizer, reward_specs,
                  prompt_buckets, batch_size: int | None = None) -> list[Group]:
    """Sample and score G completions for each prompt record (records carry `tokens`, see load_prompts).

    On several processes (`jax.process_count() > 1`) every process is given the same `prompts` (the stream's
    global order) and owns a contiguous block of them (`process_block`): the prompt batch is assembled from the
    blocks' tokens (`_gather_blocks`, one all-gather; the bucket follows the longest prompt of all blocks), the
    sampler runs once over all rows as one SPMD program (row n = b*G + g, as with one process), every process
    decodes all rows, and each scores only its own block's groups -- the rewards are the expensive part
    (math-verify, the code sandbox, a reward model) -- then the scores are exchanged bit for bit
    (`_gather_scores`). Every process returns the same groups, so the advantages and dynamic sampling's choices,
    made from these numbers only, agree everywhere; and as each row is scored once, by one process, a reward with
    a time limit (math-verify's timeout, the sandbox) cannot disagree between processes under load. Every process
    still reads and encodes the whole prompt set (PromptStream: the same order and the same too-long drops
    everywhere); the blocks divide the prompt batch's input and the scoring."""
    own = process_block(len(prompts))
    token_lists = _gather_blocks([r["tokens"] for r in prompts[own]], len(prompts), max(prompt_buckets))
    prompts_bp, lengths_b = sampler_lib.pad_prompts(token_lists, prompt_buckets, tokenizer.pad_id, batch_size)
    out = jax.device_get(jax.tree.map(to_host, sample_fn(params, prompts_bp, lengths_b, rng)))
    n = len(prompts) * group_size  # rows beyond are batch padding
    texts = [tokenizer.decode(out.tokens[i, :out.lengths[i]]) for i in range(n)]
    mine = slice(own.start * group_size, own.stop * group_size)
    fields = {k: [r.get(k) for r in prompts[own] for _ in range(group_size)] for k in prompts[0] if k != "tokens"}
    fields["lengths"] = [int(x) for x in out.lengths[mine]]
    scores = _score_rows(reward_specs, fields, texts[mine])
    total, per_reward, errors = _gather_scores(scores, len(prompts), group_size)
    groups = []
    for b, record in enumerate(prompts):
        rows = slice(b * group_size, (b + 1) * group_size)
        groups.append(Group(record=record, prompt=list(record["tokens"]), tokens=out.tokens[rows],
                            logprobs=out.logprobs[rows], lengths=out.lengths[rows], truncated=out.truncated[rows],
                            texts=texts[rows], rewards=total[rows],
                            per_reward={k: v[rows] for k, v in per_reward.items()},
                            errors=errors if b == 0 else dict.fromkeys(errors, 0)))
    return groups


def _score_rows(reward_specs, fields: dict[str, list], texts: list[str]
               ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """rewards.score of the completions `texts` (fields: the records' columns per row, `prompt_text`, `lengths`),
    with format and accuracy measured when not rewarded."""
    fields = dict(fields)
    prompt_texts = fields.pop("prompt_text")
    total, per_reward, errors = rewards_lib.score(reward_specs, prompt_texts, texts, fields)
    # Accuracy and format are measured even when not rewarded (or rewarded inside by_source's routes). Accuracy is
    # read in the stage's answer format: answer_accuracy for a stage trained on it anywhere (the readable format,
    # where the R1-Zero-format `accuracy` reads 0), else the R1-Zero `accuracy`.
    # Measured accuracy is NaN on samples without an `answer` (all-scenario RL's general prompts): it is averaged
    # over the samples that have one.
    correct = "answer_accuracy" if "answer_accuracy" in rewards_lib.reward_names(reward_specs) else "accuracy"
    if "format" not in per_reward:
        per_reward["format"] = rewards_lib.score((("format", 1.0),), prompt_texts, texts, fields)[1]["format"]
    if correct not in per_reward and "answer" in fields:
        rows = [i for i, answer in enumerate(fields["answer"]) if answer is not None]
        per_reward[correct] = np.full(len(texts), np.nan)
        if rows:
            per_reward[correct][rows] = rewards_lib.score(
                ((correct, 1.0),), [prompt_texts[i] for i in rows], [texts[i] for i in rows],
                {k: [v[i] for i in rows] for k, v in fields.items()})[1][correct]
    return total, per_reward, errors


# ------------------------------------------------------------------------- several processes: blocks of prompts


def process_blocks(b: int, processes: int | None = None) -> list[slice]:
    """The prompts [start, stop) of B that each process owns: np.array_split's contiguous blocks, in process order
    (B need not divide evenly: the first B mod P processes own one more; a process may own none)."""
    sizes = [len(x) for x in np.array_split(np.arange(b), jax.process_count() if processes is None else processes)]
    bounds = np.cumsum([0] + sizes)
    return [slice(int(start), int(stop)) for start, stop in zip(bounds[:-1], bounds[1:])]


def process_block(b: int) -> slice:
    """This process's block of B prompts (process_blocks)."""
    return process_blocks(b)[jax.process_index()]


def _gather_blocks(tokens: list[list[int]], b: int, max_len: int) -> list[list[int]]:
    """The B prompts' token lists on every process, from each process's block: one all-gather of
    [prompts of the longest block, 1 + max_len] (the length, then the tokens)."""
    if jax.process_count() == 1:
        return tokens
    blocks = process_blocks(b)
    mine = np.zeros((blocks[0].stop, 1 + max_len), np.int32)  # the first block is the longest
    for i, t in enumerate(tokens):
        mine[i, 0], mine[i, 1:1 + len(t)] = len(t), t
    everyone = multihost_utils.process_allgather(mine)  # [P, rows, 1 + max_len]
    return [list(row[1:1 + row[0]]) for rows, block in zip(everyone, blocks)
            for row in rows[:block.stop - block.start]]


def _gather_scores(scores, b: int, group_size: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """(total [N], per_reward {name: [N]}, errors {name: count}) of all B x G rows from each process's scores of
    its own block (_score_rows), bit for bit: float64 sent as uint32 pairs (JAX runs without x64), the error
    counts summed. One all-gather of [rows of the longest block + 1, 1 + rewards] (the last row: the errors)."""
    if jax.process_count() == 1:
        return scores
    total, per_reward, errors = scores
    names = list(per_reward)  # the same names, in the same order, on every process
    blocks = process_blocks(b)
    rows = (blocks[0].stop - blocks[0].start) * group_size  # the first block is the longest
    mine = np.zeros((rows + 1, 1 + len(names)))
    mine[:len(total)] = np.stack([total] + [per_reward[k] for k in names], axis=1)
    mine[rows, 1:] = [errors.get(k, 0) for k in names]
    words = multihost_utils.process_allgather(mine.view(np.uint32))
    everyone = np.ascontiguousarray(words).view(np.float64)  # [P, rows + 1, 1 + rewards]
    columns = np.concatenate([values[:(block.stop - block.start) * group_size]
                              for values, block in zip(everyone, blocks)])
    return (columns[:, 0], {k: columns[:, 1 + i] for i, k in enumerate(names)},
            {k: int(everyone[:, rows, 1 + names.index(k)].sum()) for k in errors})


def behaviour_metrics(groups: list[Group], prefix: str = "") -> dict[str, float]:
    """Rewards, accuracy, format rate, lengths, truncation, reflection words over the samples of `groups`."""
    lengths = np.concatenate([g.lengths for g in groups])
    out = {"reward_mean": float(np.mean(np.concatenate([g.rewards for g in groups])))}
    for name in groups[0].per_reward:
        values = np.concatenate([g.per_reward[name] for g in groups])
        if np.isnan(values).all():  # measured accuracy on general prompts only
            continue
        value = float(np.nanmean(values))
        out["accuracy" if name == "accuracy" else f"reward/{name}"] = value
        if name == "format":
            out["format_rate"] = value
    for name in groups[0].errors:
        out[f"reward_errors/{name}"] = float(sum(g.errors[name] for g in groups))
    reflections = [len(REFLECTION.findall(answers.split_reasoning(t)[0] or t)) for g in groups for t in g.texts]
    out.update({"response_length_mean": float(lengths.mean()), "response_length_max": float(lengths.max()),
                "truncated_frac": float(np.mean(np.concatenate([g.truncated for g in groups]))),
                "zero_std_frac": float(np.mean([not g.informative for g in groups])),
                "reflection_rate": float(np.mean([r > 0 for r in reflections])),
                "reflection_words": float(np.mean(reflections))})
    return {prefix + k: v for k, v in out.items()} if prefix else out


# ----------------------------------------------------------------------------------------------- data


def prompt_fields(data) -> fields_lib.FieldMap:
    """The record fields an RL prompt set maps (data.prompt_field or data.messages_field, data.answer_field,
    data.system_field; None = not read)."""
    return fields_lib.FieldMap.from_config(data, "prompt", "answer", "messages", "system")


def read_prompt_records(data, files: list[str]) -> list[dict]:
    """Every record of `files`, checked against the mapped fields before anything heavy runs, with the reference
    answer (data.answer_field) also under `answer`, the field the rewards read (GSM8K's `#### 72`, MATH's worked
    solution with `\\boxed{}` or a bare answer: the rewards extract it, answers.reference_answer).

    A mapping that no record at the start of a file satisfies (a misnamed or wrong-typed field) fails first, naming
    file:line, the field and its config key (fields.check_sample); then every record is read, and one without the
    prompt, or with an answer that is neither a str nor a number, fails at its file:line. A record whose answer is
    missing or null keeps answer None (all-scenario RL's general prompts, scored by other rewards)."""
    fmap = prompt_fields(data)
    fields_lib.check_sample(files, fmap, skip_malformed=True)
    schema = {**fmap.schema(), **({fmap.answer: "scalar?"} if fmap.answer else {})}
    records = []
    for record in iterate_records(files, schema=schema):
        if fmap.answer:
            record = {**record, "answer": record.get(fmap.answer)}
        records.append(record)
    if not records:
        raise ValueError(f"no prompt records in {files}")
    return records


def render_prompt(template: str, tokenizer, conversation, system: str | None = None) -> str:
    """Prompt text: "checkpoint" = the tokenizer's chat template (r1jax.data.chat, as transformers'
    apply_chat_template(..., add_generation_prompt=True)), another name = that plain template of
    r1jax.data.templates ("r1_zero" for base models), "" = the prompt verbatim (already rendered)."""
    if not template:
        if not isinstance(conversation, str):
            raise ValueError("data.template is empty (prompts verbatim), but the prompt is a conversation: name a "
                             "template ('checkpoint' for the model's own chat template)")
        return conversation
    return chat.render(template, tokenizer, conversation, system)


def encode_prompt_records(data, records: list[dict], tokenizer, max_tokens: int
                          ) -> tuple[list[dict], dict[str, int]]:
    """(records with `prompt_text` and `tokens`, dropped counts): the question (data.prompt_field) or conversation
    (data.messages_field, up to its last non-assistant turn) rendered with data.template, with a system turn from
    data.system_field or data.system when given; tokens = chat.encode_prompt (BOS unless the template wrote it).
    Prompts longer than `max_tokens` (the largest prompt bucket) are dropped and counted, as TRL's
    max_prompt_length does; a set in which nothing is left is an error that gives the counts."""
    fmap = prompt_fields(data)
    out, too_long = [], 0
    for record in records:
        if fmap.messages:
            conversation = list(record[fmap.messages])
            while conversation and conversation[-1]["role"] == "assistant":  # the reference reply is not a prompt
                conversation.pop()
        else:
            conversation = record[fmap.prompt]
        system = (record.get(fmap.system) if fmap.system else None) or data.get("system") or None
        text = render_prompt(data.template, tokenizer, conversation, system)
        tokens = chat.encode_prompt(tokenizer, text)
        if len(tokens) > max_tokens:
            too_long += 1
            continue
        out.append({**record, "prompt_text": text, "tokens": tokens})
    if not out:
        raise ValueError(f"no usable prompt records: {too_long} longer than the largest prompt bucket "
                         f"({max_tokens} tokens; raise rl.prompt_buckets), none left")
    if too_long:
        log.warning("%d of %d prompts are longer than the largest prompt bucket (%d tokens): dropped", too_long,
                    len(records), max_tokens)
    return out, {"prompts_dropped/too_long": too_long}


def load_prompts(data, files: list[str], tokenizer, max_tokens: int) -> tuple[list[dict], dict[str, int]]:
    """read_prompt_records, then encode_prompt_records."""
    return encode_prompt_records(data, read_prompt_records(data, files), tokenizer, max_tokens)


def write_samples(path: str, step: int, groups: list[Group], n: int) -> None:
    """Appends `n` rollouts of `groups` to `path` (samples.jsonl): the first completion of each group, then the
    second, ...: rendered prompt, completion, each reward, length in tokens, truncated. Process 0 writes, from
    what it holds: sample_groups' groups are the whole rollout on every process (all rows' texts, every
    process's scores)."""
    if not jax.process_index() == 0 or not groups or n <= 0:
        return
    rows = [(g, j) for j in range(len(groups[0].texts)) for g in groups][:n]
    append_jsonl(path, [{"step": step, "prompt": g.record["prompt_text"], "completion": g.texts[j],
                         "reward": float(g.rewards[j]),
                         "rewards": {k: float(v[j]) for k, v in g.per_reward.items()},
                         "length": int(g.lengths[j]), "truncated": bool(g.truncated[j])} for g, j in rows])


class PromptStream:
    """Prompt records in a seeded shuffle per epoch; its state ({epoch, index}) is saved with checkpoints."""

    def __init__(self, records: list[dict], seed: int):
        self.records, self.seed = records, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.index == len(self.records):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            out.append(self.records[self._order[self.index]])
            self.index += 1
        return out

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle(self.epoch)


# ------------------------------------------------------------------------------------- arrays and references


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def put_rows(host: dict[str, np.ndarray], mesh, rules) -> dict[str, Any]:
    """Host arrays (the same on every host) as global arrays sharded over rows."""
    out = {}
    for k, v in host.items():
        spec = logical_to_spec(("act_batch",) + (None,) * (v.ndim - 1), rules, mesh, v.shape, f"GRPO batch {k!r}")
        out[k] = jax.device_put(v, NamedSharding(mesh, spec))
    return out


class ReferenceStore:
    """Reference params saved at reset steps (WORKDIR/reference/<step>), so a resume restores the right one."""

    def __init__(self, directory: str):
        self.directory = directory

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, params) -> None:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(self._path(step), params, force=True)

    def restore(self, step: int, cfg: models.ModelConfig, shardings):
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                models.abstract_params(cfg), shardings)
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(self._path(step), abstract)

    def prune(self, checkpointer: ckpt_lib.Checkpointer) -> None:
        """Delete references that no remaining checkpoint can need (older than the oldest one's)."""
        if not jax.process_index() == 0 or not os.path.isdir(self.directory):
            return
        checkpointer.wait()
        kept = checkpointer.manager.all_steps()
        if not kept:
            return
        saved = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
        needed = max([s for s in saved if s <= min(kept)], default=None)
        import shutil

        for s in saved:
            if needed is not None and s < needed:
                shutil.rmtree(self._path(s), ignore_errors=True)
