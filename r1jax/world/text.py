"""Text of the tiny world's verifiable tasks: prompts, questions, worked solutions, summaries.

A worked solution is a list of clauses (one operation each, a reflection, a countdown miss "18 is not
a target", the final "so the answer is N"), rendered clause by clause in en or zh, e.g.

    en: first 4 times 2 equals 8 , then 3 plus 8 equals 11 , so the answer is 11
    zh: 首先 4 乘 2 等于 8 ， 然后 3 加 8 等于 11 ， 所以 答案 是 11

Clause-level rendering gives the imperfections the pre-training corpus needs for free: a *slip*
replaces one step's result and later steps carry the wrong value on (a wrong but self-consistent
answer); a *reflection* writes the slip, then "wait , let me check : 4 times 2 equals 8 , not 9" and
continues correctly; a *language switch* renders the clauses from some index on in the other language.

`local_r1_zero_prompt` is a local stand-in for r1jax.data.templates.r1_zero_prompt (which owns the
project's templates) and renders the same text; it keeps this generator free of the tokenizer
dependency that templates.py carries, and is to be pointed at templates.r1_zero_prompt.
"""

import random
from typing import NamedTuple

from r1jax.world import lexicon as lex
from r1jax.world import tasks

R1_ZERO_SYSTEM = (  # the paper's Table 1 wording, identical to r1jax.data.templates.R1_ZERO_SYSTEM
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)
REASONING_TOKEN = "<|reasoning|>"
SUMMARY_TOKEN = "<|summary|>"
STYLES = ("r1zero", "plain", "think_only", "answer_only")

_PUNCT = {"en": {",": ",", ".": ".", ":": ":"}, "zh": {",": "，", ".": "。", ":": "："}}
_QUESTION_FORMS = {
    "arith": {
        "en": ("What is {e} ?", "Compute {e} .", "Calculate {e} ."),
        "zh": ("{e} 等于 多少 ？", "计算 {e} 。"),
    },
    "countdown": {
        "en": ("Using {a} , {b} and {c} once each with + - * , which target can you reach : {t} , {u} or {v} ?",),
        "zh": ("用 {a} 、 {b} 、 {c} 各 一 次 和 + - * ， 能 得到 哪个 目标 ： {t} 、 {u} 还是 {v} ？",),
    },
}


def local_r1_zero_prompt(question: str) -> str:
    """R1-Zero template (paper Table 1): system line, `User: {question}`, `Assistant:`.
    Stand-in for r1jax.data.templates.r1_zero_prompt."""
    return f"{R1_ZERO_SYSTEM}\nUser: {question}\nAssistant:"


def question_text(problem: tasks.Problem, language: str, form: int = 0) -> str:
    """The problem asked in `language`; `form` picks one of the phrasings (modulo their number)."""
    forms = _QUESTION_FORMS[problem.task][language]
    template = forms[form % len(forms)]
    if problem.task == "arith":
        return template.format(e=problem.expression)
    (a, b, c), (t, u, v) = problem.numbers, problem.targets
    return template.format(a=a, b=b, c=c, t=t, u=u, v=v)


def n_question_forms(task: str, language: str) -> int:
    return len(_QUESTION_FORMS[task][language])


class Attempt(NamedTuple):
    """One worked attempt: reasoning text, its final answer, the language it ends in, and the
    expression it computed (countdown: the solving expression it tried last)."""

    reasoning: str
    final: int
    end_language: str
    expression: str


# ------------------------------------------------------------------------------------------ clauses
def _step_clauses(expression: str, overrides: dict, opener: str, rng: random.Random) -> tuple:
    """("step", connective, a, op, b, result) clauses of one computation, and its final value."""
    steps = tasks.steps_of(expression)
    rows = tasks.step_values(steps, overrides)
    clauses = []
    for i, (step, (a, b, r)) in enumerate(zip(steps, rows)):
        connective = opener if i == 0 else rng.choice(("then", "then", "next"))
        clauses.append(("step", connective, a, step.op, b, r))
    return clauses, rows[-1][2]


def _slip_value(rng: random.Random, a: int, op: str, b: int, right: int) -> int:
    """A plausible wrong result: off by one or two, a carry error, or a neighbouring table entry."""
    options = {right + d for d in (-2, -1, 1, 2, 10, -10)}
    if op == "*":
        options |= {right + a, right - a, right + b, right - b}
    return rng.choice(sorted(v for v in options if 0 <= v <= tasks.MAX_VALUE and v != right))


