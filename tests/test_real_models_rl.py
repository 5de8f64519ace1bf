"""RL and eval stages on real checkpoints and real-shaped data (issue 17), run as a user runs them.

Each run is `python -m r1jax.main` with a `:hf` preset and only init_from, data files, field names and sizes
overridden, on the Qwen2 ChatML and the Llama-3 two-EOS checkpoints of tests/hf_fixtures.py and on GSM8K- and
MATH-shaped sets (different field names). One module-scope run per property:
  - eval (configs/eval.py:hf:...) on both checkpoints: samples.jsonl prompts are exactly transformers'
    apply_chat_template(..., add_generation_prompt=True, tokenize=False); GSM8K `####` and MATH `\\boxed{}`
    references are read (a right answer scores 1);
  - R1-Zero GRPO (configs/r1_zero.py:hf, 2 updates) on GSM8K fields with over-long prompts (dropped and counted),
    and a forked config outside the repository with a reward plug-in file outside it, run from a temporary cwd;
  - bad input fails in seconds, before the model is loaded, naming file:line (or row), the field and its key;
  - GRPO prompt records from data.messages_field with a system turn (data.system_field / data.system), in process.
The stop checks (either Llama-3 EOS id, a stop string split across tokens, no id beyond the tokenizer) run at the
sampler's step with the real fixture tokenizer.
These commands are the ones docs/real_models.md shows at small sizes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from helpers import REPO, subprocess_env
from hf_fixtures import hf_checkpoints, write_gsm8k, write_math  # noqa: F401 (fixture)

EVAL_SIZES = ["--config.sampling.samples=2", "--config.sampling.max_new_tokens=16",
              "--config.sampling.batch_prompts=4", "--config.sampling.prompt_buckets=(96,)"]
GRPO_SIZES = ["--config.rl.group_size=2", "--config.rl.prompts_per_rollout=2", "--config.rl.max_new_tokens=16",
              "--config.rl.prompt_buckets=(224,)", "--config.rl.completion_buckets=(16,)",
              "--config.rl.micro_batches=1", "--config.rl.score_chunk_rows=0", "--config.train.steps=2",
              "--config.train.checkpoint_every=2"]


def main(args, *, cwd=REPO, timeout=300):
    """`python -m r1jax.main ARGS` in a subprocess: (CompletedProcess, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "r1jax.main", *args], env=subprocess_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def chat_template_prompt(checkpoint, question):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    gsm8k = write_gsm8k(str(root / "gsm8k_test.jsonl"), 6)
    with open(gsm8k, "a") as f:  # two questions over the prompt buckets (eval 96, GRPO 224 tokens): dropped
        for _ in range(2):
            f.write(json.dumps({"question": "How many clips? " * 60, "answer": "#### 1"}) + "\n")
    return {"gsm8k": gsm8k, "math": write_math(str(root / "math.parquet"), 6), "root": root}


@pytest.fixture(scope="module")
def eval_runs(hf_checkpoints, data, tmp_path_factory):  # noqa: F811
    """Eval :hf on Qwen2 (GSM8K fields + MATH's problem/solution as math500) and on Llama-3 (GSM8K)."""
    root = tmp_path_factory.mktemp("eval")
    runs = {}
    for family, names, extra in (
            ("qwen2", "gsm8k,math500", [f"--config.benchmarks.math500.files={data['math']}",
                                        "--config.benchmarks.math500.answer_field=solution"]),
            ("llama3", "gsm8k", [])):
        workdir = root / family
        ok(main([f"--config=configs/eval.py:hf:{names}", f"--workdir={workdir}",
                 f"--config.models.model.checkpoint={hf_checkpoints(family)}",
                 f"--config.benchmarks.gsm8k.files={data['gsm8k']}", *extra, *EVAL_SIZES])[0])
        runs[family] = workdir
    return runs


def test_eval_prompts_are_the_checkpoints_chat_template(eval_runs, hf_checkpoints, data):  # noqa: F811
    questions = {json.loads(line)["question"]: None for line in open(data["gsm8k"])}
    for family, workdir in eval_runs.items():
        rows = [r for r in read_jsonl(workdir / "samples.jsonl") if r["benchmark"] == "gsm8k"]
        assert rows
        for row in rows:
            question = next(q for q in questions if q in row["prompt"])
            assert row["prompt"] == chat_template_prompt(hf_checkpoints(family), question)
            assert set(row) >= {"completion", "rewards", "length", "truncated"}
    results = json.load(open(eval_runs["qwen2"] / "results.json"))["model"]
    assert set(results) == {"gsm8k", "math500"}  # only the benchmarks named
    assert results["gsm8k"]["n"] == 6 and results["gsm8k"]["dropped_too_long"] == 2
    assert results["math500"]["n"] == 6 and results["math500"]["dropped_too_long"] == 0
    assert set(json.load(open(eval_runs["llama3"] / "results.json"))["model"]) == {"gsm8k"}


