"""Rule-based rewards for GRPO, their registry, and their weighted sum.

Every reward has one signature, `fn(prompts, completions, **fields) -> list[float]`: `fields` are
the dataset's other columns, each a list aligned with `completions` (`answer`, `tests`,
`language`, `lengths`, ...); a reward reads the columns it names and ignores the rest. Configs name
rewards with weights, `(name, weight)` or `(name, weight, kwargs)`, and `score` sums them; a
reward that raises costs its samples their reward and is counted, never a crash of the trainer.

Rewards are named in one table, BUILTINS (below; the rest live in r1jax.rl.filters and
r1jax.rl.reward_model), and resolved on first use, so no module has to be imported to register
anything. A name of the form `path/to/file.py:function` or `package.module:function` is a plug-in: a
function of one's own with the same signature, loaded from a file anywhere (a relative path is read
from the working directory) or an importable module; a plug-in that raises costs its samples their
reward and is counted, exactly like a built-in. `check_specs(specs, field_names)` runs every config
check (names resolve, kwargs known, required fields present) before anything heavy.

The rewards (docs/reference.md §3, §4):
- `accuracy`: the final answer (answers.final_answer) equals the reference `answer` for
  math-verify (`1/2`, `\\frac{1}{2}` and `0.5` agree); the reference may be bare, GSM8K's `#### 72`
  or MATH's worked solution with `\\boxed{}` (answers.reference_answer). R1-Zero's accuracy reward.
- `format`: R1-Zero's format reward: exactly `<think>...</think>` then `<answer>...</answer>`,
  only whitespace around; or, with `style="reasoning_summary"`, the cold-start format.
- `language_consistency`: R1's reasoning-RL reward, the proportion of target-language words in
  the chain of thought (see `language_word_counts` for what a word is).
- `code`: the share of the sample's `tests` (assert snippets) that the program in the completion
  passes, each run in the sandbox (r1jax.rl.sandbox).
- `length_penalty`: DAPO's soft overlong punishment, 0 up to `max_len - cache_len`, then linear
  down to -1 at `max_len`, -1 beyond; lengths from the `lengths` field (tokens) when the dataset
  has it, else in characters of the completion string.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from math_verify import parse, verify

from r1jax.data.templates import parse_cold_start
from r1jax.rl import answers, sandbox

RewardFn = Callable[..., list]
MAX_ANSWER_CHARS = 1000  # longer "final answers" are rambling, and sympy on them can run for ages

# The built-in rewards, by name: the one place they are registered (no registration by import side effects). Each
# is resolved on first use by the same loader as a plug-in, so naming a reward imports only its own module.
BUILTINS: dict[str, str] = {
    "accuracy": "r1jax.rl.rewards:accuracy",
    "format": "r1jax.rl.rewards:format_reward",
    "language_consistency": "r1jax.rl.rewards:language_consistency",
    "code": "r1jax.rl.rewards:code",
    "length_penalty": "r1jax.rl.rewards:length_penalty",
    "answer_accuracy": "r1jax.rl.filters:answer_accuracy",
    "reward_model": "r1jax.rl.reward_model:reward_model",
    "by_source": "r1jax.rl.reward_model:by_source",
}
# Rewards added at run time by a script of one's own (`register`); configs name plug-ins instead.
REGISTRY: dict[str, RewardFn] = {}
# Where a stage maps a dataset column onto a field a reward reads (named in errors).
FIELD_CONFIG = {"answer": "data.answer_field"}

_log = logging.getLogger(__name__)


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function under `name` for this process (for scripts and tests)."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REGISTRY or name in BUILTINS:
            raise ValueError(f"reward {name!r} is already registered")
        REGISTRY[name] = fn
        return fn

    return add


def get(name: str) -> RewardFn:
    """The reward function `name`: a built-in (BUILTINS), one added by `register`, or a plug-in named
    `path/to/file.py:function` (a relative path is read from the working directory) or
    `package.module:function` (importable from sys.path). Raises KeyError for an unknown name, ValueError for a
    plug-in that cannot be loaded."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name in BUILTINS:
        return load_function(BUILTINS[name])
    if ":" in name:
        return load_function(name)
    raise KeyError(f"unknown reward {name!r}; registered: {', '.join(sorted(set(BUILTINS) | set(REGISTRY)))}; "
                   "or a plug-in 'path/to/file.py:function' / 'package.module:function'")


