"""The tiny world's pre-training corpus: imperfect worked solutions, arithmetic tables, code, facts and dialogues.

The corpus is built so that the base model it trains attempts the tasks *imperfectly*: sampled at
temperature 1 it uses the R1-Zero format only sometimes (~40% of reasoning documents), it sometimes
answers at once without reasoning (`answer_only`, a guess that is right only `guess_right` of the
time: answering without thinking is unreliable), and some worked attempts carry an arithmetic slip,
while worked, correct computation is the majority of what it shows. GRPO with accuracy + format
rewards then has something to select for: think before answering, drop slips, always close with
`<think> … </think> <answer> … </answer>` (R1-Zero's longer responses and rising accuracy, in small). About 15% of reasoning switches
language mid-way (the readability problem of R1-Zero that the language-consistency reward fixes)
and ~5% shows a reflection ("wait , let me check") that corrects a slip.

Reasoning documents come in three wrappers: the R1-Zero prompt followed by a completion (so RL
prompts are in-distribution), `Question: … / Answer: …`, and a bare question then its solution.
`CorpusMix` holds every probability; `pretrain_documents` yields records and counts what it drew.
"""

import collections
import dataclasses
import random

from r1jax.world import code
from r1jax.world import tasks
from r1jax.world import text
from r1jax.world import facts as world


@dataclasses.dataclass(frozen=True)
class CorpusMix:
    """Probabilities of the pre-training mix (each tuple is (choice, weight) pairs)."""

    kinds: tuple = (("reasoning", 0.58), ("drill", 0.16), ("code", 0.08), ("facts", 0.08), ("dialogue", 0.07),
                    ("translation", 0.03))
    countdown: float = 0.30  # share of reasoning documents that are countdown (else arith)
    arith_ops: tuple = ((1, 0.20), (2, 0.45), (3, 0.35))
    wrappers: tuple = (("template", 0.25), ("qa", 0.35), ("bare", 0.40))
    styles_after_template: tuple = (("r1zero", 0.45), ("plain", 0.15), ("think_only", 0.15), ("answer_only", 0.25))
    styles_otherwise: tuple = (("r1zero", 0.35), ("plain", 0.30), ("think_only", 0.10), ("answer_only", 0.25))
    drill_facts: tuple = (6, 12)  # facts per arithmetic-table document (min, max)
    slip: float = 0.20  # worked attempts with a wrong step and a wrong final answer
    guess_right: float = 0.25  # answer_only documents (no reasoning shown) whose guess is the right answer
    reflect: float = 0.05  # shown reasoning with a wrong step, a "wait, let me check", and the right answer
    mixed: float = 0.15  # shown reasoning that switches language mid-way
    detour: float = 0.25  # countdown reasoning that first tries an expression missing every target
    zh: float = 0.5  # share of questions asked in zh
    code_correct: float = 0.65
    code_think: float = 0.40


def _pick(rng: random.Random, pairs: tuple):
    choices, weights = zip(*pairs)
    return rng.choices(choices, weights)[0]


def _wrap(question: str, completion: str, wrapper: str, language: str) -> str:
    if wrapper == "template":
        return f"{text.local_r1_zero_prompt(question)} {completion}"
    if wrapper == "qa":
        if language == "en":
            return f"Question: {question}\nAnswer: {completion}"
        return f"问题 ： {question}\n回答 ： {completion}"
    return f"{question}\n{completion}"


def reasoning_document(rng: random.Random, problem: tasks.Problem, mix: CorpusMix, counts: collections.Counter) -> str:
    """One worked attempt at `problem` in a random wrapper, style, language and correctness."""
    language = "zh" if rng.random() < mix.zh else "en"
    wrapper = _pick(rng, mix.wrappers)
    style = _pick(rng, mix.styles_after_template if wrapper == "template" else mix.styles_otherwise)
    u = rng.random()
    slip, reflect = u < mix.slip, mix.slip <= u < mix.slip + mix.reflect
    shows_reasoning = style != "answer_only"
    mixed = shows_reasoning and rng.random() < mix.mixed
    detour = rng.random() < mix.detour
    attempt = text.worked_solution(problem, language, rng, slip=slip, reflect=reflect and shows_reasoning,
                                   mixed=mixed, detour=detour)
    if not shows_reasoning:  # an answer without reasoning is a guess: right only guess_right of the time
        attempt = attempt._replace(final=problem.answer if rng.random() < mix.guess_right else
                                   text.guess_value(rng, problem.answer))
    form = rng.randrange(text.n_question_forms(problem.task, language))
    counts.update({"reasoning": 1, f"style:{style}": 1, f"wrapper:{wrapper}": 1, f"language:{language}": 1,
                   "correct" if attempt.final == problem.answer else "wrong": 1,
                   "shown": int(shows_reasoning), "mixed": int(mixed), "reflect": int(reflect and shows_reasoning)})
    return _wrap(text.question_text(problem, language, form), text.completion(attempt, style), wrapper, language)


