"""Judges for responses that no rule can check (rejection sampling, docs/reference.md §4 step 4).

R1 judges such answers with DeepSeek-V3 as a generative reward model: the question, the reference and the
model's answer go into a prompt, and the judge says whether the answer is right. Two judges share one interface,
`judge(questions, references, responses) -> scores [N]`, a response kept when its score >= min_score:

  RewardModelJudge   a trained reward model (r1jax/rl/reward_model.py) of an aspect: its scalar score
  GenerativeJudge    any causal LM (an r1jax run or a Hugging Face directory): the score is
                     log p(yes | prompt) - log p(no | prompt), with the prompt rendered from `prompt_template`
                     ({question}, {reference}, {response}), as is for a base LM (template "") or as one user
                     turn in the judge's own chat template (template "checkpoint", an HF chat model); min_score 0
                     keeps what the judge thinks more likely right than wrong
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import models
from r1jax.data import chat
from r1jax.rl import answers
from r1jax.rl import reward_model as rm_lib

DEFAULT_PROMPT = ("Question: {question}\nReference answer: {reference}\nResponse: {response}\n"
                  "Is the response correct? Answer yes or no.\nAnswer:")


@dataclasses.dataclass(frozen=True)
class RewardModelJudge:
    rm: rm_lib.RewardModel
    aspect: str | None = None  # default: the RM's own

    def __call__(self, questions: Sequence[str], references: Sequence[str | None], responses: Sequence[str]):
        return self.rm.score(questions, responses, self.aspect)


@dataclasses.dataclass(frozen=True)
class GenerativeJudge:
    cfg: models.ModelConfig
    params: Any
    tokenizer: Any
    prompt_template: str = DEFAULT_PROMPT
    yes: str = " yes"
    no: str = " no"
    max_len: int = 1024
    batch_size: int = 16
    template: str = ""  # "": the prompt text as is; "checkpoint" (or a plain template name): rendered as a user turn

    def prompt(self, question: str, reference: str | None, response: str) -> str:
        _, summary = answers.split_reasoning(response)
        return self.prompt_template.format(question=question, reference=reference or "",
                                           response=summary if summary is not None else response)

    def __call__(self, questions: Sequence[str], references: Sequence[str | None], responses: Sequence[str]):
        """log p(yes) - log p(no) after each judge prompt [N]."""
        yes, no = self.tokenizer.encode(self.yes), self.tokenizer.encode(self.no)
        rows, starts = [], []
        for q, ref, resp in zip(questions, references, responses, strict=True):
            text = self.prompt(q, ref, resp)
            if self.template:
                text = chat.render(self.template, self.tokenizer, text)
            head = chat.encode_prompt(self.tokenizer, text)[-(self.max_len - max(len(yes), len(no))):]
            rows += [head + yes, head + no]
            starts += [len(head), len(head)]
        logp = []
        for i in range(0, len(rows), 2 * self.batch_size):
            chunk = rows[i:i + 2 * self.batch_size]
            tokens, lengths = rm_lib.pad_rows(chunk, self.tokenizer.pad_id, 2 * self.batch_size)
            start = np.asarray(starts[i:i + 2 * self.batch_size] + [1] * (2 * self.batch_size - len(chunk)), np.int32)
            logp.append(np.asarray(_continuation_logprob(self.cfg)(self.params, tokens, lengths, start))[:len(chunk)])
        both = np.concatenate(logp) if logp else np.zeros((0,), np.float32)
        return both[0::2] - both[1::2]


@functools.lru_cache(maxsize=8)
def _continuation_logprob(cfg: models.ModelConfig):
    """jitted (params, tokens [B, T], lengths [B], start [B]) -> sum of log p(tokens[t]) for start <= t < length."""

    def fn(params, tokens_bt, lengths_b, start_b):
        segment_ids = (jnp.arange(tokens_bt.shape[1])[None, :] < lengths_b[:, None]).astype(jnp.int32)
        hidden_btd, _ = models.hidden_states(params, tokens_bt, cfg, segment_ids=segment_ids)
        return rm_lib.continuation_logprob(params, hidden_btd, tokens_bt, lengths_b, start_b, cfg)[0]

    return jax.jit(fn)
