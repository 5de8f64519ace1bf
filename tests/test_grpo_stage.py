"""The GRPO stage end to end on a tiny model: metrics.jsonl fields, checkpoints, and an exact resume after
SIGKILL (same metrics, same final params as an uninterrupted run), through `python -m r1jax.main`.

The model is a fresh random init, so the R1-Zero rewards would be 0 for every sample; the run uses a real
reward whose value varies at random init instead: DAPO's token-length penalty, with single characters as
stop strings so completion lengths vary. Dynamic sampling, the KL to a reference that is reset every 4
updates, μ = 2 and held-out evaluation are all on, so the resume has to restore the prompt stream, the rng,
the reference and the optimizer state."""

import json
import os
import signal
import string
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, subprocess_env

CONFIG = '''
from configs import common, r1_zero


def get_config(arg=None):
    config = r1_zero.get_config("tiny")
    config.model = common.tiny_model("tiny_moe", n_layers=2, n_dense_layers=1, mtp_depth=0)
    config.rl = r1_zero.rl_block(
        group_size=4, prompts_per_rollout=4, max_new_tokens=12, prompt_buckets=(128,), completion_buckets=(6, 12),
        rewards=(("length_penalty", 1.0, {{"max_len": 12, "cache_len": 10}}), ("format", 0.5)),
        stop_strings={stops!r}, beta=0.01, mu=2, agg="token-mean", dynamic_sampling=True,
        dynamic_max_batches=2, ref_reset_every=4, pack=True)
    config.eval = r1_zero.eval_block(num_prompts=4, samples=2, batch_prompts=4)
    config.optimizer = common.optimizer(1e-3, 0, schedule="constant", weight_decay=0.0)
    config.train = common.train(6, log_every=1, eval_every=4, checkpoint_every=2, keep_checkpoints=3,
                                progress=False)
    return config
'''
STOPS = tuple(string.ascii_letters + string.digits + string.punctuation)
TIMING = ("sample_s", "update_s", "rollout_s", "sample_tokens_per_s", "heldout_eval_s", "tokens_per_s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run SIGKILLed after its step-4 checkpoint then resumed."""
    root = tmp_path_factory.mktemp("grpo")
    config = root / "grpo_test_config.py"
    config.write_text(CONFIG.format(stops=STOPS))
    env = subprocess_env(root / "jax_cache")

    def command(workdir):
        return [sys.executable, "-m", "r1jax.main", f"--config={config}", f"--workdir={workdir}"]

    killed = root / "killed"
    proc = subprocess.Popen(command(killed), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "4").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no step-4 checkpoint after 10 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    interrupted_at = sorted(int(n) for n in os.listdir(killed / "checkpoints") if n.isdigit())
    for workdir in (killed, root / "full"):
        out = subprocess.run(command(workdir), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    return {"full": root / "full", "killed": killed, "interrupted_at": interrupted_at}


def _records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_metrics_fields_and_checkpoints(runs):
    records = _records(runs["full"])
    assert [r["step"] for r in records] == [0, 2, 4, 6]  # step 0: held-out eval before training
    for key in ("heldout_accuracy", "heldout_format_rate", "heldout_pass_at_1", "heldout_response_length_mean"):
        assert key in records[0] and key in records[2], key
    for r in records[1:]:
        for key in ("reward_mean", "reward/length_penalty", "reward/format", "format_rate", "accuracy",
                    "response_length_mean", "response_length_max", "truncated_frac", "zero_std_frac", "kl",
                    "clip_frac", "entropy", "reflection_rate", "logprob_diff_max", "loss", "grad_norm", "lr",
                    "dynamic_batches", "sample_tokens_per_s", "batch_fill"):
            assert key in r and np.isfinite(r[key]), (key, r)
        assert r["logprob_diff_max"] < 1e-4  # sampler vs trainer log-probs (default matmul precision)
        assert 1 <= r["response_length_mean"] <= 12 and r["entropy"] > 0
        assert r["kl"] > 0 and r["lr"] == pytest.approx(1e-3)  # μ = 2: the 2nd update has left the reference
    assert sorted(int(n) for n in os.listdir(runs["full"] / "checkpoints") if n.isdigit()) == [2, 4, 6]
    assert (runs["full"] / "reference" / "4").is_dir()
    result = json.loads((runs["full"] / "result.json").read_text())
    assert result["status"] == "done" and result["checkpoint"].endswith("/6")
    assert (runs["full"] / "tb").is_dir()
    assert records[-1]["prompts_dropped/too_long"] == 0
    samples = [json.loads(line) for line in (runs["full"] / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] * 4 + [4] * 4 + [6] * 4  # 4 rollouts of every logged step
    for s in samples:
        assert s["prompt"] and isinstance(s["completion"], str) and 1 <= s["length"] <= 12
        assert set(s["rewards"]) >= {"length_penalty", "format"} and isinstance(s["truncated"], bool)
        assert s["reward"] == pytest.approx(s["rewards"]["length_penalty"] + 0.5 * s["rewards"]["format"])
    assert result["outputs"]["samples"] == str(runs["full"] / "samples.jsonl")


def test_resume_after_kill_is_exact(runs):
    assert 6 not in runs["interrupted_at"] and 4 in runs["interrupted_at"]
    full, resumed = _records(runs["full"]), _records(runs["killed"])
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    assert (runs["killed"] / "samples.jsonl").read_text() == (runs["full"] / "samples.jsonl").read_text()
    import orbax.checkpoint as ocp

    params = []
    for workdir in (runs["full"], runs["killed"]):
        with ocp.StandardCheckpointer() as ckptr:
            params.append(ckptr.restore(workdir / "checkpoints" / "6" / "params"))
    import jax

    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_single_update_uses_its_own_forward_as_pi_old():
    """μ = mini_batches = 1: π_old is the update's forward (ratio exactly 1, nothing clipped) and equals what a
    separate scorer pass over the same params gives; the update moves the params."""
    import jax
    import ml_collections as mlc

    from r1jax import models
    from r1jax.rl import trainer
    from r1jax.sharding import DEFAULT_RULES, make_mesh
    from r1jax.train import state as state_lib

    cfg = models.get_preset("tiny_dense", n_layers=1, n_dense_layers=1, vocab_size=64)
    mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
    opt = trainer.optimizer_key(mlc.ConfigDict(dict(lr=1e-3, warmup_steps=0, schedule="constant", end_lr_ratio=1.0,
                                                    b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0)))
    update = trainer.make_update(cfg, opt, 10, trainer.LossSpec(temperature=0.8), mesh=mesh, rules=DEFAULT_RULES)
    assert update.fused
    rng = np.random.default_rng(0)
    completions = rng.integers(4, 64, (4, 6)).astype(np.int32)
    batch = trainer.build_batch([[1, 5, 9], [1, 7], [1, 5, 9], [1, 7]], completions, np.array([6, 3, 5, 1]),
                                prompt_buckets=(4,), completion_buckets=(6,), pad_id=0)
    state = state_lib.init_state(cfg, update.tx, 0, update.shardings)
    before = jax.device_get(state.params)
    old_logp, entropy = trainer.make_scorer(cfg, 0.8, mesh=mesh, rules=DEFAULT_RULES)(state.params, batch)
    state, metrics, logp_before = update(state, batch, None, None, np.array([1.0, -1.0, 0.5, -0.5], np.float32),
                                         jax.random.PRNGKey(0))
    mask = batch["mask"] > 0
    np.testing.assert_allclose(np.asarray(logp_before)[mask], np.asarray(old_logp)[mask], atol=1e-6)
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["clip_frac"]) == 0.0
    np.testing.assert_allclose(float(metrics["entropy"]), float(entropy), rtol=1e-5)
    assert int(state.step) == 1
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, before))
    assert max(moved) > 0


