"""Rule rewards: answer extraction, reference answers in GSM8K / MATH / bare form, math equivalence, format,
language consistency, code through the real sandbox, DAPO's overlong penalty, `score`'s weighting and error
containment, the explicit registry and reward plug-ins (a file outside the repository, from another working
directory)."""
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from r1jax.rl import rewards
from r1jax.rl.answers import extract_program, final_answer, last_boxed, reference_answer, split_reasoning
from r1jax.rl.rewards import language_word_counts, make_overlong_penalty, score


def reward(name, completions, **fields):
    return rewards.get(name)([""] * len(completions), completions, **fields)


@pytest.fixture
def temporary_rewards():
    added = []

    def add(name, fn):
        rewards.register(name)(fn)
        added.append(name)

    yield add
    for name in added:
        del rewards.REGISTRY[name]


# ---------------------------------------------------------------- extraction


def test_split_reasoning_reads_both_formats():
    assert split_reasoning("<think> a </think>\n<answer> 42 </answer>") == ("a", "42")
    assert split_reasoning("prompt ended with the tag </think><answer>1</answer>") == (
        "prompt ended with the tag", "1")
    assert split_reasoning("<think> never closed <answer>1</answer>") == (None, "1")
    assert split_reasoning("<|reasoning|> r <|summary|> s \\boxed{2}") == ("r", "s \\boxed{2}")
    assert split_reasoning("only reasoning <|summary|>sum") == ("only reasoning", "sum")
    assert split_reasoning("<|reasoning|> truncated") == (None, None)
    assert split_reasoning("plain text") == (None, None)
    with pytest.raises(TypeError, match="completion"):
        split_reasoning(None)


