"""What rejection sampling and evaluation check in a sampled response (docs/reference.md §4, step 4).

R1 keeps, per prompt, only the sampled responses that are correct and readable: "we filter out chain-of-thought
with mixed languages, long paragraphs, and code blocks". Each check here is one small function of a
completion's text, and `reject_reason` applies them in a fixed order so every rejected response is counted under
exactly one reason (the stats file of r1jax/stages/rejection_sampling.py):

  truncated        the sampler hit max_new_tokens before EOS (no complete response)
  no_reasoning     no closed reasoning section or an empty answer / summary (answers.split_reasoning)
  code_block       a fenced ``` block inside the reasoning
  long_paragraph   a reasoning paragraph (blank-line separated) longer than max_paragraph_chars
  mixed_language   the reasoning's share of the target language's words (rewards.language_share) below
                   min_language_share; without a target language, the dominant script's share
  incorrect        the rule check failed (answer / tests) or the judge rejected it

Correctness (`extract_answer`, `answer_accuracy`): the R1-Zero format's answer is answers.final_answer (the
`<answer>` content or its \\boxed{}), as for the `accuracy` reward. The readable cold-start format's summary
is prose ("... the answer is 11 ."), where answers.final_answer finds an answer only inside \\boxed{}; here a
summary without one falls back to math-verify's own extraction from plain text (the final number or
expression, or the one after "the answer is"). The `answer_accuracy` reward is that check, so reasoning RL
from a cold-start model gets an accuracy signal from its summaries.
"""

from __future__ import annotations

import dataclasses
import re

from math_verify import parse

from r1jax.rl import answers, rewards

REASONS = ("truncated", "no_reasoning", "code_block", "long_paragraph", "mixed_language", "incorrect")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclasses.dataclass(frozen=True)
class Readability:
    """Readability thresholds (config: rejection.readability)."""

    max_paragraph_chars: int = 2000
    min_language_share: float = 0.95
    reject_code_blocks: bool = True


# ------------------------------------------------------------------------------------------- answers


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion in either format (see the module docstring), or None."""
    answer = answers.final_answer(completion)
    if answer is not None or not answers.is_readable_format(completion):
        return answer
    _, summary = answers.split_reasoning(completion)
    if not summary:
        return None
    found = parse(summary[-rewards.MAX_ANSWER_CHARS:])
    return str(found[-1]) if found else None


def answer_accuracy(prompts, completions, *, answer, timeout_s: int = 5, **_) -> list[float]:
    """1.0 when `extract_answer` is math-equivalent to the reference `answer` (either output format)."""
    return [float(answer_correct(extract_answer(c), reference, timeout_s))
            for c, reference in zip(completions, answer, strict=True)]


def answer_correct(predicted: str | None, reference, timeout_s: int = 5) -> bool:
    """Whether an extracted answer is math-equivalent to the reference (math-verify, as `accuracy`)."""
    return rewards._equivalent(predicted, reference, timeout_s)  # noqa: SLF001 - the one equivalence rule


# ------------------------------------------------------------------------------------------- readability


def has_code_block(reasoning: str) -> bool:
    return "```" in reasoning


def longest_paragraph(reasoning: str) -> int:
    """Characters of the longest blank-line-separated paragraph."""
    return max((len(p.strip()) for p in _PARAGRAPH_BREAK.split(reasoning)), default=0)


def language_share(reasoning: str, language: str | None) -> float | None:
    """Share of the target language's words in the reasoning (None: no words). Without a target, the share of
    the most used script, so a reasoning that mixes two languages scores low either way."""
    if language:
        return rewards.language_share(reasoning, language)
    counts = rewards.language_word_counts(reasoning)
    total = sum(counts.values())
    return max(counts.values()) / total if total else None


def reject_reason(completion: str, *, truncated: bool = False, language: str | None = None,
                  readability: Readability = Readability()) -> str | None:
    """The first readability reason (REASONS order, correctness excluded) to reject `completion`, or None."""
    if truncated:
        return "truncated"
    reasoning, answer = answers.split_reasoning(completion)
    if not reasoning or not answer:
        return "no_reasoning"
    if readability.reject_code_blocks and has_code_block(reasoning):
        return "code_block"
    if longest_paragraph(reasoning) > readability.max_paragraph_chars:
        return "long_paragraph"
    share = language_share(reasoning, language)
    if share is not None and share < readability.min_language_share:
        return "mixed_language"
    return None
