"""Reward models: the Bradley-Terry loss against its formula, the score (last-token head + the decoder's mean
log-likelihood of the scored part) against a computation from the logits, where the scored part starts, what each
aspect reads, a short real training run on the tiny world's preference pairs (held-out pairwise accuracy well above
chance), and the GRPO rewards that load it: `reward_model` and `by_source` routing by the `reward_source` field."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import reward_model as rm_config
from r1jax import models
from r1jax.data import templates
from r1jax.rl import reward_model as rm_lib
from r1jax.rl import rewards

R, S = "<|reasoning|>", "<|summary|>"


def test_bradley_terry_matches_the_formula():
    chosen, rejected = np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.0, 0.5])
    loss, metrics = rm_lib.bradley_terry(jnp.asarray(chosen), jnp.asarray(rejected))
    expected = np.mean(np.log1p(np.exp(-(chosen - rejected))))  # -log sigmoid(margin)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert float(metrics["pair_accuracy"]) == pytest.approx(1 / 3)  # a tie is not a win


def test_score_is_the_last_token_head_plus_the_mean_likelihood_of_the_scored_part():
    cfg = models.get_preset("tiny_dense", n_layers=2, n_dense_layers=2)
    params = {"decoder": models.init(cfg, jax.random.PRNGKey(0)),
              "head": {"w_d": jax.random.normal(jax.random.PRNGKey(1), (cfg.d_model,)), "b": jnp.asarray(0.5),
                       "w_lp": jnp.asarray(0.7)}}
    rows, starts = [[1, 5, 9, 11, 2], [1, 7, 2]], [3, 1]  # the scored part: tokens from `start` on
    tokens, lengths = rm_lib.pad_rows(rows, pad_id=0, bucket=8)
    assert tokens.shape == (2, 8) and lengths.tolist() == [5, 3]
    got, _ = rm_lib.scores(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(starts), cfg)
    for i, (row, start) in enumerate(zip(rows, starts)):  # unpadded, from the logits
        hidden, _ = models.hidden_states(params["decoder"], jnp.asarray([row]), cfg)
        logits, _ = models.forward(params["decoder"], jnp.asarray([row]), cfg)
        logits = np.asarray(logits[0], np.float64)
        logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        mean_logp = np.mean([logp[t - 1, row[t]] for t in range(start, len(row))])
        want = float(hidden[0, -1] @ params["head"]["w_d"]) + 0.5 + 0.7 * mean_logp
        np.testing.assert_allclose(float(got[i]), want, rtol=1e-5)
    wider, _ = rm_lib.scores(params, jnp.asarray(np.pad(tokens, ((0, 0), (0, 8)), constant_values=3)),
                             jnp.asarray(lengths), jnp.asarray(starts), cfg)
    np.testing.assert_allclose(np.asarray(wider), np.asarray(got), rtol=1e-4, atol=1e-5)  # padding is never read


def test_encode_marks_where_the_scored_part_starts():
    class Chars:  # one token per character; BOS 1, EOS 2
        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [ord(c) for c in text]

    row, start = rm_lib.encode(Chars(), "ab", "xy", "helpful", "raw", max_len=64)
    prompt = [1] + [ord(c) for c in templates.render_prompt("raw", "ab")]
    assert row == prompt + [ord("x"), ord("y"), 2] and start == len(prompt)
    cut, cut_start = rm_lib.encode(Chars(), "ab", "xy", "helpful", "raw", max_len=4)  # the last 4 tokens are kept
    assert cut == row[-4:] and cut_start == start - (len(row) - 4)
    assert rm_lib.encode(Chars(), "ab", "xy", "helpful", "raw", max_len=2)[1] == 1  # prompt cut away entirely


def test_scored_part_per_aspect():
    readable, zero = f"{R}think{S}the answer", "<think>t</think> <answer>42</answer>"
    assert rm_lib.scored_part(readable, "helpful") == "the answer"
    assert rm_lib.scored_part(readable, "harmless") == readable
    assert rm_lib.scored_part(zero, "helpful") == "42"
    assert rm_lib.scored_part("plain reply", "helpful") == "plain reply"
    with pytest.raises(ValueError):
        rm_lib.scored_part(readable, "honest")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A harmlessness RM trained briefly from scratch on the tiny world (a 2-layer dense decoder); harmlessness is
    the aspect a fresh model learns within a few dozen steps (the tiny pipeline trains both from the base model)."""
    from r1jax import stages
    from r1jax.world import ensure_world, train_world_tokenizer

    root = tmp_path_factory.mktemp("rm")
    world = ensure_world(str(root), 0)
    tokenizer = train_world_tokenizer(world, os.path.join(world, "tokenizer"), 1024)
    config = rm_config.get_config("tiny")
    config.model = rm_config.common.tiny_model("tiny_dense", n_layers=2, n_dense_layers=2)
    config.data.update(tokenizer=tokenizer, train_files=(os.path.join(world, "preferences_train.jsonl"),),
                       eval_files=(os.path.join(world, "preferences_heldout.jsonl"),), seq_len=96)
    config.rm.aspect = "harmless"
    config.optimizer.lr = 3e-3
    config.train.update(steps=40, log_every=20, eval_every=40, checkpoint_every=20, progress=False)
    result = stages.run(config, str(root / "run"))
    return result, world


