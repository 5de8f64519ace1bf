"""Verifiable tasks of the tiny world: small arithmetic and countdown, with exact integer answers.

Two task kinds, both graded by exact integer comparison (what math-verify does on plain integers):

- `arith`: an expression over digits 1..9 with 1-3 operators from + - * and parentheses where
  needed, e.g. `3 + 4 * 2`, `(7 - 2) * 3`. Every intermediate value and the result lie in
  [0, MAX_VALUE], so the worked solution is a few short single-operation steps.
- `countdown`: "using 3, 4 and 5 once each with + - *, which target can you reach: 12, 17 or 20?"
  Exactly one listed target is reachable by some expression that uses every number once (checked by
  brute force over all orders, operators and both tree shapes); the answer is that target. This
  keeps countdown's search flavour while the answer stays a single integer, so a reward cannot be
  hacked by writing the target itself as the "expression".

A `Problem` is language-independent; its `key` is the identity used to keep splits disjoint (the
same expression asked in en and in zh is one question).
"""

import ast
import dataclasses
import functools
import itertools
import random

MAX_VALUE = 30
OPS = ("+", "-", "*")
OP_WORD = {"+": "plus", "-": "minus", "*": "times"}
_PREC = {"+": 1, "-": 1, "*": 2}
_AST_OP = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


@dataclasses.dataclass(frozen=True)
class Step:
    """One operation of a worked solution; operands are ("num", v) or ("step", index)."""

    left: tuple
    op: str
    right: tuple


@dataclasses.dataclass(frozen=True)
class Problem:
    """A verifiable question: `expression` is the arith question or countdown's solving expression."""

    task: str
    key: str
    answer: int
    expression: str
    numbers: tuple = ()
    targets: tuple = ()


def apply_op(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@functools.lru_cache(maxsize=1 << 16)
def steps_of(expression: str) -> tuple:
    """The expression's single-operation steps in evaluation order (Python's precedence rules)."""
    steps = []

    def visit(node):
        if isinstance(node, ast.Constant):
            return ("num", node.value)
        left, right = visit(node.left), visit(node.right)
        steps.append(Step(left, _AST_OP[type(node.op)], right))
        return ("step", len(steps) - 1)

    visit(ast.parse(expression, mode="eval").body)
    return tuple(steps)


def step_values(steps: list, overrides: dict | None = None) -> list:
    """The (a, b, result) of every step; `overrides` {index: value} replaces a step's result (a slip),
    and later steps consume the replaced value, as a person who made that slip would."""
    overrides = overrides or {}
    results, rows = [], []
    for i, step in enumerate(steps):
        a, b = (ref[1] if ref[0] == "num" else results[ref[1]] for ref in (step.left, step.right))
        result = overrides.get(i, apply_op(a, step.op, b))
        results.append(result)
        rows.append((a, b, result))
    return rows


def evaluate(expression: str) -> int:
    """The value of an arithmetic expression of the tiny world (no eval of arbitrary code)."""
    rows = step_values(steps_of(expression))
    return rows[-1][2] if rows else int(expression)


def _in_range(steps: list) -> bool:
    return all(0 <= r <= MAX_VALUE for _, _, r in step_values(steps))


def _render(tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    left_s, right_s = _render(left), _render(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        left_s = f"({left_s})"
    if not isinstance(right, int) and (_PREC[right[0]] < _PREC[op] or (_PREC[right[0]] == _PREC[op] and op == "-")):
        right_s = f"({right_s})"
    return f"{left_s} {op} {right_s}"


def _random_tree(rng: random.Random, n_ops: int):
    if n_ops == 0:
        return rng.randint(1, 9)
    n_left = rng.randint(0, n_ops - 1)
    return (rng.choice(OPS), _random_tree(rng, n_left), _random_tree(rng, n_ops - 1 - n_left))


def random_arith(rng: random.Random, n_ops: int) -> Problem:
    """A random in-range arithmetic problem with `n_ops` operators (resampled until in range)."""
    while True:
        expression = _render(_random_tree(rng, n_ops))
        steps = steps_of(expression)
        if _in_range(steps):
            return Problem("arith", f"arith:{expression}", evaluate(expression), expression)


def _trees_of_three(numbers: tuple):
    """Every expression using each of three numbers once: both tree shapes, all orders and operators."""
    for a, b, c in set(itertools.permutations(numbers)):
        for op1, op2 in itertools.product(OPS, OPS):
            yield (op2, (op1, a, b), c)
            yield (op1, a, (op2, b, c))


_REACHABLE_CACHE: dict = {}


def reachable(numbers: tuple, bounded: bool = True) -> dict:
    """{value: [expressions]} for every value reachable from `numbers`; bounded: only expressions whose
    intermediates and result lie in [0, MAX_VALUE] (the solutions the corpus writes); unbounded: any
    integer on the way (what makes a listed target reachable at all). Expressions sorted, so the first
    is a canonical solution."""
    key = (tuple(sorted(numbers)), bounded)
    if key not in _REACHABLE_CACHE:
        found: dict = {}
        for tree in _trees_of_three(key[0]):
            expression = _render(tree)
            steps = steps_of(expression)
            if not bounded or _in_range(steps):
                found.setdefault(step_values(steps)[-1][2], set()).add(expression)
        _REACHABLE_CACHE[key] = {v: sorted(e) for v, e in sorted(found.items())}
    return _REACHABLE_CACHE[key]


def random_countdown(rng: random.Random) -> Problem:
    """A countdown problem: three numbers, three listed targets of which exactly one is reachable."""
    while True:
        numbers = tuple(rng.randint(1, 9) for _ in range(3))
        table = reachable(numbers)
        candidates = [v for v in table if v >= 5]
        if len(table) < 3 or not candidates:
            continue
        answer = rng.choice(candidates)
        anywhere = reachable(numbers, bounded=False)  # a distractor must be unreachable by any route
        near = [v for v in range(max(1, answer - 9), min(MAX_VALUE, answer + 9) + 1) if v not in anywhere]
        if len(near) < 2:
            continue
        targets = tuple(rng.sample(sorted(rng.sample(near, 2) + [answer]), 3))
        expression = rng.choice(table[answer])
        key = f"countdown:{','.join(map(str, numbers))}:{','.join(map(str, targets))}"
        return Problem("countdown", key, answer, expression, numbers, targets)


def unique_problems(rng: random.Random, make, count: int, exclude: set = frozenset()) -> list:
    """`count` problems from `make(rng)` with distinct keys outside `exclude` (fails loudly when the
    problem space is too small for the request)."""
    seen, out = set(exclude), []
    for _ in range(count * 50):
        problem = make(rng)
        if problem.key not in seen:
            seen.add(problem.key)
            out.append(problem)
            if len(out) == count:
                return out
    raise ValueError(f"only {len(out)} distinct problems found, {count} requested: enlarge the task space")


def parse_int_answer(answer_str: str) -> int | None:
    """An integer answer as written by the model: surrounding spaces and a final period allowed."""
    text = answer_str.strip().rstrip(".。").strip()
    try:
        return int(text)
    except ValueError:
        return None


def countdown_answer(numbers: tuple, targets: tuple) -> int:
    """The unique reachable target, recomputed from scratch (fails loudly if not unique)."""
    hits = [t for t in targets if t in reachable(tuple(numbers), bounded=False)]
    if len(hits) != 1:
        raise ValueError(f"countdown {numbers} -> {targets}: {len(hits)} reachable targets, expected 1")
    return hits[0]