def drill_document(rng: random.Random, mix: CorpusMix, counts: collections.Counter) -> str:
    """An arithmetic table of the single steps that the tasks' worked solutions take (drawn from the steps
    of fresh random 2-3 operator problems, so two-digit operands appear as often as the solutions need
    them). Without it the base model gets one-digit facts right (~92%) and facts with a two-digit operand
    mostly wrong (~10-30%, measured in docs/results.md), which caps what RL can select for."""
    language = "zh" if rng.random() < mix.zh else "en"
    rows = []
    while len(rows) < rng.randint(*mix.drill_facts):
        problem = tasks.random_arith(rng, rng.choice((1, 2, 3)))
        steps = tasks.steps_of(problem.expression)
        rows += [(a, step.op, b) for step, (a, b, _) in zip(steps, tasks.step_values(steps))]
    counts["drill"] += 1
    return text.drill(rows, language)


def code_document(rng: random.Random, task: code.CodeTask, mix: CorpusMix, counts: collections.Counter) -> str:
    """A code task with a (possibly wrong) one-line solution, in the R1-Zero format or as plain code."""
    language = "zh" if rng.random() < mix.zh else "en"
    think = rng.random() < mix.code_think
    correct = rng.random() < mix.code_correct
    wrapper = "template" if think and rng.random() < 0.7 else rng.choice(("qa", "bare"))
    counts.update({"code": 1, "code_correct": int(correct), "code_think": int(think)})
    return _wrap(task.question[language], code.code_completion(task, language, think=think, correct=correct),
                 wrapper, language)


def pretrain_documents(rng: random.Random, n_docs: int, arith_pool: list, countdown_pool: list,
                       code_pool: list, mix: CorpusMix = CorpusMix()) -> tuple:
    """(records [{"text", "kind"}], counts of what was drawn). One-operator arithmetic is drawn fresh
    (it is the corpus's "times table" and never appears in the RL splits); the rest comes from the pools."""
    counts: collections.Counter = collections.Counter()
    records = []
    for _ in range(n_docs):
        kind = _pick(rng, mix.kinds)
        if kind == "reasoning":
            if rng.random() < mix.countdown:
                problem = rng.choice(countdown_pool)
            else:
                n_ops = _pick(rng, mix.arith_ops)
                problem = tasks.random_arith(rng, 1) if n_ops == 1 else rng.choice(arith_pool[n_ops])
            records.append({"text": reasoning_document(rng, problem, mix, counts), "kind": problem.task})
            continue
        if kind == "drill":
            records.append({"text": drill_document(rng, mix, counts), "kind": kind})
            continue
        if kind == "code":
            records.append({"text": code_document(rng, rng.choice(code_pool), mix, counts), "kind": kind})
            continue
        if kind == "facts":
            doc = world.fact_paragraph(rng, "zh" if rng.random() < mix.zh else "en", rng.randint(2, 5))
        elif kind == "dialogue":
            doc = world.dialogue(rng, "zh" if rng.random() < mix.zh else "en")
        else:
            doc = " ".join(world.translation_line(rng) for _ in range(rng.randint(2, 4)))
        counts[kind] += 1
        records.append({"text": doc, "kind": kind})
    return records, counts


def mix_report(counts: collections.Counter, n_docs: int) -> dict:
    """Measured shares of the drawn corpus, for the manifest: document kinds over all documents;
    correctness, style, wrapper, language over reasoning documents; mixing and reflection over those
    that show their reasoning (not answer_only); correctness and format over code documents."""
    n_reason, n_shown, n_code = (max(counts[k], 1) for k in ("reasoning", "shown", "code"))
    report = {f"docs:{k}": counts[k] / n_docs for k in ("reasoning", "drill", "code", "facts", "dialogue", "translation")}
    report.update({f"reasoning:{k}": counts[k] / n_reason for k in ("correct", "wrong")})
    report.update({f"shown_reasoning:{k}": counts[k] / n_shown for k in ("mixed", "reflect")})
    report.update({f"reasoning:{k}": counts[k] / n_reason for k in sorted(counts)
                   if k.startswith(("style:", "wrapper:", "language:"))})
    report.update({"code:correct": counts["code_correct"] / n_code, "code:think": counts["code_think"] / n_code})
    return {k: round(v, 4) for k, v in report.items()}