def test_final_answer_takes_the_last_balanced_box_or_the_answer_text():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}} and \boxed{3") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    assert final_answer(r"<think>\boxed{7}</think><answer>so \boxed{x^{2}}</answer>") == "x^{2}"
    assert final_answer("<think>t</think><answer> 12 </answer>") == "12"
    assert final_answer(r"<answer>1</answer> later <answer>\boxed{2}</answer>") == "2"
    assert final_answer(r"no tags, \boxed{5} then \boxed{6}.") == "6"
    assert final_answer(r"<|reasoning|>\boxed{9}<|summary|>The answer is \boxed{8}.") == "8"
    assert final_answer("<|reasoning|>r<|summary|>The answer is 8.") is None  # prose: no answer
    assert final_answer("<think>t</think><answer>  </answer>") is None


def test_extract_program_prefers_the_last_python_block_of_the_answer():
    fenced = ("<think>```python\nwrong = 1\n```</think><answer>Here:\n```python\nfirst = 1\n```\n"
              "```cpp\nint x;\n```\n```python\ndef f(): return 2\n```\n</answer>")
    assert extract_program(fenced) == "def f(): return 2\n"
    raw = "<think>t</think><answer>def f(): return 3</answer>"
    assert extract_program(raw) == "def f(): return 3"
    assert extract_program("Sure!\n```py\nprint(1)\n```") == "print(1)\n"
    assert extract_program("no program here") is None


# ---------------------------------------------------------------- accuracy


def test_accuracy_accepts_equivalent_forms():
    forms = [r"<think>t</think><answer>\frac{1}{2}</answer>",
             "<think>t</think><answer>0.5</answer>",
             "<think>t</think><answer>1/2</answer>",
             r"<answer>It is \boxed{\frac12}.</answer>",
             r"so the result is $\boxed{\dfrac{1}{2}}$",
             r"<|reasoning|>r<|summary|>Thus \boxed{0.50}."]
    for reference in ("1/2", r"\frac{1}{2}", "0.5", "$\\frac{1}{2}$"):
        assert reward("accuracy", forms, answer=[reference] * len(forms)) == [1.0] * len(forms)
    assert reward("accuracy", [r"\boxed{x+1}", r"\boxed{3.0}"], answer=["1+x", 3]) == [1.0, 1.0]


def test_accuracy_rejects_wrong_and_missing_answers():
    completions = [r"<answer>\frac{1}{3}</answer>", r"\boxed{2}", "the answer is one half",
                   "<think>1/2</think>", r"\boxed{1/2", "<answer></answer>",
                   "<|reasoning|>1/2<|summary|>one half", r"<answer>\boxed{}</answer>",
                   r"\boxed{ }"]
    n = len(completions)
    assert reward("accuracy", completions, answer=["1/2"] * n) == [0.0] * n


def test_accuracy_works_from_a_worker_thread():
    # math-verify's SIGALRM timeouts would raise outside the main thread; rewards run in pools.
    completions = [r"\boxed{\frac{2}{4}}", r"\boxed{0.25}"]
    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(reward, "accuracy", completions, answer=["1/2", "1/2"]).result()
    assert got == [1.0, 0.0]


def test_accuracy_counts_an_unparseable_reference_as_an_error():
    total, _, errors = score([("accuracy", 1.0)], ["", "", ""], [r"\boxed{1}"] * 3,
                             {"answer": ["1", "", " "]})
    assert total.tolist() == [1.0, 0.0, 0.0] and errors == {"accuracy": 2}


# ---------------------------------------------------------------- format


def test_format_reward_positives_and_negatives():
    good = ["<think>reason</think><answer>42</answer>",
            "  <think>\nmulti\nline\n</think>\n\n<answer>\n42\n</answer>\n",
            "<think></think> <answer>x</answer>"]
    bad = ["Sure. <think>r</think><answer>1</answer>",  # text before
           "<think>r</think><answer>1</answer> done",  # text after
           "<think>r</think> so <answer>1</answer>",  # text between
           "<think>r</think><think>r</think><answer>1</answer>",  # tag twice
           "<think>r</think><answer>1</answer><answer>2</answer>",
           "<think>r <think> r</think><answer>1</answer>",
           "<answer>1</answer><think>r</think>",  # wrong order
           "<think>r</think>", "<answer>1</answer>", "<think>r<answer>1</answer></think>", ""]
    assert reward("format", good + bad) == [1.0] * len(good) + [0.0] * len(bad)


def test_format_reward_for_the_readable_cold_start_format():
    completions = ["<|reasoning|>r<|summary|>s", " <|reasoning|>r\n<|summary|>\ns",
                   "x<|reasoning|>r<|summary|>s", "<|reasoning|>r",
                   "<|reasoning|>r<|summary|>s<|summary|>",
                   "<think>r</think><answer>1</answer>"]
    assert reward("format", completions, style="reasoning_summary") == [1, 1, 0, 0, 0, 0]
    _, per, errors = score([("format", 1.0, {"style": "xml"})], ["", ""], ["a", "b"], {})
    assert per["format"].tolist() == [0.0, 0.0] and errors == {"format": 2}


# ---------------------------------------------------------------- language consistency


def test_language_word_counts_follow_the_script_rules():
    counts = language_word_counts("我们 compute the 答案, 42 + 7 = 49!")
    assert counts == {"en": 2, "zh": 4, "other": 0}
    # LaTeX commands, math spans, code and single-letter variables are neutral
    text = "设x为 \\frac{a}{b} $\\sin x + y$ \\(z\\) ```py\nprint('hello world')\n``` Привет мир"
    assert language_word_counts(text) == {"en": 0, "zh": 2, "other": 2}
    assert language_word_counts("café naïve 中") == {"en": 2, "zh": 1, "other": 0}


def test_language_consistency_is_the_target_share_of_the_reasoning():
    mixed = "<think>我们 compute the 答案 $x^2$ 42</think><answer>1</answer>"  # 4 zh, 2 en
    readable = "<|reasoning|>First, 我 check three cases<|summary|>答案是 1"  # 1 zh, 4 en
    math_only = "<think>$x^2 = 4$, 2 + 2 = 4</think><answer>4</answer>"
    no_reasoning = "<answer>the answer is four</answer>"
    blank = "<think>  </think><answer>4</answer>"
    completions = [mixed, mixed, readable, readable, math_only, no_reasoning, blank]
    languages = ["en", "zh", "en", "zh", "en", "en", "zh"]
    got = reward("language_consistency", completions, language=languages)
    assert got == [2 / 6, 4 / 6, 4 / 5, 1 / 5, 1.0, 0.0, 0.0]
    assert reward("language_consistency", [mixed], language="zh") == [4 / 6]  # one code as a kwarg
    with pytest.raises(ValueError, match="'fr'"):
        reward("language_consistency", [mixed], language=["fr"])


# ---------------------------------------------------------------- code


def test_code_reward_runs_programs_in_the_sandbox():
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-2, 5) == 3",
             "assert add(10, 1) == 11"]
    correct = "<think>add</think><answer>```python\ndef add(a, b):\n    return a + b\n```</answer>"
    half = "<think>add</think><answer>def add(a, b):\n    return a + b if a > 0 else 99</answer>"
    none = "<think>I cannot</think>"
    got = reward("code", [correct, half, none], tests=[tests] * 3, limits={"timeout_s": 5.0},
                 max_workers=2)
    assert got == [1.0, 0.5, 0.0]