class _CharTokenizer:
    """One token per character (code point): enough to decode fixed completions."""

    pad_id = 0

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids)


def test_readable_format_stage_measures_its_own_accuracy():
    """A stage rewarded by answer_accuracy answers in the readable format: its always-measured accuracy is that
    reward, not the R1-Zero-format `accuracy` as well (on the tiny world's readable answers it reads 0)."""
    from r1jax.rl.sampler import Completions
    from r1jax.rl import rollouts as grpo

    texts = ["<|reasoning|>2 plus 2 equals 4<|summary|>the answer is \\boxed{4}",
             "<|reasoning|>2 plus 2 equals 5<|summary|>the answer is \\boxed{5}"]
    width = max(map(len, texts))
    tokens = np.zeros((2, width), np.int32)
    for i, t in enumerate(texts):
        tokens[i, :len(t)] = [ord(c) for c in t]
    done = Completions(tokens=tokens, logprobs=np.zeros((2, width), np.float32),
                       lengths=np.asarray([len(t) for t in texts], np.int32), truncated=np.zeros(2, bool))
    prompt = {"tokens": [1, 2, 3], "prompt_text": "What is 2 + 2 ?", "answer": "4", "task": "arith"}
    kw = dict(group_size=2, tokenizer=_CharTokenizer(), prompt_buckets=(8,))
    groups = grpo.sample_groups(lambda *a: done, None, [prompt], None,
                                reward_specs=(("answer_accuracy", 1.0),), **kw)
    assert "accuracy" not in groups[0].per_reward
    assert list(groups[0].per_reward["answer_accuracy"]) == [1.0, 0.0]
    # ... also when answer_accuracy is one of by_source's routes (all-scenario RL)
    routed = (("by_source", 1.0, {"routes": {"rule": (("answer_accuracy", 1.0),), "other": (("format", 1.0),)}}),)
    groups = grpo.sample_groups(lambda *a: done, None, [dict(prompt, reward_source="rule")], None,
                                reward_specs=routed, **kw)
    assert "accuracy" not in groups[0].per_reward
    assert list(groups[0].per_reward["answer_accuracy"]) == [1.0, 0.0]
    # a general prompt (no answer, another route) in the same batch is left out of the accuracy, not scored 0
    general = {"tokens": [1, 2, 3], "prompt_text": "Say hi .", "answer": None, "task": "chat", "reward_source": "other"}
    twice = Completions(**{k: np.concatenate([v, v]) for k, v in vars(done).items()})
    groups = grpo.sample_groups(lambda *a: twice, None,
                                [dict(prompt, reward_source="rule"), general], None, reward_specs=routed, **kw)
    assert list(groups[0].per_reward["answer_accuracy"]) == [1.0, 0.0]
    assert np.isnan(groups[1].per_reward["answer_accuracy"]).all()
    metrics = grpo.behaviour_metrics(groups)
    assert metrics["reward/answer_accuracy"] == 0.5 and metrics["reward_errors/by_source"] == 0
    assert grpo.behaviour_metrics(groups[1:]).keys().isdisjoint({"reward/answer_accuracy"})
    # R1-Zero-rewarded stages still measure format and accuracy when only one of them is rewarded
    groups = grpo.sample_groups(lambda *a: done, None, [prompt], None, reward_specs=(("format", 1.0),), **kw)
    assert {"accuracy", "format"} <= set(groups[0].per_reward)


def test_prompts_longer_than_the_largest_bucket_are_dropped_and_counted(tmp_path):
    import ml_collections as mlc

    from r1jax.rl import rollouts as grpo

    class Chars:
        bos_id = 1

        def encode(self, text):
            return [ord(c) for c in text]

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("short", "x" * 40, "mid" * 3)))
    data = mlc.ConfigDict(dict(prompt_field="question", template=""))
    records, dropped = grpo.load_prompts(data, [str(path)], Chars(), max_tokens=10)
    assert [r["question"] for r in records] == ["short", "mid" * 3] and dropped == {"prompts_dropped/too_long": 1}
    with pytest.raises(ValueError, match="3 longer than the largest prompt bucket"):
        grpo.load_prompts(data, [str(path)], Chars(), max_tokens=3)