def test_benchmark_references_are_read_in_gsm8k_and_math_forms(data):
    from r1jax.eval import benchmarks

    gsm8k = benchmarks.load("math", [data["gsm8k"]])
    math = benchmarks.load("math", [data["math"]], question_field="problem", answer_field="solution")
    for problems in (gsm8k[:6], math):
        for p in problems:
            a, b = (int(x) for x in re.findall(r"\d+", p.question)[:2])
            assert p.answer == str(a + b)
            assert benchmarks.score([p], [f"<think> </think> <answer> {a + b} </answer>"]) == [True]


@pytest.fixture(scope="module")
def grpo_run(hf_checkpoints, data, tmp_path_factory):  # noqa: F811
    """R1-Zero GRPO :hf on Qwen2 with GSM8K's field names (2 over-long questions in the set)."""
    workdir = tmp_path_factory.mktemp("grpo") / "run"
    ok(main(["--config=configs/r1_zero.py:hf", f"--workdir={workdir}",
             f"--config.init_from={hf_checkpoints('qwen2')}", f"--config.data.train_files={data['gsm8k']}",
             "--config.data.prompt_field=question", "--config.data.answer_field=answer", *GRPO_SIZES])[0])
    return workdir


def test_grpo_two_updates_samples_and_dropped_prompts(grpo_run, data):
    from r1jax.data import templates

    result = json.load(open(grpo_run / "result.json"))
    assert result["status"] == "done" and result["metrics"]["step"] == 2
    assert result["metrics"]["prompts_dropped/too_long"] == 2
    rows = read_jsonl(grpo_run / "samples.jsonl")
    questions = [json.loads(line)["question"] for line in open(data["gsm8k"])][:6]
    assert rows and {r["step"] for r in rows} == {1, 2}
    for row in rows:
        assert row["prompt"] in {templates.render_prompt("r1_zero", q) for q in questions}
        assert set(row["rewards"]) >= {"accuracy", "format"} and isinstance(row["truncated"], bool)
        assert 1 <= row["length"] <= 16


