"""Prompt templates, the cold-start output format, and SFT example encoding.

Templates are data (`TEMPLATES`, named in configs) rendered by one function, `render_prompt`:
optional system text, the conversation turns, and the assistant prefix the model continues from.

- "r1_zero": the R1-Zero template (DeepSeek-R1 paper, Table 1, in substance): a system line saying
  the assistant thinks first and answers after, with the reasoning and the answer enclosed in
  <think> </think> and <answer> </answer>; then `User: {question}` and `Assistant:`.
- "chat": the project's role tokens, `<|system|>..<|user|>..<|assistant|>`, for SFT and later RL.
- "raw": the prompt verbatim (pretraining-style continuation).

A Hugging Face checkpoint's own chat template (Jinja, from its tokenizer files) is rendered by
r1jax.data.chat, whose `render` takes these names too plus "checkpoint".

Cold start (REFERENCE §4.2): the readable output format `<|reasoning|>{reasoning}<|summary|>{summary}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from r1jax.data.tokenizer import ASSISTANT, REASONING, SUMMARY, SYSTEM, USER, Tokenizer

R1_ZERO_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)


@dataclasses.dataclass(frozen=True)
class Template:
    """How a conversation becomes prompt text; `render_prompt` is the only code that reads it."""

    system_prefix: str
    user_prefix: str
    assistant_prefix: str
    separator: str = ""
    default_system: str | None = None


TEMPLATES: dict[str, Template] = {
    "r1_zero": Template(system_prefix="", user_prefix="User: ", assistant_prefix="Assistant:",
                        separator="\n", default_system=R1_ZERO_SYSTEM),
    "chat": Template(system_prefix=SYSTEM, user_prefix=USER, assistant_prefix=ASSISTANT),
    "raw": Template(system_prefix="", user_prefix="", assistant_prefix=""),
}

Messages = Sequence[Mapping[str, str]]


def render_prompt(template: str | Template, conversation: str | Messages,
                  system: str | None = None) -> str:
    """Renders a prompt ending where the assistant starts writing.

    `conversation` is one user message or a list of `{"role", "content"}` dicts (roles "system",
    "user", "assistant"); a system message in the list overrides `system`, which overrides the
    template's default system text.
    """
    t = TEMPLATES[template] if isinstance(template, str) else template
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    prefixes = {"user": t.user_prefix, "assistant": t.assistant_prefix}
    system = system if system is not None else t.default_system
    turns = []
    for i, message in enumerate(conversation):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: field 'content': expected a str, got {content!r}")
        if role == "system":
            system = content
        elif role in prefixes:
            turns.append(prefixes[role] + content)
        else:
            raise ValueError(f"message {i}: field 'role': expected system, user or assistant, "
                             f"got {role!r}")
    parts = ([t.system_prefix + system] if system else []) + turns + [t.assistant_prefix]
    return t.separator.join(parts)


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt for one question."""
    return render_prompt("r1_zero", question)


def chat_prompt(conversation: str | Messages, system: str | None = None) -> str:
    """The chat prompt for a user message or a conversation, ending with `<|assistant|>`."""
    return render_prompt("chat", conversation, system)


def format_cold_start(reasoning: str, summary: str) -> str:
    """The cold-start output format: `<|reasoning|>{reasoning}<|summary|>{summary}`."""
    return f"{REASONING}{reasoning}{SUMMARY}{summary}"


def parse_cold_start(text: str) -> tuple[str, str] | None:
    """(reasoning, summary) of a well-formed cold-start output, else None.

    Well-formed: starts with `<|reasoning|>` (leading whitespace allowed) and holds exactly one
    of each marker, reasoning first. Rewards use this to judge the summary alone.
    """
    body = text.lstrip()
    if not body.startswith(REASONING) or body.count(REASONING) != 1 or body.count(SUMMARY) != 1:
        return None
    reasoning, summary = body[len(REASONING):].split(SUMMARY)
    return reasoning, summary


def encode_sft_example(tokenizer: Tokenizer, prompt_text: str, response_text: str,
                       max_len: int | None = None) -> dict[str, np.ndarray]:
    """Tokens `[BOS] prompt response EOS` and a mask that is 1 on the response and the EOS.

    `loss_mask[i] = 1` means token i is a training target (predicted from the tokens before it);
    packing shifts it onto the predicting position. An empty prompt trains the whole text
    (pretraining). Raises ValueError when longer than `max_len` (the pipeline turns this into a
    DataError naming the file and line).
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    prompt = bos + tokenizer.encode(prompt_text)
    response = tokenizer.encode(response_text) + [tokenizer.eos_id]
    tokens = np.asarray(prompt + response, np.int32)
    if max_len is not None and len(tokens) > max_len:
        raise ValueError(f"expected at most {max_len} tokens, got {len(tokens)}")
    loss_mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)])
    return {"tokens": tokens, "loss_mask": loss_mask}
