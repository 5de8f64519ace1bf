"""Reading a completion: where its reasoning, its answer, its final result and its program are.

The recipe has two output formats (docs/reference.md §4):
- R1-Zero tags: `<think>REASONING</think> <answer>ANSWER</answer>` (the paper's Table 1 template);
- the cold-start readable format: `<|reasoning|>REASONING<|summary|>SUMMARY` (§4 step 2), whose
  summary plays the answer's part.
A prompt may already end with the opening marker (`<think>` or `<|reasoning|>`), so only the
closing one is required to find the reasoning. Pure string functions, no scoring: rewards,
rejection sampling and evaluation share them.

Reference answers come in the forms real sets store them (`reference_answer`): GSM8K's worked solution ending in
`#### 72`, MATH's worked solution with the result in `\\boxed{}`, or a bare answer (`72`, `\\frac{1}{2}`, 72).
"""

from __future__ import annotations

import re

from r1jax.data.tokenizer import REASONING, SUMMARY

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"

_ANSWER = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.S)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")  # MATH writes a few results in \fbox{}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
# Fenced blocks as (label, body); each match consumes its own closing fence, so the closing fence
# of a ```cpp block is never mistaken for an unlabelled opening one.
_FENCED = re.compile(r"```[ \t]*([\w+#.-]*)[ \t]*\n(.*?)```", re.S)
_PYTHON_LABELS = ("python", "python3", "py", "")


def is_readable_format(completion: str) -> bool:
    """Whether `completion` uses the cold-start markers rather than the R1-Zero tags."""
    return REASONING in completion or SUMMARY in completion


def split_reasoning(completion: str) -> tuple[str | None, str | None]:
    """(reasoning, answer) of a completion in either format, each stripped, None when absent.

    reasoning: the text up to the first closing marker (`</think>` or `<|summary|>`), after the
      opening marker when present; None when the completion never closes its reasoning.
    answer: R1-Zero: the content of the last `<answer>...</answer>`; readable format: the text
      after `<|summary|>`.
    """
    _check_str(completion)
    if is_readable_format(completion):
        head, closed, summary = completion.partition(SUMMARY)
        reasoning = head.partition(REASONING)[2] if REASONING in head else head
        return (reasoning.strip(), summary.strip()) if closed else (None, None)
    head, closed, _ = completion.partition(THINK_CLOSE)
    reasoning = head.partition(THINK_OPEN)[2] if THINK_OPEN in head else head
    answers = _ANSWER.findall(completion)
    return reasoning.strip() if closed else None, answers[-1].strip() if answers else None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces balance (a truncated one is skipped)."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[match.end():i - 1].strip()
    return None


def final_answer(completion: str) -> str | None:
    """The final answer to check against a reference, or None.

    R1-Zero: the last `\\boxed{}` inside the last `<answer>`, else that answer's whole text.
    Readable format: the last `\\boxed{}` in the summary (a prose summary is not an answer).
    No answer section at all: the last `\\boxed{}` anywhere in the completion. Empty: None.
    """
    _, answer = split_reasoning(completion)
    if answer is None:
        return last_boxed(completion) or None
    boxed = last_boxed(answer)
    if boxed is not None or is_readable_format(completion):
        return boxed or None
    return answer or None


def reference_answer(reference) -> str:
    """The answer a dataset's reference field holds, as a string to compare against.

    GSM8K (`... #### 1,080`): the text after the last `####`, thousands separators dropped (`1080`). MATH (a worked
    solution): the content of its last `\\boxed{}`. Otherwise the whole value, stripped: a bare answer (`72`,
    `\\frac{1}{2}`); ints and floats become their str. Raises TypeError for anything else (a list, None) and
    ValueError for an empty answer, so a wrong `data.answer_field` fails loudly instead of scoring 0 forever.
    """
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return str(reference)
    if not isinstance(reference, str):
        raise TypeError(f"reference answer: expected a str or a number, got {type(reference).__name__} "
                        f"({reference!r:.80})")
    if "####" in reference:
        answer = _THOUSANDS.sub("", reference.rpartition("####")[2].strip())
    else:
        boxed = last_boxed(reference)
        answer = boxed if boxed is not None else reference.strip()
    if not answer:
        raise ValueError(f"reference answer {reference!r:.80}: empty")
    return answer


def extract_program(completion: str) -> str | None:
    """The program in a completion: the last ```python block of the answer part, else the whole
    answer text; with no answer part, the last ```python block anywhere; else None."""
    _, answer = split_reasoning(completion)
    blocks = [body for label, body in _FENCED.findall(completion if answer is None else answer)
              if label.lower() in _PYTHON_LABELS]
    if blocks:
        return blocks[-1]
    return answer or None


def _check_str(completion) -> None:
    if not isinstance(completion, str):
        raise TypeError(f"completion: expected a str, got {type(completion).__name__}")
