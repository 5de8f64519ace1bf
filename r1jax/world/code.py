"""Small code tasks of the tiny world: one-line Python functions with assert tests.

Each task comes from a family (a function shape with integer constants), e.g. "write scale_add(x)
that returns x times 3 plus 2" -> `def scale_add(x): return x * 3 + 2`. Why this shape:

- solutions are one-liners (`def f(x): return ...`), so no indentation survives tokenization
  (SentencePiece folds whitespace by default) and a completion stays under ~30 tokens;
- expected test values come from an independent Python lambda per family, not from the solution
  text, so a test that runs the solution against its asserts checks the template, not itself;
- every task also has a `wrong_solution` (a constant or operator slip) that fails at least one test:
  the pre-training corpus uses it for its imperfect attempts.

`run_trusted_tests` executes code in this process: it is for the tiny world's own reference code only.
Model output must go through the sandbox in r1jax.rl.
"""

import dataclasses
import random


@dataclasses.dataclass(frozen=True)
class CodeTask:
    key: str
    entry_point: str
    question: dict  # language -> prompt text
    plan: dict  # language -> one-clause description of the computation
    solution: str
    wrong_solution: str
    tests: tuple


@dataclasses.dataclass(frozen=True)
class _Family:
    entry: str  # entry-point name, formatted with the params
    args: str
    body: str  # the returned expression, formatted with the params
    en: str  # what the function returns, formatted with the params
    zh: str
    params: tuple  # of dicts
    inputs: object  # argument tuples of the tests, or params -> argument tuples
    reference: object  # params -> callable, written independently of `body`
    perturb: object  # params -> params of a plausible wrong solution


def _grid(**ranges) -> tuple:
    keys = list(ranges)
    out = [{}]
    for k in keys:
        out = [dict(p, **{k: v}) for p in out for v in ranges[k]]
    return tuple(out)


def _bump(name):
    return lambda p: dict(p, **{name: p[name] + 1})


_SWAP_OP = {"+": "-", "-": "*", "*": "+"}
_OP_EN = {"+": "plus", "-": "minus", "*": "times"}
_OP_ZH = {"+": "加", "-": "减", "*": "乘"}
_OP_NAME = {"+": "add", "-": "sub", "*": "mul"}