def test_code_reward_rejects_samples_without_tests():
    completions = ["<answer>x = 1</answer>", "<answer>y = 2</answer>"]
    _, per, errors = score([("code", 1.0)], ["", ""], completions,
                           {"tests": [["assert x == 1"], []]})
    assert per["code"].tolist() == [1.0, 0.0] and errors == {"code": 1}


# ---------------------------------------------------------------- overlong penalty


def test_overlong_penalty_is_dapo_soft_punishment():
    penalty = make_overlong_penalty(max_len=10, cache_len=4)
    lengths = [0, 6, 7, 8, 10, 11, 100]
    assert penalty([""] * 7, [""] * 7, lengths=lengths) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert penalty(["", ""], ["x" * 6, "x" * 9]) == [0.0, -0.75]  # characters without `lengths`
    _, per, _ = score([("length_penalty", 1.0, {"max_len": 10, "cache_len": 4})], ["", ""],
                      ["a", "b"], {"lengths": [8, 12]})
    assert per["length_penalty"].tolist() == [-0.5, -1.0]
    with pytest.raises(ValueError, match="cache_len"):
        make_overlong_penalty(max_len=4, cache_len=8)
    with pytest.raises(TypeError, match="max_len"):
        make_overlong_penalty(max_len=4.5, cache_len=1)


# ---------------------------------------------------------------- score


def test_score_combines_weighted_rewards_exactly():
    completions = [r"<think>我们 think</think><answer>\boxed{3}</answer>",
                   r"<think>think</think> <answer>4</answer>",
                   r"answer: \boxed{3}"]
    fields = {"answer": ["3", "3", "3"], "language": ["en", "en", "en"], "lengths": [5, 9, 10]}
    specs = [("accuracy", 1.0), ("format", 0.5), ("language_consistency", 0.25),
             ("length_penalty", 2.0, {"max_len": 10, "cache_len": 2})]
    total, per, errors = score(specs, [""] * 3, completions, fields)
    assert per["accuracy"].tolist() == [1.0, 0.0, 1.0]
    assert per["format"].tolist() == [1.0, 1.0, 0.0]
    assert per["language_consistency"].tolist() == [1 / 3, 1.0, 0.0]
    assert per["length_penalty"].tolist() == [0.0, -0.5, -1.0]
    expected = [1.0 + 0.5 + 0.25 / 3, 0.5 + 0.25 - 1.0, 1.0 - 2.0]
    np.testing.assert_array_equal(total, np.array(expected))
    assert errors == {"accuracy": 0, "format": 0, "language_consistency": 0, "length_penalty": 0}


