"""Group sampler: temperature -> 0 equals greedy full-forward decoding, exact top-p nucleus / top-k, groups
differ at temperature 1, stop sequences and EOS, sampler log-probs == the trainer's recompute, sharded ==
unsharded on 8 fake devices (MLA latent cache and GQA cache; the slot engine too)."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import models as M
from r1jax.rl import sampler as S
from r1jax.rl import trainer as TR

from helpers import subprocess_env

PRESETS = ["tiny_moe", "tiny_dense"]
PROMPTS = [[5, 17, 99, 3 + 200, 41, 8, 77], [9, 300, 12], [250, 6, 31, 90, 2]]  # different lengths
BUCKETS = (8, 16)
T_NEW = 10
NO_EOS = 10_000  # an id the model never emits


@functools.lru_cache(maxsize=None)
def _model(name):
    # Larger init_std: well-separated logits, so argmax is not decided by fp rounding between the cached
    # (absorbed MLA) and full paths.
    cfg = M.get_preset(name, mtp_depth=0, init_std=0.1, n_layers=2, n_dense_layers=1 if name == "tiny_moe" else 2)
    return cfg, M.init(cfg, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _full_forward(name):
    cfg, _ = _model(name)
    return jax.jit(lambda p, t, seg: M.forward(p, t, cfg, segment_ids=seg)[0])


def _greedy_reference(name, prompt, n_new):
    """Greedy decoding by repeated full forward passes (no cache), on a fixed-width right-padded row."""
    cfg, params = _model(name)
    width = BUCKETS[-1] + n_new
    seq = list(prompt)
    for _ in range(n_new):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(seq)] = seq
        seg = (np.arange(width) < len(seq)).astype(np.int32)[None]
        logits = _full_forward(name)(params, jnp.asarray(tokens), jnp.asarray(seg))
        seq.append(int(np.argmax(np.asarray(logits[0, len(seq) - 1]))))
    return seq[len(prompt):]


def _sample(name, spec, seed=0, prompts=PROMPTS):
    cfg, params = _model(name)
    prompts_bp, lengths_b = S.pad_prompts(prompts, BUCKETS, pad_id=0)
    out = S.make_sampler(cfg, spec)(params, prompts_bp, lengths_b, jax.random.PRNGKey(seed))
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("name", PRESETS)
def test_temperature_to_zero_equals_greedy_full_forward(name):
    g = 2
    refs = [_greedy_reference(name, p, T_NEW) for p in PROMPTS]
    out = _sample(name, S.SamplerSpec(S.Temperature(1e-4), group_size=g, max_new_tokens=T_NEW, eos_id=NO_EOS))
    assert out.tokens.shape == (len(PROMPTS) * g, T_NEW)
    for n in range(len(PROMPTS) * g):
        assert out.tokens[n].tolist() == refs[n // g], n
    assert out.lengths.tolist() == [T_NEW] * (len(PROMPTS) * g) and out.truncated.all()


def test_greedy_eos_and_stop_sequences_end_rows():
    """Greedy (argmax) follows the full-forward reference until EOS or a stop sequence, both kept."""
    name = "tiny_moe"
    refs = [_greedy_reference(name, p, T_NEW) for p in PROMPTS]
    eos, stop = refs[0][6], tuple(refs[0][2:4])  # row 0 must stop after its 4th token
    spec = S.SamplerSpec(S.Greedy(), group_size=1, max_new_tokens=T_NEW, eos_id=eos, pad_id=0,
                         stop_sequences=(stop, (NO_EOS, NO_EOS + 1, NO_EOS + 2)))
    out = _sample(name, spec)
    for n, ref in enumerate(refs):
        ends = [j for j in range(T_NEW) if ref[j] == eos or (j >= 1 and tuple(ref[j - 1:j + 1]) == stop)]
        expected = ends[0] + 1 if ends else T_NEW
        assert out.lengths[n] == expected, (n, ref, out.tokens[n])
        assert out.tokens[n, :expected].tolist() == ref[:expected]
        assert (out.tokens[n, expected:] == 0).all() and (out.logprobs[n, expected:] == 0).all()
        assert out.truncated[n] == (not ends)
    assert out.lengths[0] == 4 and not out.truncated[0]


def test_top_p_keeps_exactly_the_nucleus():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    perm = np.array([3, 0, 5, 1, 4, 2])  # vocabulary order != probability order
    logits = jnp.asarray(np.log(probs)[perm][None].repeat(2, 0), jnp.float32)  # token i has probs[perm[i]]
    nucleus = {int(np.where(perm == k)[0][0]) for k in (0, 1, 2)}  # mass before the 3rd = .65 < .7 <= .8
    keep = np.asarray(S.TopP(p=0.7).keep(logits))
    assert {int(i) for i in np.where(keep[0])[0]} == nucleus and (keep[0] == keep[1]).all()
    draws = np.asarray(jax.vmap(lambda k: S.TopP(p=0.7)(logits, jax.random.split(k, 2)))(
        jax.random.split(jax.random.PRNGKey(0), 4000)))
    assert set(np.unique(draws).tolist()) == nucleus
    freq = np.array([np.mean(draws == int(np.where(perm == k)[0][0])) for k in (0, 1, 2)])
    np.testing.assert_allclose(freq, probs[:3] / probs[:3].sum(), atol=0.02)  # renormalised nucleus
    top_k = np.asarray(S.TopK(k=2)(logits, jax.random.split(jax.random.PRNGKey(1), 2)).tolist())
    keep_k = np.asarray(S.TopK(k=2).keep(logits))
    assert {int(i) for i in np.where(keep_k[0])[0]} == {int(np.where(perm == k)[0][0]) for k in (0, 1)}
    assert all(int(t) in np.where(keep_k[0])[0] for t in top_k)


def test_group_samples_differ_at_temperature_one():
    g = 4
    out = _sample("tiny_moe", S.SamplerSpec(S.Temperature(1.0), group_size=g, max_new_tokens=T_NEW, eos_id=NO_EOS))
    for b in range(len(PROMPTS)):
        rows = [tuple(out.tokens[b * g + i]) for i in range(g)]
        assert len(set(rows)) == g, rows
    again = _sample("tiny_moe", S.SamplerSpec(S.Temperature(1.0), group_size=g, max_new_tokens=T_NEW,
                                              eos_id=NO_EOS))
    other = _sample("tiny_moe", S.SamplerSpec(S.Temperature(1.0), group_size=g, max_new_tokens=T_NEW,
                                              eos_id=NO_EOS), seed=1)
    assert (again.tokens == out.tokens).all() and not (other.tokens == out.tokens).all()  # rng decides


@pytest.mark.parametrize("name", PRESETS)
def test_sampler_logprobs_match_trainer_recompute(name):
    cfg, params = _model(name)
    g, temperature = 3, 0.7
    spec = S.SamplerSpec(S.TopP(temperature, p=0.9), group_size=g, max_new_tokens=T_NEW, eos_id=NO_EOS)
    out = _sample(name, spec)
    prompts = [p for p in PROMPTS for _ in range(g)]
    batch = TR.build_batch(prompts, out.tokens, out.lengths, prompt_buckets=BUCKETS, completion_buckets=(T_NEW,),
                           pad_id=0)
    logp, _ = jax.jit(lambda p, b: TR.completion_logprobs(p, b, cfg, temperature))(params, batch)
    mask = batch["mask"] > 0
    assert mask.sum() == out.lengths.sum() > 0
    diff = np.abs(np.asarray(logp) - out.logprobs)[mask]
    assert diff.max() <= 1e-5, diff.max()
    assert (out.logprobs[mask] < 0).all()


def test_padding_helpers():
    prompts, lengths = S.pad_prompts([[1, 2, 3], [4]], (2, 4, 8), pad_id=0, batch_size=3)
    assert prompts.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [4, 0, 0, 0]] and lengths.tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        S.pad_prompts([[1] * 9], (4, 8), pad_id=0)
    batch = TR.build_batch([[7, 8, 9], [5]], np.array([[1, 2, 0], [3, 0, 0]]), np.array([2, 1]),
                           prompt_buckets=(4,), completion_buckets=(2, 4), pad_id=0, train_mask_n=np.array([1, 0]))
    assert batch["tokens"].tolist() == [[0, 7, 8, 9, 1, 2], [0, 0, 0, 5, 3, 0]]
    assert batch["positions"].tolist() == [[0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 1, 0]]
    assert batch["segment_ids"].tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert batch["mask"].tolist() == [[1, 1], [0, 0]]


# ------------------------------------------------------------------------------ sharded (8 fake devices)

MESHES = [("tiny_moe", {"data": 2, "fsdp": 2, "tensor": 2}), ("tiny_moe", {"fsdp": 2, "expert": 4}),
          ("tiny_dense", {"data": 4, "tensor": 2})]


def test_sharded_sampler_matches_single_device():
    # XLA's cheapest backend optimisation, as in the other sharding workers: this run is bound by compile time
    env = subprocess_env(xla_flags="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--sharded-worker"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(MESHES)
    for r in rows:
        assert r["tokens_equal"] and r["rows_sharded"], r  # same samples from the same key
        assert r["logprob_diff"] < 1e-5 and r["sharded_params"] > 0, r
        if "engine_tokens_equal" in r:  # the slot engine under the same mesh: the same rows
            assert r["engine_tokens_equal"] and r["engine_rows_sharded"] and r["engine_logprob_diff"] < 1e-5, r
    assert sum("engine_tokens_equal" in r for r in rows) == 2


def _sharded_worker():
    from r1jax import sharding as SH

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8
    prompts_bp, lengths_b = S.pad_prompts(PROMPTS[:2], BUCKETS, pad_id=0)
    refs = {}  # the single-device samples, once per preset
    for name, ici in MESHES:
        cfg, params = _model(name)
        mesh, rules = SH.make_mesh(ici), SH.DEFAULT_RULES
        sharded = jax.device_put(params, M.param_shardings(cfg, mesh, rules))
        row = {"preset": name, "mesh": ici}
        spec = S.SamplerSpec(S.Temperature(1.0), group_size=4, max_new_tokens=T_NEW, eos_id=NO_EOS)
        if name not in refs:
            refs[name] = S.make_sampler(cfg, spec)(params, prompts_bp, lengths_b, jax.random.PRNGKey(3))
        ref = refs[name]
        got = S.make_sampler(cfg, spec, mesh=mesh, rules=rules)(sharded, prompts_bp, lengths_b, jax.random.PRNGKey(3))
        row["tokens_equal"] = bool((np.asarray(ref.tokens) == np.asarray(got.tokens)).all())
        row["rows_sharded"] = not got.tokens.sharding.is_fully_replicated
        row["logprob_diff"] = float(np.abs(np.asarray(ref.logprobs) - np.asarray(got.logprobs)).max())
        row["sharded_params"] = sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded))
        if ici != MESHES[1][1]:  # the MLA and the GQA cache
            from r1jax.rl import engine as E

            eng = E.make_engine(cfg, spec, E.EngineSpec(slots=4, chunk_steps=4), mesh=mesh, rules=rules)(
                sharded, prompts_bp, lengths_b, jax.random.PRNGKey(3))
            row["engine_tokens_equal"] = bool((np.asarray(ref.tokens) == np.asarray(eng.tokens)).all())
            row["engine_rows_sharded"] = not eng.tokens.sharding.is_fully_replicated
            row["engine_logprob_diff"] = float(np.abs(np.asarray(ref.logprobs) - np.asarray(eng.logprobs)).max())
        print(json.dumps(row), flush=True)


if __name__ == "__main__" and "--sharded-worker" in sys.argv:
    _sharded_worker()