FAMILIES = (
    _Family("scale_add", "x", "x * {a} + {b}", "x times {a} plus {b}", "x 乘 {a} 加 {b}",
            _grid(a=range(2, 10), b=range(1, 21)), ((0,), (3,), (7,)),
            lambda p: lambda x: x * p["a"] + p["b"], _bump("b")),
    _Family("scale_sub", "x", "x * {a} - {b}", "x times {a} minus {b}", "x 乘 {a} 减 {b}",
            _grid(a=range(2, 10), b=range(1, 21)), ((0,), (4,), (9,)),
            lambda p: lambda x: x * p["a"] - p["b"], _bump("a")),
    _Family("add_scale", "x", "(x + {a}) * {b}", "x plus {a} , then times {b}", "x 加 {a} ， 然后 乘 {b}",
            _grid(a=range(1, 21), b=range(2, 10)), ((0,), (2,), (5,)),
            lambda p: lambda x: (x + p["a"]) * p["b"], _bump("a")),
    _Family("{name}", "a, b", "a {op} b", "a {op_en} b", "a {op_zh} b",
            tuple({"op": op, "op_en": _OP_EN[op], "op_zh": _OP_ZH[op], "name": _OP_NAME[op]} for op in "+-*"),
            ((1, 2), (5, 3), (4, 4)),
            lambda p: {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}[p["op"]],
            lambda p: dict(p, op=_SWAP_OP[p["op"]], op_en=_OP_EN[_SWAP_OP[p["op"]]], op_zh=_OP_ZH[_SWAP_OP[p["op"]]])),
    _Family("count_{k}", "xs", "xs.count({k})", "how many times {k} is in the list xs", "xs 里 有 几 个 {k}",
            _grid(k=range(1, 10)), lambda p: (([1, 2, 3],), ([p["k"], 4, p["k"]],), ([p["k"]] * 3 + [0],)),
            lambda p: lambda xs: sum(1 for v in xs if v == p["k"]), _bump("k")),
    _Family("sum_plus_{k}", "xs", "sum(xs) + {k}", "the sum of the list xs plus {k}", "xs 里 的 数 加 起来 再 加 {k}",
            _grid(k=range(1, 21)), (([],), ([1, 2, 3],), ([5, 5],)),
            lambda p: lambda xs: p["k"] + sum(v for v in xs), _bump("k")),
    _Family("is_multiple_of_{k}", "x", "x % {k} == 0", "whether x is a multiple of {k}", "x 是不是 {k} 的 倍数",
            _grid(k=range(2, 10)), lambda p: ((0,), (p["k"] * 3,), (p["k"] + 1,)),
            lambda p: lambda x: (x // p["k"]) * p["k"] == x, _bump("k")),
    _Family("repeat_{k}", "s", "s * {k}", "the string s repeated {k} times", "s 写 {k} 次",
            _grid(k=range(2, 8)), (("ab",), ("",), ("x",)),
            lambda p: lambda s: "".join([s] * p["k"]), _bump("k")),
    _Family("clamp_{lo}_{hi}", "x", "min(max(x, {lo}), {hi})", "x kept between {lo} and {hi}",
            "x ， 但 不 小于 {lo} 也 不 大于 {hi}",
            _grid(lo=range(0, 6), hi=range(6, 13)), ((-3,), (5,), (20,)),
            lambda p: lambda x: p["lo"] if x < p["lo"] else p["hi"] if x > p["hi"] else x, _bump("hi")),
)


def _render(family: _Family, params: dict) -> tuple:
    entry = family.entry.format(**params)
    return entry, f"def {entry}({family.args}): return {family.body.format(**params)}"


def _make_task(family: _Family, params: dict) -> CodeTask:
    entry, solution = _render(family, params)
    wrong_params = family.perturb(params)
    _, wrong = _render(family, wrong_params)
    wrong = wrong.replace(f"def {_render(family, wrong_params)[0]}(", f"def {entry}(")
    fn, wrong_fn = family.reference(params), family.reference(wrong_params)
    inputs = family.inputs(params) if callable(family.inputs) else family.inputs
    tests = tuple(f"assert {entry}({', '.join(map(repr, args))}) == {fn(*args)!r}" for args in inputs)
    if all(fn(*args) == wrong_fn(*args) for args in inputs):
        raise ValueError(f"wrong solution of {entry} passes every test: change the family's perturb")
    plan = {"en": family.en.format(**params), "zh": family.zh.format(**params)}
    question = {
        "en": f"Write a Python function {entry}({family.args}) that returns {plan['en']} .",
        "zh": f"写 一个 Python 函数 {entry}({family.args}) ， 给出 {plan['zh']} 。",
    }
    return CodeTask(f"code:{solution}", entry, question, plan, solution, wrong, tests)


def all_code_tasks() -> list:
    """Every code task of the tiny world, in a fixed order (about 560)."""
    return [_make_task(family, params) for family in FAMILIES for params in family.params]


def split_code_tasks(seed: int, n_heldout: int, n_train: int) -> tuple:
    """(heldout, train, pretrain) code tasks: a seeded shuffle cut into three disjoint parts."""
    tasks = all_code_tasks()
    random.Random(f"{seed}:code-split").shuffle(tasks)
    if n_heldout + n_train >= len(tasks):
        raise ValueError(f"{n_heldout} + {n_train} code tasks requested, only {len(tasks)} exist")
    return tasks[:n_heldout], tasks[n_heldout:n_heldout + n_train], tasks[n_heldout + n_train:]


def code_completion(task: CodeTask, language: str, *, think: bool, correct: bool) -> str:
    """A completion for the task: the (possibly wrong) one-liner, in the R1-Zero format if `think`."""
    code = task.solution if correct else task.wrong_solution
    if not think:
        return code
    return f"<think> {task.plan[language]} </think> <answer>{code}</answer>"


def run_trusted_tests(code: str, tests, entry_point: str) -> bool:
    """True when trusted `code` defines `entry_point` and passes every assert in `tests`.
    Executes in-process: only for the tiny world's own reference code, never for model output."""
    namespace: dict = {}
    try:
        exec(code, namespace)  # noqa: S102 - trusted reference code only (see docstring)
        if entry_point not in namespace:
            return False
        for test in tests:
            exec(test, namespace)  # noqa: S102
    except Exception:  # noqa: BLE001 - any failure of the code under test is a failed test
        return False
    return True