def test_training_learns_the_preferences(trained):
    result, _ = trained
    assert result.status == "done" and result.checkpoint.endswith("/40")
    with open(result.outputs["metrics"]) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [20, 40]
    assert records[-1]["heldout_pair_accuracy"] >= 0.9  # chance is 0.5
    # per subkind of the held-out pairs: every harmlessness pair is a harmful request
    assert records[-1]["heldout_pair_accuracy/harmful_request"] == records[-1]["heldout_pair_accuracy"]
    assert records[-1]["bt_loss"] < 0.5


def test_reward_model_reward_and_by_source_routing(trained):
    result, world = trained
    rm = rm_lib.load(result.checkpoint)
    assert rm.aspect == "harmless" and rm.template == "raw"
    with open(os.path.join(world, "preferences_heldout.jsonl")) as f:
        pairs = [r for r in map(json.loads, f) if r["kind"] == "helpful"][:40]
    questions = [p["question"] for p in pairs]
    helpful = {"checkpoint": result.checkpoint, "aspect": "helpful"}  # read as helpfulness: the summary only
    via_reward = rewards.score((("reward_model", 1.0, helpful),), ["ignored"] * 40, [p["chosen"] for p in pairs],
                               {"question": questions})
    np.testing.assert_allclose(via_reward[0], rm.score(questions, [p["chosen"] for p in pairs], "helpful"), rtol=1e-5)
    assert via_reward[2] == {"reward_model": 0}
    # helpfulness reads the summary only: the same summary after any reasoning scores the same
    with_reasoning = [f"{R}whatever I thought{S}{p['chosen']}" for p in pairs[:4]]
    np.testing.assert_allclose(rm.score(questions[:4], with_reasoning, "helpful"), via_reward[0][:4], rtol=1e-4,
                               atol=1e-5)
    # harmless reads it all: the reasoning is in what it scores (a trained RM can be nearly flat on these
    # benign texts, so the scores themselves need only differ somewhere)
    assert all(rm_lib.scored_part(r, "harmless") == r for r in with_reasoning)
    assert np.max(np.abs(rm.score(questions[:4], with_reasoning) - via_reward[0][:4])) > 1e-5

    routes = {"rule": (("answer_accuracy", 1.0),),
              "reward_model": (("reward_model", 1.0, helpful), ("reward_model", 0.5, helpful))}  # one reward twice
    completions = [f"{R}6 plus 7{S}the answer is 13 .", f"{R}6 plus 7{S}the answer is 12 .", pairs[0]["chosen"]]
    fields = {"reward_source": ["rule", "rule", "reward_model"], "answer": ["13", "13", None],
              "question": ["Calculate 6 + 7 .", "Calculate 6 + 7 .", questions[0]]}
    total, per, errors = rewards.score((("by_source", 1.0, {"routes": routes}),), ["p"] * 3, completions, fields)
    np.testing.assert_allclose(total, [1.0, 0.0, 1.5 * via_reward[0][0]], rtol=1e-5)
    assert errors == {"by_source": 0}
    fields["reward_source"][0] = "unknown"  # no route: that sample errors (0, counted), the others are scored
    total, _, errors = rewards.score((("by_source", 1.0, {"routes": routes}),), ["p"] * 3, completions, fields)
    assert errors == {"by_source": 1} and total[0] == 0.0
    assert total[2] == pytest.approx(1.5 * via_reward[0][0], rel=1e-5)
