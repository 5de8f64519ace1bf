"""Smoke tests of the benchmarks: each main runs at the smallest size with very few steps and appends one JSON line
to the results file. They measure nothing (no timing assertions); they check that the commands work."""

import json
import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (see bench.common.tune_cpu_runtime)
pytest.importorskip("torch")
pytest.importorskip("transformers")

from r1jax.bench import compile as compile_bench  # noqa: E402
from r1jax.bench import moe, peak, rollout, sampler, train_step  # noqa: E402


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_peak(tmp_path):
    out = tmp_path / "r.jsonl"
    result = peak.main(["--n", "128", "--runs", "1", "--out", str(out)])
    assert result["jax_peak_flops"] > 0 and result["torch_peak_flops"] > 0
    assert _records(out)[0]["bench"] == "peak"


def test_train_step(tmp_path):
    out = tmp_path / "r.jsonl"
    rows = train_step.main(["--layers", "2", "--batch", "2", "--seq", "16", "--runs", "1", "--warmup", "0",
                            "--torch-impl", "sdpa/grouped_mm", "--peak-n", "128", "--out", str(out)])
    (record,) = _records(out)
    assert record["bench"] == "train_step" and [r["model"] for r in record["rows"]] == ["deepseek_v3", "llama"]
    for row in rows:
        assert row["r1jax_tok_s"] > 0 and row["torch_tok_s"] > 0
        assert row["r1jax_loss0"] == pytest.approx(row["torch_loss0"], rel=1e-3)  # same weights, same batch


def test_sampler(tmp_path):
    out = tmp_path / "r.jsonl"
    rows = sampler.main(["--prompts", "2", "--group", "2", "--new", "4", "--prompt_len", "8", "--runs", "1",
                         "--warmup", "0", "--out", str(out)])
    (record,) = _records(out)
    assert record["bench"] == "sampler" and [r["model"] for r in rows] == ["deepseek_v3", "llama"]
    for row in rows:
        assert row["r1jax_tok_s"] > 0 and row["hf_tok_s"] > 0
        assert row["cache_ok"], row  # MLA caches the latent (kv_lora_rank + rope dims), GQA the KV heads


def test_rollout(tmp_path):
    out = tmp_path / "r.jsonl"
    rows = rollout.main(["--prompts", "4", "--group", "2", "--prompt_len", "8", "--new", "16", "--static_rows", "4",
                         "--chunk", "4", "--slots", "8", "--page", "4", "--runs", "1", "--step_runs", "1",
                         "--out", str(out)])
    (record,) = _records(out)
    assert record["bench"] == "rollout" and [r["sampler"] for r in rows] == ["static", "engine", "engine_rows", "generate"]
    assert all(r["tok_s"] > 0 and 0 < r["useful_share"] <= 1 for r in rows)
    assert max(rows[1]["cache_MiB"], rows[2]["cache_MiB"]) <= rows[0]["cache_MiB"]  # equal memory at most
    assert rows[1]["slots"] == 8 and rows[1]["grpo_step_s"] > 0


def test_compile(tmp_path):
    out = tmp_path / "r.jsonl"
    rows = compile_bench.main(["--depths", "2,5", "--out", str(out)])
    (record,) = _records(out)
    assert record["bench"] == "compile" and [r["layers"] for r in rows] == [2, 5]
    assert rows[0]["train_compile_s"] > 0 and rows[1]["decode_compile_s"] > 0


def test_moe(tmp_path):
    out = tmp_path / "r.jsonl"
    rows, cross = moe.main(["--experts", "8,16", "--tokens", "128", "--sweep", "32,64", "--runs", "1",
                            "--peak-n", "128", "--out", str(out)])
    (record,) = _records(out)
    assert record["bench"] == "moe" and len(record["rows"]) == 4 and len(record["crossover"]) == 2
    assert all(r["fwd_ms"] > 0 for r in rows)


def test_grpo_step(tmp_path):
    pytest.importorskip("trl")
    from r1jax.bench import grpo_step

    out = tmp_path / "r.jsonl"
    rows = grpo_step.main(["--models", "llama", "--prompts", "2", "--group", "2", "--prompt-len", "8",
                           "--new-tokens", "4", "--steps", "1", "--warmup", "0", "--out", str(out)])
    (record,) = _records(out)
    assert record["bench"] == "grpo_step" and rows[0]["r1jax_s"] > 0 and rows[0]["trl_s"] > 0


def test_torch_options_skip_batched_mm_experts_that_cannot_fit():
    from types import SimpleNamespace

    from r1jax.bench import common

    class Fake(common.TorchImplementations):
        def __init__(self, d, f, tokens):
            self.is_moe = True
            self.model = SimpleNamespace(config=SimpleNamespace(hidden_size=d, moe_intermediate_size=f,
                                                                num_experts_per_tok=6))
            self.inputs = SimpleNamespace(numel=lambda: tokens)

    tiny = {o["experts"] for o in Fake(64, 32, 1024).options()}
    big = {o["experts"] for o in Fake(768, 256, 512).options()}  # the 100m bench: 7 GB per layer
    assert tiny == {"eager", "batched_mm", "grouped_mm"}
    assert big == ({"eager", "grouped_mm"} if common.available_memory() < 8 * 7.3e9 else tiny)
