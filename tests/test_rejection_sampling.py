"""Rejection sampling's filters and judges: each filter rejects what it should and keeps what it should, the
correctness checks (math-verify, the sandbox, a judge) decide what is kept, selection and the non-reasoning mix
follow the config, and both judges score what they claim to score."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import models
from r1jax.rl import filters, judge as judge_lib, reward_model as rm_lib
from r1jax.stages import rejection_sampling as rs

R, S = "<|reasoning|>", "<|summary|>"
CLEAN_EN = f"{R}first 6 plus 7 is 13 , so the answer is 13{S}6 + 7 = 13 . the answer is 13 ."
CLEAN_ZH = f"{R}首先 6 加 7 等于 13 ， 所以 答案 是 13{S}6 + 7 = 13 。 答案 是 13 。"


# ------------------------------------------------------------------------------------------ filters


@pytest.mark.parametrize("text, kwargs, reason", [
    (CLEAN_EN, {}, None),
    (CLEAN_ZH, {"language": "zh"}, None),
    ("<think> 6 plus 7 is 13 </think> <answer>13</answer>", {"language": "en"}, None),  # R1-Zero format too
    (CLEAN_EN, {"truncated": True}, "truncated"),
    (f"{R}first 6 plus 7 is 13", {}, "no_reasoning"),  # reasoning never closed
    (f"{R}first 6 plus 7 is 13{S}  ", {}, "no_reasoning"),  # empty summary
    (f"{R}{S}13", {}, "no_reasoning"),  # empty reasoning
    (f"{R}let me write code\n```python\nprint(6 + 7)\n```\nit prints 13{S}13", {}, "code_block"),
    (f"{R}{'add the numbers one by one ' * 20}{S}13", {}, "long_paragraph"),  # one 520-char paragraph
    (f"{R}首先 6 加 7 等于 13 ， then 13 plus 7 is 20{S}答案 是 20", {"language": "zh"}, "mixed_language"),
    (f"{R}首先 6 加 7 等于 13 ， then 13 plus 7 is 20{S}答案 是 20", {}, "mixed_language"),  # no target: dominant
    (CLEAN_EN, {"language": "zh"}, "mixed_language"),  # all English but Chinese was asked for
])
def test_reject_reason(text, kwargs, reason):
    readability = filters.Readability(max_paragraph_chars=400, min_language_share=0.9)
    assert filters.reject_reason(text, readability=readability, **kwargs) == reason


def test_readability_keeps_what_it_should():
    readability = filters.Readability(max_paragraph_chars=400)
    two_paragraphs = f"{R}{'add the numbers ' * 20}\n\n{'then check the sum ' * 15}{S}13"  # 320 + 285 chars
    assert filters.longest_paragraph(two_paragraphs.split(S)[0]) < 400
    assert filters.reject_reason(two_paragraphs, readability=readability) is None
    code_in_summary = f"{R}the function adds 4 then triples{S}```python\ndef f(x): return (x + 4) * 3\n```"
    assert filters.reject_reason(code_in_summary) is None  # only the reasoning must be free of code blocks
    math_only = f"{R}$6 + 7 = 13$ , $13 \\times 2 = 26${S}26"  # math carries no language
    assert filters.reject_reason(math_only, language="zh") is None
    assert filters.reject_reason(f"{R}```x```{S}1", readability=filters.Readability(reject_code_blocks=False)) is None


def test_extract_answer_in_both_formats():
    assert filters.extract_answer(CLEAN_EN) == "13"  # prose summary: math-verify's extraction
    assert filters.extract_answer(CLEAN_ZH) == "13"
    assert filters.extract_answer(f"{R}r{S}so it is \\boxed{{\\frac{{1}}{{2}}}}.") == "\\frac{1}{2}"
    assert filters.extract_answer("<think>r</think> <answer>16</answer>") == "16"
    assert filters.extract_answer(f"{R}no summary yet") is None
    assert filters.answer_accuracy(["q"] * 4, [CLEAN_EN, CLEAN_ZH, f"{R}r{S}the answer is 12 .", f"{R}r{S}0.5"],
                                   answer=["13", "13", "13", "1/2"]) == [1.0, 1.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------ select


def _math(question, answer, language="en"):
    return {"question": question, "answer": answer, "language": language, "task": "arith"}


def test_select_keeps_correct_readable_responses_and_counts_every_rejection():
    records = [_math("Calculate 6 + 7 .", "13"),
               {"question": "Write add3(x).", "tests": ["assert add3(1) == 4", "assert add3(0) == 3"],
                "language": "en", "task": "code"}]
    short_right = f"{R}6 plus 7 is 13{S}the answer is 13 ."
    texts = [[f"{R}first 6 plus 7 is 13 , yes 13{S}6 + 7 = 13 . the answer is 13 .",  # correct, longer
              f"{R}6 plus 7 is 12{S}the answer is 12 .",  # incorrect
              short_right,  # correct, shortest
              f"{R}6 加 7 等于 13{S}the answer is 13 .",  # correct but mixed language
              short_right,  # duplicate
              short_right],  # truncated (flag below)
             [f"{R}add three{S}```python\ndef add3(x):\n    return x + 3\n```",
              f"{R}add four{S}```python\ndef add3(x):\n    return x + 4\n```"]]
    truncated = [[False, False, False, False, False, True], [False, False]]
    kept, stats = rs.select(records, texts, truncated, prompt_field="question", per_prompt=1, pick="shortest")
    assert [k["response"] for k in kept] == [short_right, texts[1][0]]
    assert kept[0] == {"prompt": "Calculate 6 + 7 .", "response": short_right, "source": "reasoning",
                       "check": "math", "language": "en", "task": "arith", "answer": "13"}
    assert stats["rejected"] == {"truncated": 1, "no_reasoning": 0, "code_block": 0, "long_paragraph": 0,
                                 "mixed_language": 1, "incorrect": 2, "duplicate": 1}
    assert stats["samples"] == 8 and stats["kept"] == 2 and stats["not_selected"] == 1
    assert stats["by_check"]["math"] == {"samples": 6, "kept": 1}
    assert stats["by_check"]["code"] == {"samples": 2, "kept": 1}
    kept_all, stats_all = rs.select(records[:1], texts[:1], truncated[:1], prompt_field="question", per_prompt=5,
                                    pick="first")
    assert [k["response"] for k in kept_all] == [texts[0][0], short_right] and stats_all["not_selected"] == 0


def test_select_without_a_judge_fails_loudly_for_unruled_prompts():
    with pytest.raises(ValueError, match="judge"):
        rs.select([{"question": "How are you ?"}], [[CLEAN_EN]], [[False]], prompt_field="question")


def test_non_reasoning_mix_ratio(tmp_path):
    pool = tmp_path / "other.jsonl"
    pool.write_text("".join(f'{{"prompt": "p{i}", "response": "r{i}", "kind": "writing"}}\n' for i in range(4)))
    others = rs.load_others([str(pool)], n_reasoning=30, share=0.25, seed=0)
    assert len(others) == 10  # 10 / (30 + 10) = 0.25
    assert sorted({o["prompt"] for o in others[:4]}) == ["p0", "p1", "p2", "p3"]  # the pool is used up before repeats
    assert all(o["source"] == "non_reasoning" and o["kind"] == "writing" for o in others)
    assert rs.load_others([], n_reasoning=30, share=0.0, seed=0) == []
    with pytest.raises(ValueError):
        rs.load_others([str(pool)], n_reasoning=3, share=1.0, seed=0)


# ------------------------------------------------------------------------------------------ judges


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.world import ensure_world, train_world_tokenizer

    world = ensure_world(str(tmp_path_factory.mktemp("rs_world")), 0)
    return load_tokenizer(train_world_tokenizer(world, os.path.join(world, "tokenizer"), 1024))


@pytest.fixture(scope="module")
def cfg():
    return models.get_preset("tiny_dense", vocab_size=1024, n_layers=2, n_dense_layers=2)


def _rm(cfg, tokenizer, *, w_scale=0.0, bias=0.0, aspect="helpful"):
    decoder = models.init(cfg, jax.random.PRNGKey(0))
    head = {"w_d": w_scale * jax.random.normal(jax.random.PRNGKey(1), (cfg.d_model,)), "b": jnp.asarray(bias),
            "w_lp": jnp.asarray(0.0)}
    return rm_lib.RewardModel(cfg=cfg, params={"decoder": decoder, "head": head}, tokenizer=tokenizer, aspect=aspect,
                              template="raw", max_len=128, batch_size=4)


def test_reward_model_judge_threshold_decides_unruled_prompts(cfg, tokenizer):
    records = [{"question": "How are you ?", "language": "en"}, _math("Calculate 6 + 7 .", "13")]
    texts = [[CLEAN_EN, f"{R}I am fine{S}I am fine , thank you ."], [CLEAN_EN]]
    for bias, kept_n in ((1.0, 1), (-1.0, 0)):  # a constant score of +1 / -1 against min_score 0
        judge = judge_lib.RewardModelJudge(_rm(cfg, tokenizer, bias=bias))
        kept, stats = rs.select(records, texts, [[False, False], [False]], prompt_field="question", judge=judge,
                                min_score=0.0, per_prompt=2, pick="first")
        assert stats["by_check"]["judge"] == {"samples": 2, "kept": 2 * kept_n}
        assert stats["by_check"]["math"] == {"samples": 1, "kept": 1}  # a rule check never asks the judge
        assert stats["rejected"]["incorrect"] == 2 * (1 - kept_n)


def test_reward_model_judge_reads_the_summary_for_helpfulness(cfg, tokenizer):
    rm = _rm(cfg, tokenizer, w_scale=1.0)
    q = ["How are you ?"] * 3
    full = [f"{R}some reasoning here{S}I am fine .", f"{R}completely different thoughts{S}I am fine .",
            "I am fine ."]
    helpful = judge_lib.RewardModelJudge(rm, "helpful")(q, [None] * 3, full)
    np.testing.assert_allclose(helpful, helpful[2], rtol=1e-5)  # summary only: the reasoning does not count
    harmless = judge_lib.RewardModelJudge(rm, "harmless")(q, [None] * 3, full)
    assert abs(harmless[0] - harmless[1]) > 1e-4  # the whole response: the reasoning counts


def test_generative_judge_score_is_the_yes_no_log_likelihood_ratio(cfg, tokenizer):
    params = models.init(cfg, jax.random.PRNGKey(3))
    judge = judge_lib.GenerativeJudge(cfg, params, tokenizer, yes=" yes", no=" no", batch_size=2)
    questions, refs = ["Calculate 6 + 7 .", "猫 有 几 条 腿 ？", "Calculate 2 * 3 ."], ["13", None, "6"]
    responses = [CLEAN_EN, f"{R}想想{S}四 条 。", "the answer is 6"]
    got = judge(questions, refs, responses)

    def logp(prompt, continuation):  # unpadded, one sequence at a time
        head = [tokenizer.bos_id] + tokenizer.encode(prompt)
        tokens = jnp.asarray([head + tokenizer.encode(continuation)])
        logits, _ = models.forward(params, tokens, cfg)
        lp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), -1)
        return float(sum(lp[t - 1, tokens[0, t]] for t in range(len(head), tokens.shape[1])))

    for i in range(3):
        prompt = judge.prompt(questions[i], refs[i], responses[i])
        assert "Response: " + (responses[i].split(S)[-1]) in prompt  # the judge sees the summary
        np.testing.assert_allclose(got[i], logp(prompt, " yes") - logp(prompt, " no"), rtol=1e-4, atol=1e-4)
    kept, stats = rs.select([{"question": q} for q in questions], [[r] for r in responses], [[False]] * 3,
                            prompt_field="question", judge=judge, min_score=0.0)
    assert stats["kept"] == int(np.sum(got >= 0))