def test_a_raising_reward_zeroes_only_its_failing_samples(temporary_rewards):
    def flaky(prompts, completions, **_):
        if any("boom" in c for c in completions):
            raise RuntimeError("boom")
        return [1.0] * len(completions)

    def broken(prompts, completions, **_):
        return [float("nan")] * len(completions)

    temporary_rewards("test_flaky", flaky)
    temporary_rewards("test_broken", broken)
    total, per, errors = score([("test_flaky", 2.0), ("test_broken", 1.0), ("format", 1.0)],
                               ["", "", ""], ["ok", "boom", "<think>a</think><answer>b</answer>"],
                               {})
    assert per["test_flaky"].tolist() == [1.0, 0.0, 1.0]
    assert per["test_broken"].tolist() == [0.0, 0.0, 0.0]
    assert errors == {"test_flaky": 1, "test_broken": 3, "format": 0}
    assert total.tolist() == [2.0, 0.0, 3.0]


def test_score_fails_loudly_on_configuration_mistakes():
    with pytest.raises(KeyError, match="registered: .*accuracy.*code.*format"):
        score([("acuracy", 1.0)], [""], ["x"], {"answer": ["1"]})
    with pytest.raises(TypeError, match=r"needs the field 'answer'.*set data.answer_field.*fields: \['solution'\]"):
        score([("accuracy", 1.0)], [""], ["x"], {"solution": ["1"]})
    with pytest.raises(TypeError, match="needs the field 'max_len'"):
        score([("length_penalty", 1.0)], [""], ["x"], {})
    with pytest.raises(TypeError, match="unknown kwarg 'max_length'"):
        spec = ("length_penalty", 1.0, {"max_length": 5, "max_len": 5, "cache_len": 1})
        score([spec], [""], ["x"], {})
    with pytest.raises(ValueError, match="also a dataset field"):
        score([("language_consistency", 1.0, {"language": "en"})], [""], ["x"],
              {"language": ["en"]})
    with pytest.raises(ValueError, match="field 'answer'"):
        score([("accuracy", 1.0)], ["", ""], ["x", "y"], {"answer": ["1"]})
    with pytest.raises(ValueError, match="twice"):
        score([("format", 1.0), ("format", 2.0)], [""], ["x"], {})
    with pytest.raises(ValueError, match="weight"):
        score([("format", "1")], [""], ["x"], {})


# ---------------------------------------------------------------- reference answers

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                  "altogether in April and May.\n#### 1,072")
MATH_SOLUTION = ("We have $2x = 1$, so $x = \\frac{1}{2}$. An aside: \\boxed{\\text{not this}} is not last.\n"
                 "Therefore the answer is $\\boxed{\\frac{1}{2}}$.")


def test_reference_answers_in_the_forms_real_sets_use():
    assert reference_answer(GSM8K_SOLUTION) == "1072"
    assert reference_answer("text #### 5 #### 7") == "7"
    assert reference_answer(MATH_SOLUTION) == "\\frac{1}{2}"
    assert reference_answer("\\fbox{5}") == "5"
    assert reference_answer(" 72 ") == "72" and reference_answer(72) == "72" and reference_answer(0.5) == "0.5"
    with pytest.raises(TypeError, match="reference answer: expected a str or a number, got list"):
        reference_answer(["1"])
    with pytest.raises(ValueError, match="empty"):
        reference_answer("#### ")
    # the accuracy reward reads all three forms: a MATH-shaped and a GSM8K-shaped set score alike
    completions = ["<think>..</think><answer>\\boxed{0.5}</answer>", "<answer>1072</answer>", "<answer>72</answer>"]
    assert reward("accuracy", completions, answer=[MATH_SOLUTION, GSM8K_SOLUTION, GSM8K_SOLUTION]) == [1.0, 1.0, 0.0]


# ---------------------------------------------------------------- registry and plug-ins

PLUGIN = textwrap.dedent("""
    import math

    def length_bonus(prompts, completions, *, scale=1.0, **fields):
        return [scale * len(c) for c in completions]

    def fragile(prompts, completions, **fields):
        return [1.0 / (len(c) - 2) for c in completions]  # raises on a 2-character completion

    NOT_A_FUNCTION = 3
""")