def test_forked_config_and_reward_plugin_outside_the_repository(hf_checkpoints, data, tmp_path):  # noqa: F811
    """A researcher's fork (imports configs.r1_zero, changes a field) and a reward plug-in, both outside the repo,
    run from their own directory; the plug-in sees MATH's `solution` as `answer` (data.answer_field)."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_reward.py").write_text(textwrap.dedent("""
        def boxed_reference(prompts, completions, *, answer, **_):
            return [0.25 if "\\\\boxed" in a else -1.0 for a in answer]
    """))
    (tmp_path / "my_r1_zero.py").write_text(textwrap.dedent("""
        from configs import r1_zero

        def get_config(arg=None):
            config = r1_zero.get_config("hf")
            config.rl.rewards = r1_zero.R1_ZERO_REWARDS + (("plugins/my_reward.py:boxed_reference", 1.0),)
            return config
    """))
    ok(main(["--config=my_r1_zero.py", "--workdir=run", f"--config.init_from={hf_checkpoints('llama3')}",
             f"--config.data.train_files={data['math']}", *GRPO_SIZES], cwd=tmp_path)[0])
    rows = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert rows and all(r["rewards"]["plugins/my_reward.py:boxed_reference"] == 0.25 for r in rows)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert metrics[-1]["reward_errors/plugins/my_reward.py:boxed_reference"] == 0


def test_bad_mapped_field_fails_in_seconds_before_the_model(hf_checkpoints, data, tmp_path):  # noqa: F811
    # GRPO: a MATH set has no `answer` column (its reference is in `solution`)
    proc, seconds = main(["--config=configs/r1_zero.py:hf", f"--workdir={tmp_path / 'g'}",
                          f"--config.init_from={hf_checkpoints('qwen2')}", f"--config.data.train_files={data['math']}",
                          "--config.data.answer_field=answer", *GRPO_SIZES])
    assert proc.returncode != 0 and seconds < 60
    assert f"{data['math']} row 0: field 'answer'" in proc.stderr and "data.answer_field" in proc.stderr
    assert "initial weights" not in proc.stderr
    # eval: a question that is not a string, on line 2 of a GSM8K-shaped file
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n"
                   + json.dumps({"question": ["What is 2 + 2?"], "answer": "#### 4"}) + "\n")
    proc, seconds = main(["--config=configs/eval.py:hf:gsm8k", f"--workdir={tmp_path / 'e'}",
                          "--config.models.model.checkpoint=/nonexistent/checkpoint",
                          f"--config.benchmarks.gsm8k.files={bad}", *EVAL_SIZES])
    assert proc.returncode != 0 and seconds < 60
    assert f"{bad}:2: field 'question'" in proc.stderr
    assert "config.benchmarks.gsm8k.question_field" in proc.stderr


# ------------------------------------------------------------------------------------- the sampler's stops


def forced_rows(tokenizer, rows, spec, vocab):
    """Run sampler.choose step by step with logits that force each row's token list (greedy; every row gets
    its next listed token, and the padding ids beyond the tokenizer score highest); returns Completions."""
    import jax
    import jax.numpy as jnp

    from r1jax.rl import sampler

    r, t = len(rows), spec.max_new_tokens
    state = sampler.empty_rows(r, spec).replace(row=jnp.arange(r, dtype=jnp.int32),
                                                limit=jnp.full((r,), t, jnp.int32))
    out = sampler.empty_completions(r, spec)
    for step in range(t):
        logits = np.full((r, vocab), -5.0, np.float32)
        logits[:, tokenizer.vocab_size:] = 10.0  # embedding padding: must never be drawn
        for i, ids in enumerate(rows):
            logits[i, ids[min(step, len(ids) - 1)]] = 5.0
        state, out = sampler.choose(state, out, jnp.asarray(logits), jax.random.PRNGKey(0), spec)
    return jax.device_get(out)


def test_rows_stop_on_either_eos_and_on_a_stop_string_split_across_tokens(hf_checkpoints):  # noqa: F811
    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.rl import sampler, stops

    tok = load_tokenizer(hf_checkpoints("llama3"))
    end, eot = tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")
    assert set(tok.eos_ids) == {end, eot}
    body = tok.encode(" The sum is 7")
    tail = tok.encode(" 7 </answer> more text")
    split = [tok.decode(tail[:i]) for i in range(1, len(tail) + 1)]
    stop_at = next(i for i, text in enumerate(split) if "</answer>" in text) + 1  # tokens up to the completing one
    assert not any(tok.decode([x]) == "</answer>" for x in tail)  # the stop string is split across tokens
    spec = sampler.SamplerSpec(method=sampler.Greedy(), group_size=1, max_new_tokens=len(tail) + 2,
                               eos_id=tok.eos_ids, pad_id=tok.pad_id,
                               stop_sequences=stops.stop_strings(tok, ("</answer>",)), vocab_size=tok.vocab_size)
    out = forced_rows(tok, [body + [end], body + [eot], tail, body], spec, vocab=tok.vocab_size + 12)
    assert list(out.lengths) == [len(body) + 1, len(body) + 1, stop_at, spec.max_new_tokens]
    assert list(out.truncated) == [False, False, False, True]
    assert out.tokens[0, len(body)] == end and out.tokens[1, len(body)] == eot
    assert tok.decode(out.tokens[2, :stop_at]).endswith("</answer>")
    assert (out.tokens < tok.vocab_size).all()  # the padding ids scored highest and were never drawn


def test_encoded_prompts_equal_transformers_tokens(hf_checkpoints):  # noqa: F811
    """The prompt ids the stages sample from equal apply_chat_template(..., tokenize=True): one BOS (Llama-3's
    template writes it; none is added twice), none for Qwen2."""
    import transformers

    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.eval.generate import encode_prompts, render

    question = "Natalia sold 48 clips in April. How many clips?"
    for family in ("qwen2", "llama3"):
        path = hf_checkpoints(family)
        tok = load_tokenizer(path)
        hf_tok = transformers.AutoTokenizer.from_pretrained(path)
        expected = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert encode_prompts(tok, [render("checkpoint", tok, question)], 512)[1] == [expected]


def test_grpo_prompts_from_messages_and_system_fields_are_the_chat_template(hf_checkpoints, tmp_path):  # noqa: F811
    """GRPO prompt records mapped by data.messages_field (the reference reply dropped) and data.system_field /
    data.system render as apply_chat_template with that system turn; a field of the wrong type fails at its line."""
    import ml_collections as mlc
    import transformers

    from r1jax.data.sources import DataError
    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.rl import rollouts

    path = hf_checkpoints("qwen2")
    tok, hf_tok = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    user = {"role": "user", "content": "What is 12 + 30?"}
    records = tmp_path / "conversations.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in (
        {"conversation": [user, {"role": "assistant", "content": "42"}], "ref": "#### 42", "sys": "Be brief."},
        {"conversation": [user], "ref": 42})))
    data = mlc.ConfigDict(dict(prompt_field=None, messages_field="conversation", answer_field="ref",
                               system_field="sys", system="Think first.", template="checkpoint"))
    out, dropped = rollouts.load_prompts(data, [str(records)], tok, max_tokens=512)
    for record, system in zip(out, ("Be brief.", "Think first.")):
        expected = hf_tok.apply_chat_template([{"role": "system", "content": system}, user],
                                              add_generation_prompt=True, tokenize=False)
        assert record["prompt_text"] == expected
        assert record["tokens"] == hf_tok(expected, add_special_tokens=False)["input_ids"]  # Qwen2: no BOS
    assert [r["answer"] for r in out] == ["#### 42", 42] and dropped == {"prompts_dropped/too_long": 0}
    records.write_text(records.read_text() + json.dumps({"conversation": [user], "ref": [42]}) + "\n")
    with pytest.raises(DataError, match=r"conversations.jsonl:3: field 'ref'"):
        rollouts.read_prompt_records(data, [str(records)])
