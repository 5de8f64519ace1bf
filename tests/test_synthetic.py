"""The tiny world: determinism, disjoint splits, answers recomputed independently, the advertised
pre-training mix, code that passes its own tests, and record schemas."""

import collections
import functools
import itertools
import json
import random
import re

import pytest

from r1jax.world import build as world_build
from r1jax.world import code
from r1jax.world import corpus
from r1jax.world import lexicon as lex
from r1jax.world import text

_RL = {"question", "prompt", "answer", "language", "task", "expression", "numbers", "targets", "reward_source"}
SCHEMAS = {
    "pretrain": {"text", "kind"},
    "rl_train": _RL,
    "rl_heldout": _RL,
    "code_train": {"question", "prompt", "tests", "entry_point", "solution", "language", "task", "reward_source"},
    "code_heldout": {"question", "prompt", "tests", "entry_point", "solution", "language", "task", "reward_source"},
    "cold_start": {"question", "prompt", "response", "task", "answer", "language"},
    "non_reasoning": {"question", "prompt", "response", "kind", "language"},
    "preferences_train": {"question", "prompt", "chosen", "rejected", "kind", "subkind", "language"},
    "preferences_heldout": {"question", "prompt", "chosen", "rejected", "kind", "subkind", "language"},
    "general_prompts": {"question", "prompt", "kind", "language", "reward_source"},
}

_ARITH_Q = re.compile(r"(?:What is|Compute|Calculate|计算) ([\d+\-*() ]+?) [?.。？]|([\d+\-*() ]+?) 等于 多少 ？")
_COUNTDOWN_Q = re.compile(r"(?:Using|用) (\d) (?:,|、) (\d) (?:and|、) (\d) .*? (?::|：) "
                          r"(\d+) (?:,|、) (\d+) (?:or|还是) (\d+) [?？]")