@functools.lru_cache(maxsize=None)
def load_function(target: str) -> RewardFn:
    """The function `target` names: `path/to/file.py:function` or `package.module:function`. A file is loaded as a
    module of its own (its directory need not be a package or on sys.path); loading it twice reuses it."""
    where, _, attr = target.rpartition(":")
    if not where or not attr.isidentifier():
        raise ValueError(f"reward {target!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    if where.endswith(".py"):
        path = os.path.abspath(os.path.expanduser(where))
        if not os.path.isfile(path):
            raise ValueError(f"reward {target!r}: no file {path} (relative paths are read from the working "
                             f"directory, {os.getcwd()})")
        module_name = "r1jax_reward_plugin_" + re.sub(r"\W", "_", path)
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses / pickling inside the plug-in look themselves up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise ValueError(f"reward {target!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"reward {target!r}: cannot import module {where!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {target!r}: {where} has no function {attr!r}")
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise ValueError(f"reward {target!r}: expected the signature fn(prompts, completions, **fields) -> "
                         f"list[float], got {attr}{inspect.signature(fn)}")
    return fn


def check_specs(specs: Sequence[tuple], field_names) -> None:
    """Checks reward specs against the dataset's field names before anything heavy runs: every reward resolves
    (plug-ins import), weights are numbers, kwargs are known and every required field is there. Raises
    ValueError / TypeError naming the reward and what to fix (score runs the same checks on every batch)."""
    fields = dict.fromkeys(field_names, ())
    for name, _, kwargs in _parse_specs(specs):
        _check_arguments(name, get(name), kwargs, fields)
        for route in dict(kwargs.get("routes") or {}).values():  # a routing reward's specs (by_source), which it
            for spec in route:  # scores one at a time: a name may come twice (two reward models, two aspects)
                check_specs((spec,), fields)


def score(specs: Sequence[tuple], prompts: Sequence[str], completions: Sequence[str],
          fields: Mapping[str, Sequence],
          ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """Weighted sum of rewards for a batch.

    specs: `(name, weight)` or `(name, weight, kwargs)`; kwargs are fixed arguments from the
      config (e.g. `{"max_len": 4096, "cache_len": 512}`), distinct from the dataset's fields.
    Returns (total [N], {name: unweighted rewards [N]}, {name: number of samples that errored}).
    A reward that raises is retried sample by sample, so only the failing samples get 0. Bad
    specs or misaligned inputs are caller bugs and raise at once.
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    for key, column in fields.items():
        if len(column) != n:
            raise ValueError(f"field {key!r}: {len(column)} values for {n} completions")
    total, per_reward, errors = np.zeros(n), {}, {}
    for name, weight, kwargs in _parse_specs(specs):
        fn = get(name)
        _check_arguments(name, fn, kwargs, fields)
        per_reward[name], errors[name] = _evaluate(name, fn, list(prompts), list(completions),
                                                   fields, kwargs)
        total += weight * per_reward[name]
    return total, per_reward, errors


def reward_names(specs) -> set[str]:
    """Every reward name the specs use, those inside a routing reward's `routes` ({source: specs}, by_source)
    included: what a stage is trained on, e.g. which answer format its accuracy is read in."""
    names = set()
    for spec in specs:
        names.add(spec[0])
        routes = dict(spec[2]).get("routes") if len(spec) == 3 else None
        for route in dict(routes or {}).values():
            names |= reward_names(route)
    return names


def _parse_specs(specs) -> list[tuple[str, float, dict]]:
    parsed = []
    for spec in specs:
        if not (isinstance(spec, (tuple, list)) and len(spec) in (2, 3)):
            raise ValueError(f"reward spec {spec!r}: expected (name, weight) "
                             f"or (name, weight, kwargs)")
        name, weight, kwargs = (*spec, {}) if len(spec) == 2 else spec
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight)):
            raise ValueError(f"reward spec {spec!r}: weight must be a finite number")
        try:
            kwargs = dict(kwargs)  # a dict, or a mapping-like config node
        except (TypeError, ValueError):
            raise ValueError(f"reward spec {spec!r}: kwargs must be a dict") from None
        if name in (p[0] for p in parsed):
            raise ValueError(f"reward {name!r} appears twice in the specs")
        parsed.append((name, float(weight), kwargs))
    return parsed


def _check_arguments(name: str, fn: RewardFn, kwargs: dict, fields: Mapping) -> None:
    """Config mistakes fail here, loudly, instead of zeroing a reward for a whole run."""
    params = inspect.signature(fn).parameters
    named = {p for p, v in params.items() if v.kind == v.KEYWORD_ONLY}
    for key in kwargs:
        if key in fields:
            raise ValueError(f"reward {name!r}: kwarg {key!r} is also a dataset field")
        if key not in named:
            raise TypeError(f"reward {name!r}: unknown kwarg {key!r}; it takes {sorted(named)}")
    for p, v in params.items():
        required = v.kind == v.KEYWORD_ONLY and v.default is v.empty
        if required and p not in kwargs and p not in fields:
            mapping = (f" (set {FIELD_CONFIG[p]} to the column of your data that holds it, e.g. "
                       f"{FIELD_CONFIG[p]}='solution')" if p in FIELD_CONFIG else "")
            raise TypeError(f"reward {name!r} needs the field {p!r}, which the data does not have{mapping}; "
                            f"the data's fields: {sorted(fields)}; or give {p!r} as a kwarg in the reward's spec")


def _evaluate(name, fn, prompts, completions, fields, kwargs) -> tuple[np.ndarray, int]:
    n = len(completions)
    try:
        return _as_rewards(fn(prompts, completions, **fields, **kwargs), n), 0
    except Exception as e:  # noqa: BLE001 - a reward must never take the trainer down
        _log.warning("reward %r failed on a batch of %d (%r); retrying per sample", name, n, e)
    values, errors = np.zeros(n), 0
    if n == 1:  # the batch was that one sample
        return values, 1
    for i in range(n):
        one = {key: column[i:i + 1] for key, column in fields.items()}
        try:
            got = fn(prompts[i:i + 1], completions[i:i + 1], **one, **kwargs)
            values[i] = _as_rewards(got, 1)[0]
        except Exception as e:  # noqa: BLE001
            _log.debug("reward %r failed on sample %d: %r", name, i, e)
            errors += 1
    return values, errors


def _as_rewards(values, n: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,) or not np.isfinite(array).all():
        raise ValueError(f"expected {n} finite rewards, got {values!r:.200}")
    return array


# ---------------------------------------------------------------- accuracy


def accuracy(prompts, completions, *, answer, timeout_s: int = 5, **_) -> list[float]:
    """1.0 when the final answer is math-equivalent to the reference `answer`, else 0.0. The reference may be a
    bare answer, a GSM8K solution (`#### 72`) or a MATH solution (its last `\\boxed{}`): answers.reference_answer.

    math-verify bounds parsing and comparison with SIGALRM, which exists only in the main thread;
    from a worker thread its timeouts are off, and MAX_ANSWER_CHARS is the only bound.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
        raise ValueError(f"timeout_s: expected a positive int (SIGALRM counts whole seconds), "
                         f"got {timeout_s!r}")
    return [float(_equivalent(answers.final_answer(c), reference, timeout_s))
            for c, reference in zip(completions, answer, strict=True)]


def _equivalent(predicted: str | None, reference, timeout_s: int) -> bool:
    reference = answers.reference_answer(reference)
    if predicted is None or len(predicted) > MAX_ANSWER_CHARS:
        return False
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    gold = _parse_reference(reference, timeout)
    predicted = parse(_as_math(predicted), parsing_timeout=timeout)
    return verify(gold, predicted, timeout_seconds=timeout)


@functools.lru_cache(maxsize=4096)  # the G samples of a group share one reference
def _parse_reference(reference: str, timeout: int | None) -> list:
    gold = parse(_as_math(reference), parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"reference answer {reference!r} does not parse as math")
    return gold


def _as_math(text: str) -> str:
    """Plain answers become inline LaTeX, where math-verify reads them most reliably."""
    return text if "$" in text else f"${text}$"


# ---------------------------------------------------------------- format

_THINK_ANSWER = re.compile(r"\A\s*<think>.*</think>\s*<answer>.*</answer>\s*\Z", re.S)


def format_reward(prompts, completions, *, style: str = "think_answer", **_) -> list[float]:
    """1.0 for a well-formed completion, else 0.0.

    think_answer: `<think>...</think>` then `<answer>...</answer>`, each tag exactly once, nothing
      but whitespace before, between and after. reasoning_summary: one `<|reasoning|>` at the start,
      then one `<|summary|>` (r1jax.data.templates.parse_cold_start).
    """
    if style == "think_answer":
        tags = (answers.THINK_OPEN, answers.THINK_CLOSE, answers.ANSWER_OPEN, answers.ANSWER_CLOSE)
        return [float(bool(_THINK_ANSWER.match(c)) and all(c.count(t) == 1 for t in tags))
                for c in completions]
    if style == "reasoning_summary":
        return [float(parse_cold_start(c) is not None) for c in completions]
    raise ValueError(f"format style {style!r}: expected 'think_answer' or 'reasoning_summary'")


# ---------------------------------------------------------------- language consistency

_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"  # ASCII and accented letters, not × ÷
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"  # CJK ideographs
_WORDS = re.compile(f"(?P<en>[{_LATIN}]+)|(?P<zh>[{_HAN}])|(?P<other>[^\\W\\d_{_LATIN}{_HAN}]+)")
# Math and code carry no language: fenced code, $$..$$, $..$, \[..\], \(..\) and LaTeX commands.
_NEUTRAL = re.compile(r"```.*?```|\$\$.*?\$\$|\$[^$]*\$|\\\[.*?\\\]|\\\(.*?\\\)|\\[A-Za-z]+", re.S)
LANGUAGES = ("en", "zh")


def language_word_counts(text: str) -> dict[str, int]:
    """Words per script: {"en": .., "zh": .., "other": ..}.

    A run of Latin letters is one English word, each CJK ideograph one Chinese word, a run of
    letters of any other script one "other" word. Digits, punctuation, math and code are neutral,
    and so is a single Latin letter (a variable such as the x in "设x为").
    """
    counts = {"en": 0, "zh": 0, "other": 0}
    for match in _WORDS.finditer(_NEUTRAL.sub(" ", text)):
        if match.lastgroup != "en" or len(match.group()) > 1:
            counts[match.lastgroup] += 1
    return counts


def language_share(text: str, language: str) -> float | None:
    """Share of `language` words among all words of `text`; None when it has no words."""
    if language not in LANGUAGES:
        raise ValueError(f"language {language!r}: expected one of {LANGUAGES}")
    counts = language_word_counts(text)
    words = sum(counts.values())
    return counts[language] / words if words else None


def language_consistency(prompts, completions, *, language, **_) -> list[float]:
    """Share of target-language words in the reasoning (docs/reference.md §4, step 3).

    `language` is a field (one code per sample) or a single code given as a kwarg. No reasoning
    section (or a blank one): 0.0; reasoning with no words at all (pure math): 1.0, as nothing in
    it is in the wrong language."""
    targets = [language] * len(completions) if isinstance(language, str) else language
    rewards = []
    for completion, target in zip(completions, targets, strict=True):
        if target not in LANGUAGES:
            raise ValueError(f"language {target!r}: expected one of {LANGUAGES}")
        reasoning, _ = answers.split_reasoning(completion)
        share = language_share(reasoning, target) if reasoning else 0.0
        rewards.append(1.0 if share is None else share)
    return rewards


# ---------------------------------------------------------------- code


def code(prompts, completions, *, tests, limits: Mapping | None = None,
         max_workers: int | None = None, **_) -> list[float]:
    """Share of the sample's `tests` (assert snippets) passed by the completion's program
    (answers.extract_program), every test a separate sandboxed run whose verdict the sandbox's
    evaluator decides outside the program's interpreter; no program: 0.0.
    `limits` (kwarg) overrides SandboxLimits fields, e.g. {"timeout_s": 2.0}. Where the sandbox
    cannot hold a program (no namespaces, module doc of r1jax.rl.sandbox) it raises, which `score`
    counts as this reward's errors, unless `{"allow_unsafe": True}` (then
    sandbox.metrics()["sandbox/unsafe_runs"] counts the runs)."""
    for i, sample_tests in enumerate(tests):  # validate everything before running anything
        if (isinstance(sample_tests, str) or not sample_tests
                or not all(isinstance(t, str) for t in sample_tests)):
            raise ValueError(f"tests[{i}]: expected a non-empty list of str, "
                             f"got {sample_tests!r:.80}")
    programs = [answers.extract_program(c) for c in completions]
    runnable = [i for i, p in enumerate(programs) if p is not None]
    shares = sandbox.run_many([(programs[i], list(tests[i])) for i in runnable],
                              limits=sandbox.SandboxLimits(**(limits or {})),
                              max_workers=max_workers)
    rewards = [0.0] * len(completions)
    for i, share in zip(runnable, shares):
        rewards[i] = share
    return rewards


# ---------------------------------------------------------------- overlong shaping


def make_overlong_penalty(max_len: int, cache_len: int) -> RewardFn:
    """DAPO's soft overlong punishment (Yu et al. 2025) as a reward function:
    0 for |y| <= max_len - cache_len, ((max_len - cache_len) - |y|) / cache_len up to max_len,
    -1 beyond. |y| is the `lengths` field (tokens) when given, else len(completion) characters."""
    for key, value in (("max_len", max_len), ("cache_len", cache_len)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key}: expected an int, got {value!r}")
    if not 0 <= cache_len <= max_len or max_len <= 0:
        raise ValueError(f"expected 0 <= cache_len <= max_len and max_len > 0, got "
                         f"max_len={max_len}, cache_len={cache_len}")
    free = max_len - cache_len

    def overlong_penalty(prompts, completions, *, lengths=None, **_) -> list[float]:
        sizes = [len(c) for c in completions] if lengths is None else lengths
        if len(sizes) != len(completions):
            raise ValueError(f"{len(sizes)} lengths for {len(completions)} completions")
        return [0.0 if size <= free else -1.0 if size > max_len else (free - size) / cache_len
                for size in sizes]

    return overlong_penalty


def length_penalty(prompts, completions, *, max_len: int, cache_len: int, lengths=None,
                   **_) -> list[float]:
    """make_overlong_penalty(max_len, cache_len), configured from the spec's kwargs."""
    return make_overlong_penalty(max_len, cache_len)(prompts, completions, lengths=lengths)