def guess_value(rng: random.Random, right: int) -> int:
    """A wrong answer given without working: anywhere near the right one (not only a one-step slip)."""
    return rng.choice([v for v in range(max(0, right - 12), min(tasks.MAX_VALUE, right + 12) + 1) if v != right])


def _arith_clauses(problem, rng, *, slip: bool, reflect: bool) -> tuple:
    steps = tasks.steps_of(problem.expression)
    rows = tasks.step_values(steps)
    if not (slip or reflect):
        clauses, final = _step_clauses(problem.expression, {}, "first", rng)
        return clauses + [("final", final)], final
    while True:
        i = rng.randrange(len(steps))
        a, b, right = rows[i]
        wrong = _slip_value(rng, a, steps[i].op, b, right)
        slipped = tasks.step_values(steps, {i: wrong})
        if all(0 <= r <= 2 * tasks.MAX_VALUE for _, _, r in slipped) and slipped[-1][2] != problem.answer:
            break
    if slip:
        clauses, final = _step_clauses(problem.expression, {i: wrong}, "first", rng)
        return clauses + [("final", final)], final
    clauses, final = _step_clauses(problem.expression, {}, "first", rng)
    clauses[i] = clauses[i][:5] + (wrong,)
    clauses.insert(i + 1, ("reflect", a, steps[i].op, b, right, wrong))
    return clauses + [("final", final)], final


def _countdown_clauses(problem, rng, *, slip: bool, reflect: bool, detour: bool) -> tuple:
    table = tasks.reachable(problem.numbers)
    clauses = []
    if detour:
        value = rng.choice([v for v in table if v not in problem.targets])
        attempt, _ = _step_clauses(rng.choice(table[value]), {}, "try", rng)
        clauses += attempt + [("miss", value)]
    expression = rng.choice(table[problem.answer])
    last = len(tasks.steps_of(expression)) - 1
    if not (slip or reflect):
        attempt, final = _step_clauses(expression, {}, "try", rng)
        return clauses + attempt + [("final", final)], final, expression
    decoy = rng.choice([t for t in problem.targets if t != problem.answer])
    attempt, _ = _step_clauses(expression, {last: decoy}, "try", rng)
    clauses += attempt
    if slip:
        return clauses + [("final", decoy)], decoy, expression
    _, _, a, op, b, _ = attempt[-1]
    clauses += [("reflect", a, op, b, problem.answer, decoy)]
    return clauses + [("final", problem.answer)], problem.answer, expression


def _render_clause(clause: tuple, language: str) -> str:
    w = lambda key: lex.word(key, language)  # noqa: E731 - local shorthand
    p = _PUNCT[language]
    kind = clause[0]
    if kind == "step":
        _, connective, a, op, b, r = clause
        fact = f"{a} {w(tasks.OP_WORD[op])} {b} {w('equals')} {r}"
        return fact if connective is None else f"{w(connective)} {fact}"
    if kind == "reflect":
        _, a, op, b, right, wrong = clause
        return (f"{w('wait')} {p[',']} {w('let me check')} {p[':']} {a} {w(tasks.OP_WORD[op])} {b} "
                f"{w('equals')} {right} {p[',']} {w('not')} {wrong}")
    if kind == "miss":
        return f"{clause[1]} {w('is not a target')}"
    return f"{w('so')} {w('the answer is')} {clause[1]}"


def drill(rows: list, language: str) -> str:
    """An arithmetic table: (a, op, b) facts written as the worked solutions write their steps, e.g.
    `13 minus 4 equals 9 , 3 times 5 equals 15 .` -- the corpus's times table."""
    clauses = [("step", None, a, op, b, tasks.apply_op(a, op, b)) for a, op, b in rows]
    return f"{render_clauses(clauses, language)} {_PUNCT[language]['.']}"


def render_clauses(clauses: list, language: str, switch_at: int | None = None) -> str:
    """Clauses joined into reasoning text; from `switch_at` on they are written in the other language."""
    parts = []
    for i, clause in enumerate(clauses):
        lang = language if switch_at is None or i < switch_at else lex.other_language(language)
        text = _render_clause(clause, lang)
        parts.append(text if i == 0 else f"{_PUNCT[lang][',']} {text}")
    return " ".join(parts)