def test_builtins_resolve_without_importing_their_modules_first():
    code = ("import sys; from r1jax.rl import rewards; "
            "assert 'r1jax.rl.reward_model' not in sys.modules; "
            "assert rewards.get('by_source').__module__ == 'r1jax.rl.reward_model'; "
            "assert rewards.get('answer_accuracy').__module__ == 'r1jax.rl.filters'; "
            "print(sorted(rewards.BUILTINS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    for name in ("accuracy", "answer_accuracy", "by_source", "code", "format", "reward_model"):
        assert repr(name) in out.stdout
    for name in rewards.BUILTINS:  # every entry of the table loads
        assert callable(rewards.get(name))


def test_plugin_from_a_file_outside_the_repo_and_from_another_directory(tmp_path, monkeypatch):
    plugin_dir = tmp_path / "my_rewards"
    plugin_dir.mkdir()
    (plugin_dir / "bonus.py").write_text(PLUGIN)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    specs = [("../my_rewards/bonus.py:length_bonus", 0.5, {"scale": 2.0}), (f"{plugin_dir}/bonus.py:fragile", 1.0),
             ("format", 1.0)]
    rewards.check_specs(specs, ["answer"])
    total, per, errors = score(specs, ["", ""], ["ab", "abcd"], {"answer": ["1", "2"]})
    assert per["../my_rewards/bonus.py:length_bonus"].tolist() == [4.0, 8.0]
    assert per[f"{plugin_dir}/bonus.py:fragile"].tolist() == [0.0, 0.5]  # the failing sample gets 0, counted
    assert errors == {"../my_rewards/bonus.py:length_bonus": 0, f"{plugin_dir}/bonus.py:fragile": 1, "format": 0}
    assert total.tolist() == [2.0, 4.5]
    # a module on sys.path, by its dotted name
    monkeypatch.syspath_prepend(str(plugin_dir))
    assert rewards.get("bonus:length_bonus")(["", ""], ["abc", ""]) == [3.0, 0.0]


def test_plugin_mistakes_fail_before_anything_runs(tmp_path, monkeypatch):
    (tmp_path / "bonus.py").write_text(PLUGIN)
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    (tmp_path / "one_arg.py").write_text("def f(completions):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    cases = {"missing.py:f": "no file .*missing.py.*working directory",
             "broken.py:f": "importing .*broken.py failed: ModuleNotFoundError",
             "bonus.py:nope": "has no function 'nope'",
             "bonus.py:NOT_A_FUNCTION": "has no function 'NOT_A_FUNCTION'",
             "one_arg.py:f": r"expected the signature fn\(prompts, completions",
             "no_such_package.mod:f": "cannot import module 'no_such_package.mod'"}
    for name, match in cases.items():
        with pytest.raises(ValueError, match=match):
            rewards.check_specs([(name, 1.0)], [])
    with pytest.raises(TypeError, match="unknown kwarg 'scael'"):
        rewards.check_specs([("bonus.py:length_bonus", 1.0, {"scael": 2})], [])
    with pytest.raises(TypeError, match=r"needs the field 'answer'.*data.answer_field"):
        rewards.check_specs([("accuracy", 1.0)], ["question", "solution"])


def test_gsm8k_and_math_shaped_files_score_with_the_reference_field_mapped(tmp_path):
    from hf_fixtures import write_gsm8k, write_math

    from r1jax.data.sources import iterate_records

    for path, question, reference in ((write_gsm8k(str(tmp_path / "gsm8k.jsonl")), "question", "answer"),
                                      (write_math(str(tmp_path / "math.parquet")), "problem", "solution")):
        records = list(iterate_records([path]))
        fields = {"answer": [r[reference] for r in records]}  # what data.answer_field=<reference> maps
        sums = [int(reference_answer(r[reference])) for r in records]
        right = [f"<think> adding </think> <answer> {s} </answer>" for s in sums]
        wrong = [f"<think> adding </think> <answer> {s + 1} </answer>" for s in sums]
        prompts = [r[question] for r in records]
        assert score([("accuracy", 1.0)], prompts, right, fields)[0].tolist() == [1.0] * len(records)
        assert score([("accuracy", 1.0)], prompts, wrong, fields)[0].tolist() == [0.0] * len(records)