_CLAIM = re.compile(r"<answer>(\d+)</answer>|(?:the answer is|答案 是) (\d+)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world written once through the CLI entry point: {name: records}, manifest, out dir."""
    out = tmp_path_factory.mktemp("world")
    world_build.main(["--out", str(out), "--seed", "0", "--scale", "tiny"])
    records = {name: [json.loads(line) for line in open(out / f"{name}.jsonl", encoding="utf-8")] for name in SCHEMAS}
    manifest = json.load(open(out / "manifest.json", encoding="utf-8"))
    return records, manifest, out


def _question_key(text: str):
    """Language-independent identity of the first task question in `text`, parsed from the text."""
    m = _COUNTDOWN_Q.search(text)
    if m:
        return ("countdown",) + tuple(int(g) for g in m.groups())
    m = _ARITH_Q.search(text)
    return ("arith", (m.group(1) or m.group(2)).strip()) if m else None


@functools.lru_cache(maxsize=None)
def _reachable(numbers: tuple) -> set:
    """All values of expressions using each number once with + - * (strings evaluated by Python)."""
    values = set()
    for a, b, c in itertools.permutations(numbers):
        for p, q in itertools.product("+-*", repeat=2):
            values.add(eval(f"({a} {p} {b}) {q} {c}"))  # noqa: S307 - digits and operators only
            values.add(eval(f"{a} {p} ({b} {q} {c})"))  # noqa: S307
    return values


def _truth(key) -> int:
    if key[0] == "arith":
        return eval(key[1])  # noqa: S307 - digits and operators only
    numbers, targets = key[1:4], key[4:]
    hits = [t for t in targets if t in _reachable(tuple(sorted(numbers)))]
    assert len(hits) == 1, f"countdown {key}: reachable targets {hits}"
    return hits[0]


def test_files_parse_with_documented_fields(world):
    records, manifest, out = world
    for name, fields in SCHEMAS.items():
        assert records[name], name
        assert manifest["files"][name]["count"] == len(records[name])
        for record in records[name]:
            assert set(record) == fields, (name, record)
    assert len(records["rl_train"]) == 2000 and len(records["rl_heldout"]) == 200
    assert 20_000 <= len(records["pretrain"]) <= 50_000
    assert sum((out / f"{name}.jsonl").stat().st_size for name in SCHEMAS) < 12e6
    assert {r["reward_source"] for r in records["rl_train"] + records["code_train"]} == {"rule"}
    assert {r["reward_source"] for r in records["general_prompts"]} == {"reward_model"}
    assert {r["kind"] for r in records["general_prompts"]} == {"helpful", "harmless"}
    assert {r["kind"] for r in records["non_reasoning"]} == {"writing", "fact_qa", "self_cognition", "translation"}
    # A ~512-1024 piece vocabulary spends one piece per distinct character: keep the CJK set small.
    assert 100 < len(manifest["cjk_characters"]) <= 170
    for r in records["rl_train"] + records["code_train"]:
        assert r["prompt"] == world_build.text.local_r1_zero_prompt(r["question"])
        assert r["prompt"].endswith(f"User: {r['question']}\nAssistant:") and "<think> </think>" in r["prompt"]
    for name in ("cold_start", "non_reasoning", "preferences_train", "general_prompts"):
        assert all(r["prompt"] == r["question"] for r in records[name]), name


def test_local_r1_zero_prompt_matches_templates():
    templates = pytest.importorskip("r1jax.data.templates")
    question = "What is 3 + 4 * 2 ?"
    assert world_build.text.local_r1_zero_prompt(question) == templates.r1_zero_prompt(question)


def test_same_seed_gives_byte_identical_files(world, tmp_path):
    _, _, out = world
    paths = world_build.write_world(str(tmp_path), seed=0, scale="tiny")
    for name, path in paths.items():
        original = out / f"{name}{'.json' if name == 'manifest' else '.jsonl'}"
        assert open(path, "rb").read() == original.read_bytes(), name


def test_different_seed_gives_different_data():
    scale = world_build.SCALES["tiny"]
    keys = [[p.key for p in world_build.problem_splits(seed, scale)["rl_heldout"]] for seed in (0, 1)]
    assert keys[0] != keys[1]
    pools = world_build.problem_splits(0, scale)["pretrain"]
    arith = {n: [p for p in pools if p.task == "arith" and p.expression.count(" ") == 2 * n] for n in (2, 3)}
    countdown = [p for p in pools if p.task == "countdown"]
    docs = [corpus.pretrain_documents(random.Random(seed), 50, arith, countdown, code.all_code_tasks())[0]
            for seed in (0, 1)]
    assert docs[0] != docs[1]


def test_splits_are_disjoint(world):
    records, _, _ = world
    heldout = {_question_key(r["question"]) for r in records["rl_heldout"]}
    train = {_question_key(r["question"]) for r in records["rl_train"]}
    cold = {_question_key(r["question"]) for r in records["cold_start"] if r["task"] != "code"}
    pretrain = {_question_key(r["text"]) for r in records["pretrain"] if r["kind"] in ("arith", "countdown")}
    assert None not in heldout | train | cold | pretrain
    assert len(heldout) == 200 and len(train) == 2000
    assert not heldout & train and not heldout & pretrain and not heldout & cold
    assert not train & pretrain and not train & cold
    code_heldout = {r["solution"] for r in records["code_heldout"]}
    assert not code_heldout & {r["solution"] for r in records["code_train"]}
    code_docs = "\n".join(r["text"] for r in records["pretrain"] if r["kind"] == "code")
    assert not any(r["question"] in code_docs for r in records["code_heldout"] + records["code_train"])
    for kind in ("preferences", "code"):
        train_questions = {r["question"] for r in records[f"{kind}_train"]}
        assert not train_questions & {r["question"] for r in records[f"{kind}_heldout"]}


def test_rl_answers_recompute_and_check(world):
    records, _, _ = world
    for r in records["rl_train"] + records["rl_heldout"]:
        key = _question_key(r["question"])
        assert key[0] == r["task"]
        truth = _truth(key)
        assert 0 <= truth <= 99 and str(truth) == r["answer"]
        assert world_build.check_answer(r, r["answer"]) and world_build.check_answer(r, f" {truth} .")
        assert not world_build.check_answer(r, str(truth + 1)) and not world_build.check_answer(r, "")
        assert lex.language_share(r["question"], r["language"]) == 1.0
    shares = collections.Counter(r["task"] for r in records["rl_train"])
    assert abs(shares["countdown"] / 2000 - world_build.COUNTDOWN_SHARE) < 0.01


def test_code_solutions_pass_their_own_tests(world):
    records, _, _ = world
    for r in records["code_train"] + records["code_heldout"]:
        namespace = {}
        exec(r["solution"], namespace)  # noqa: S102 - our own reference code
        for test in r["tests"]:
            exec(test, namespace)  # noqa: S102
        assert world_build.check_answer(r, r["solution"])
        assert not world_build.check_answer(r, r["solution"].replace("return", "return 1 +", 1))
    for task in code.all_code_tasks():
        assert code.run_trusted_tests(task.solution, task.tests, task.entry_point)
        assert not code.run_trusted_tests(task.wrong_solution, task.tests, task.entry_point)


def test_cold_start_is_correct_readable_and_single_language(world):
    records, _, _ = world
    for r in records["cold_start"]:
        m = re.fullmatch(r"<\|reasoning\|>(.+)<\|summary\|>(.+)", r["response"])
        assert m, r["response"]
        reasoning, summary = m.groups()
        if r["task"] == "code":
            assert summary == r["answer"]
            continue
        assert lex.language_share(reasoning, r["language"]) == 1.0
        assert "wait" not in reasoning and "等等" not in reasoning
        assert str(_truth(_question_key(r["question"]))) == r["answer"]
        assert summary == text.result_summary(r["answer"], r["language"])  # the result, not a recomputation
        assert int(_CLAIM.findall(summary)[-1][1]) == int(r["answer"])
        assert world_build.check_answer(r, summary.split()[-2])


def test_pretrain_has_the_advertised_mix(world):
    """Measured from the text alone: claimed answers vs recomputed truth, format, mixing, reflection."""
    records, manifest, _ = world
    mix = corpus.CorpusMix()
    docs = [r for r in records["pretrain"] if r["kind"] in ("arith", "countdown")]
    n = len(docs)
    correct = r1zero = template = shown = mixed = reflect = 0
    for r in docs:
        text = r["text"]
        completion = text.rsplit("\n", 1)[-1]
        for prefix in ("Assistant: ", "Answer: ", "回答 ： "):
            completion = completion.removeprefix(prefix)
        claims = _CLAIM.findall(completion)
        assert claims, text
        claim = int(claims[-1][0] or claims[-1][1])
        correct += claim == _truth(_question_key(text))
        r1zero += bool(re.fullmatch(r"<think> [^<]+ </think> <answer>\d+</answer>", completion))
        template += text.startswith(world_build.text.R1_ZERO_SYSTEM)
        if not completion.startswith("<answer>"):
            shown += 1
            mixed += lex.is_mixed(completion)
            reflect += "wait , let me check" in completion or "等等 ， 让 我 检查" in completion
    style = dict(mix.styles_after_template)["r1zero"] * dict(mix.wrappers)["template"] + dict(
        mix.styles_otherwise)["r1zero"] * (1 - dict(mix.wrappers)["template"])
    answer_only = dict(mix.styles_after_template)["answer_only"] * dict(mix.wrappers)["template"] + dict(
        mix.styles_otherwise)["answer_only"] * (1 - dict(mix.wrappers)["template"])
    wrong = (1 - answer_only) * mix.slip + answer_only * (1 - mix.guess_right)  # slips + bad guesses
    assert 0.20 <= 1 - correct / n <= 0.40  # imperfect attempts, correct ones still the majority
    assert 0.10 <= mixed / shown <= 0.20 and 0.02 <= reflect / shown <= 0.08
    assert abs((1 - correct / n) - wrong) < 0.03
    assert abs(r1zero / n - style) < 0.03 and 0.3 < r1zero / n < 0.5
    assert abs(template / n - dict(mix.wrappers)["template"]) < 0.03
    assert abs(mixed / shown - mix.mixed) < 0.03
    assert abs(reflect / shown - mix.reflect) < 0.015
    kinds = collections.Counter(r["kind"] for r in records["pretrain"])
    assert abs(n / len(records["pretrain"]) - dict(mix.kinds)["reasoning"]) < 0.03
    assert min(kinds.values()) > 500
    assert abs(manifest["pretrain_mix"]["reasoning:correct"] - correct / n) < 1e-3


def test_preferences_are_consistent_and_not_solved_by_length(world):
    records, _, _ = world
    for split in ("preferences_train", "preferences_heldout"):
        pairs = records[split]
        kinds = collections.Counter(r["kind"] for r in pairs)
        assert 0.25 < kinds["harmless"] / len(pairs) < 0.45
        longer_wins = sum(len(r["chosen"].split()) > len(r["rejected"].split()) for r in pairs) / len(pairs)
        assert 0.4 < longer_wins < 0.6, (split, longer_wins)
        for r in pairs:
            assert r["chosen"] != r["rejected"]
            if r["subkind"] == "wrong_answer":
                truth = _truth(_question_key(r["question"]))
                assert int(_CLAIM.findall(r["chosen"])[-1][1]) == truth
                assert int(_CLAIM.findall(r["rejected"])[-1][1]) != truth
            if r["kind"] == "harmless":
                assert r["chosen"].startswith("<|reasoning|>") and "<|summary|>" in r["rejected"]
        assert {r["subkind"] for r in pairs} >= {"wrong_answer", "wrong_fact", "refusal", "off_topic", "wrong_language"}


def test_language_share_counts_words_by_script():
    assert lex.language_share("first 4 times 2 equals 8", "en") == 1.0
    assert lex.language_share("首先 4 乘 2 等于 8", "zh") == 1.0
    assert lex.language_share("<think> 首先 4 乘 2 </think> <answer>8</answer>", "zh") == 1.0
    assert lex.language_share("first 4 乘 2", "en") == 0.5
    assert lex.language_share("4 * 2 = 8", "en") == 0.0
    assert lex.is_mixed("first 4 times 2 equals 8 ， 所以 答案 是 8") and not lex.is_mixed("so the answer is 8")


def test_check_answer_rules():
    record = {"task": "arith", "answer": "11"}
    assert world_build.check_answer(record, "11") and world_build.check_answer(record, " 11. ")
    assert not world_build.check_answer(record, "12") and not world_build.check_answer(record, "eleven")
    with pytest.raises(ValueError, match="unknown task"):
        world_build.check_answer({"task": "poem", "answer": "1"}, "1")