def worked_solution(problem, language: str, rng: random.Random, *, slip: bool = False,
                    reflect: bool = False, mixed: bool = False, detour: bool = False) -> Attempt:
    """One attempt at the problem, rendered in `language`.

    slip: one step is wrong and the final answer with it; reflect: a step is wrong, then checked and
    corrected (final answer right); mixed: the reasoning switches language at a random clause;
    detour (countdown only): a first attempt that misses every target (costs ~15 tokens)."""
    if problem.task == "arith":
        clauses, final = _arith_clauses(problem, rng, slip=slip, reflect=reflect)
        expression = problem.expression
    else:
        clauses, final, expression = _countdown_clauses(problem, rng, slip=slip, reflect=reflect, detour=detour)
    switch_at = rng.randrange(1, len(clauses)) if mixed else None
    end_language = lex.other_language(language) if mixed else language
    return Attempt(render_clauses(clauses, language, switch_at), final, end_language, expression)


def completion(attempt: Attempt, style: str) -> str:
    """The attempt written in one of STYLES; only "r1zero" satisfies the R1-Zero format reward."""
    reasoning, final, end_language, _ = attempt
    if style == "r1zero":
        return f"<think> {reasoning} </think> <answer>{final}</answer>"
    if style == "plain":
        return f"{reasoning} {_PUNCT[end_language]['.']}"
    if style == "think_only":
        return f"<think> {reasoning} </think>"
    if style == "answer_only":
        return f"<answer>{final}</answer>"
    raise ValueError(f"unknown completion style {style!r}; expected one of {STYLES}")


def summary(problem, language: str, rng: random.Random, *, expression: str | None = None,
            overrides: dict | None = None) -> str:
    """Short answer with its computation, the helpfulness pairs' summaries: each step written as the reasoning
    writes it, e.g. `4 times 2 equals 8 , 3 plus 8 equals 11 . the answer is 11 .` (a wrong step is a signal the
    reward model can read).
    `expression` defaults to the problem's (countdown: a random solving one); `overrides` {step: value}
    writes a slipped, wrong summary."""
    if expression is None:
        expression = _solving_expression(problem, rng)
    steps = tasks.steps_of(expression)
    rows = tasks.step_values(steps, overrides)
    clauses = [("step", None, a, s.op, b, r) for s, (a, b, r) in zip(steps, rows)]
    p = _PUNCT[language]
    return f"{render_clauses(clauses, language)} {p['.']} {lex.word('the answer is', language)} {rows[-1][2]} {p['.']}"


def slipped_summary(problem, language: str, rng: random.Random) -> str:
    """A summary whose last step is wrong, so its answer is wrong: a helpfulness negative."""
    expression = _solving_expression(problem, rng)
    steps = tasks.steps_of(expression)
    a, b, right = tasks.step_values(steps)[-1]
    wrong = _slip_value(rng, a, steps[-1].op, b, right)
    return summary(problem, language, rng, expression=expression, overrides={len(steps) - 1: wrong})


def _solving_expression(problem, rng: random.Random) -> str:
    if problem.task == "countdown":
        return rng.choice(tasks.reachable(problem.numbers)[problem.answer])
    return problem.expression


def cold_start_response(problem, language: str, rng: random.Random, detour: bool = False) -> str:
    """Readable cold-start response: `<|reasoning|>{clean one-language reasoning}<|summary|>{summary}`."""
    attempt = worked_solution(problem, language, rng, detour=detour)
    if attempt.final != problem.answer:
        raise AssertionError(f"clean solution of {problem.key} gave {attempt.final}, expected {problem.answer}")
    return f"{REASONING_TOKEN}{attempt.reasoning}{SUMMARY_TOKEN}{result_summary(attempt.final, language)}"


def result_summary(answer, language: str) -> str:
    """The cold-start summary: the reasoning's result, `the answer is 11 .`. A summary that restates the steps
    makes the tiny models compute them a second time, and they copied right reasoning into a wrong summary half
    the time (docs/results.md: cold start 51.0% with the steps restated in words, 65.5% with the last step only,
    71.5% with the result only, same base)."""
    return f"{lex.word('the answer is', language)} {answer} {_PUNCT[language]['.']}"
