"""GRPO math checked against plain-numpy loop implementations written here, independently of r1jax."""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.rl import grpo

AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


# ---------------------------------------------------------------- numpy references (loops, float64)

def np_group_advantages(rewards, g, scale, baseline, eps):
    rewards = [float(r) for r in rewards]
    n = len(rewards)

    def std(xs):  # sample std, ddof=1
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    batch_std = std(rewards)
    out = []
    for b in range(n // g):
        grp = rewards[b * g:(b + 1) * g]
        for i, r in enumerate(grp):
            if all(x == grp[0] for x in grp):
                out.append(0.0)
                continue
            if baseline == "mean":
                base = sum(grp) / g
            else:
                base = sum(x for j, x in enumerate(grp) if j != i) / (g - 1)
            s = {"group": std(grp) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
            out.append((r - base) / s)
    return np.array(out)


def np_policy_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, agg, max_len=None):
    n, t = logp.shape
    max_len = t if max_len is None else max_len
    tok = np.zeros((n, t))
    for i in range(n):
        for j in range(t):
            if not mask[i, j]:
                continue
            rho = math.exp(logp[i, j] - old[i, j])
            rho_c = min(max(rho, 1 - eps_low), 1 + eps_high)
            s = min(rho * adv[i], rho_c * adv[i])
            kl = 0.0
            if ref is not None:
                d = ref[i, j] - logp[i, j]
                kl = math.exp(d) - d - 1
            tok[i, j] = -(s - beta * kl)
    return np_aggregate(tok, mask, agg, max_len)


def np_aggregate(tok, mask, agg, max_len):
    """The AGG_MODES reduction of per-token losses tok [N, T] (0 off the mask), in float64."""
    n = tok.shape[0]
    if agg == "token-mean":
        return tok.sum() / max(mask.sum(), 1)
    if agg == "seq-mean-token-sum-norm":
        return tok.sum() / (n * max_len)
    seq = [tok[i].sum() / mask[i].sum() for i in range(n) if mask[i].sum() > 0]
    return sum(seq) / max(len(seq), 1)


def make_batch(seed, n=6, t=7, spread=0.4):
    """Ragged mask (incl. one empty row), ratios spread well outside [0.8, 1.2] on both sides."""
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.5, (n, t))
    old = logp + rng.normal(0.0, spread, (n, t))
    ref = logp + rng.normal(0.0, spread, (n, t))
    lengths = np.array([t, 1, 0, 4, t - 2, 3])[:n]
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(0.0, 1.0, n)
    return logp, old, ref, adv, mask


def run_loss(logp, old, ref, adv, mask, **kw):
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    return grpo.policy_loss(f32(logp), f32(old), f32(ref), f32(adv), f32(mask), **kw)


# ---------------------------------------------------------------- group_advantages

@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_group_advantages_match_numpy(scale, baseline):
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 3, 20).astype(np.float64) + rng.normal(0, 0.1, 20) * (rng.random(20) < 0.5)
    rewards[:4] = 1.0  # one zero-std group
    adv, metrics = grpo.group_advantages(jnp.asarray(rewards, jnp.float32), 4, scale=scale, baseline=baseline)
    np.testing.assert_allclose(np.asarray(adv), np_group_advantages(rewards, 4, scale, baseline, 1e-6),
                               rtol=1e-5, atol=1e-5)
    assert float(metrics["zero_std_frac"]) == pytest.approx(1 / 5)
    assert float(metrics["reward_mean"]) == pytest.approx(rewards.mean(), rel=1e-5)


def test_group_advantages_use_sample_std():
    adv, _ = grpo.group_advantages(jnp.array([0.0, 1.0, 1.0, 1.0]), 4, eps=0.0)
    # mean 0.75; sample std sqrt(0.75/3) = 0.5 (population std would be 0.433)
    np.testing.assert_allclose(np.asarray(adv), [-1.5, 0.5, 0.5, 0.5], rtol=1e-6)


def test_loo_baseline_rescales_mean_baseline():
    rewards = jnp.array([0.0, 1.0, 3.0, 0.5, 2.0, 2.0, 1.0, 0.0])
    adv_mean, _ = grpo.group_advantages(rewards, 4, scale="none")
    adv_loo, _ = grpo.group_advantages(rewards, 4, scale="none", baseline="loo")
    np.testing.assert_allclose(np.asarray(adv_loo), 4 / 3 * np.asarray(adv_mean), rtol=1e-6)


def test_zero_std_groups_are_exactly_zero_and_counted():
    # 0.1 and 0.7 are not exact in float32: r - mean(r) is ~1e-8, not 0, unless zero-std groups are forced
    rewards = jnp.array([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.7, 0.7, 0.7])
    for scale, baseline in itertools.product(("group", "batch", "none"), ("mean", "loo")):
        adv, metrics = grpo.group_advantages(rewards, 3, scale=scale, baseline=baseline)
        adv = np.asarray(adv)
        assert np.all(adv[0:3] == 0.0) and np.all(adv[6:12] == 0.0)
        assert np.all(adv[3:6] != 0.0)
        assert float(metrics["zero_std_frac"]) == pytest.approx(3 / 4)


def test_group_advantages_jit_and_errors():
    rewards = jnp.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    jitted = jax.jit(grpo.group_advantages, static_argnames=("group_size", "scale", "baseline"))
    np.testing.assert_allclose(np.asarray(jitted(rewards, 3, scale="batch")[0]),
                               np.asarray(grpo.group_advantages(rewards, 3, scale="batch")[0]), rtol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(rewards, 3, scale="global")
    with pytest.raises(ValueError, match="baseline"):
        grpo.group_advantages(rewards, 3, baseline="median")


# ---------------------------------------------------------------- policy_loss values

@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_matches_numpy_mu_gt_1(agg):
    logp, old, ref, adv, mask = make_batch(1)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg)
    loss, metrics = run_loss(logp, old, ref, adv, mask, **kw)
    assert float(loss) == pytest.approx(np_policy_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.04, agg), rel=1e-5)
    assert float(metrics["pg_loss"]) == pytest.approx(
        np_policy_loss(logp, old, None, adv, mask, 0.2, 0.28, 0.0, agg), rel=1e-5)

    # metrics against numpy
    m = mask > 0
    rho = np.exp(logp - old)
    a = np.broadcast_to(adv[:, None], rho.shape)
    low = (rho < 0.8) & (a < 0)
    high = (rho > 1.28) & (a > 0)
    assert low[m].sum() > 0 and high[m].sum() > 0  # clipping active on both sides
    assert float(metrics["clip_frac_low"]) == pytest.approx(low[m].mean(), rel=1e-6)
    assert float(metrics["clip_frac_high"]) == pytest.approx(high[m].mean(), rel=1e-6)
    assert float(metrics["clip_frac"]) == pytest.approx((low | high)[m].mean(), rel=1e-6)
    assert float(metrics["ratio_mean"]) == pytest.approx(rho[m].mean(), rel=1e-5)
    d = ref - logp
    assert float(metrics["kl"]) == pytest.approx((np.exp(d) - d - 1)[m].mean(), rel=1e-5)


def test_clip_higher_asymmetry():
    # one token per row: ratio 1.25 with Â>0 is clipped by eps_high=0.2 but not by eps_high=0.28
    logp = np.log(np.array([[1.25], [0.75], [1.25], [0.75]]))
    old = np.zeros_like(logp)
    adv = np.array([1.0, -1.0, -1.0, 1.0])
    mask = np.ones_like(logp)
    _, sym = run_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2)
    _, asym = run_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.28)
    assert float(sym["clip_frac_high"]) == 0.25 and float(sym["clip_frac_low"]) == 0.25
    assert float(asym["clip_frac_high"]) == 0.0 and float(asym["clip_frac_low"]) == 0.25
    assert float(sym["clip_frac"]) == 0.5 and float(asym["clip_frac"]) == 0.25


def test_clipped_tokens_have_zero_gradient():
    logp = np.log(np.array([[1.5], [0.5], [1.5], [0.5]]))
    old = np.zeros_like(logp)
    adv = np.array([1.0, -1.0, -1.0, 1.0])  # rows 0,1 clipped (high, low); rows 2,3 pessimistic unclipped
    grad = jax.grad(lambda lp: run_loss(lp, old, None, adv, np.ones_like(logp), beta=0.0,
                                        agg="token-mean")[0])(jnp.asarray(logp, jnp.float32))
    # unclipped: d/dlogp of -(ρ Â)/4 = -ρ Â / 4
    np.testing.assert_allclose(np.asarray(grad)[:, 0], [0.0, 0.0, 1.5 / 4, -0.5 / 4], rtol=1e-6)


@pytest.mark.parametrize("agg", AGGS)
def test_mu_equals_1_value_and_gradient(agg):
    logp, _, _, adv, mask = make_batch(2)
    lengths = mask.sum(1)
    n, t = logp.shape

    def loss_fn(lp):
        return grpo.policy_loss(lp, jax.lax.stop_gradient(lp), None, jnp.asarray(adv, jnp.float32),
                                jnp.asarray(mask, jnp.float32), beta=0.0, agg=agg)[0]

    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logp, jnp.float32))
    # ratio = 1, nothing clipped: loss = -Σ_i w_i |o_i| Â_i and dloss/dlogp_it = -w_i Â_i m_it
    nonempty = lengths > 0
    w = {"seq-mean-token-mean": np.where(nonempty, 1 / np.maximum(lengths, 1), 0) / nonempty.sum(),
         "token-mean": np.full(n, 1 / lengths.sum()),
         "seq-mean-token-sum-norm": np.full(n, 1 / (n * t))}[agg]
    assert float(loss) == pytest.approx(-(w * lengths * adv).sum(), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.asarray(grad), -(w * adv)[:, None] * mask, rtol=1e-5, atol=1e-8)
    if agg == "seq-mean-token-mean":
        assert float(loss) == pytest.approx(-adv[nonempty].mean(), rel=1e-5)


@pytest.mark.parametrize("agg", AGGS)
def test_gradient_matches_finite_differences(agg):
    logp, old, ref, adv, mask = make_batch(3, spread=0.3)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1, agg=agg)
    grad = np.asarray(jax.grad(lambda lp: run_loss(lp, old, ref, adv, mask, **kw)[0])(
        jnp.asarray(logp, jnp.float32)))
    h = 1e-6
    fd = np.zeros_like(logp)
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            up, dn = logp.copy(), logp.copy()
            up[i, j] += h
            dn[i, j] -= h
            fd[i, j] = (np_policy_loss(up, old, ref, adv, mask, 0.2, 0.28, 0.1, agg)
                        - np_policy_loss(dn, old, ref, adv, mask, 0.2, 0.28, 0.1, agg)) / (2 * h)
    assert np.abs(fd).max() > 1e-3
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
    assert np.all(grad[mask == 0] == 0)


def test_dr_grpo_max_len_normaliser():
    logp, old, ref, adv, mask = make_batch(4)
    kw = dict(agg="seq-mean-token-sum-norm", beta=0.04)
    at_t, _ = run_loss(logp, old, ref, adv, mask, **kw)
    at_3t, _ = run_loss(logp, old, ref, adv, mask, max_len=3 * logp.shape[1], **kw)
    assert float(at_3t) == pytest.approx(float(at_t) / 3, rel=1e-6)
    assert float(at_3t) == pytest.approx(
        np_policy_loss(logp, old, ref, adv, mask, 0.2, 0.2, 0.04, kw["agg"], max_len=3 * logp.shape[1]), rel=1e-5)


# ---------------------------------------------------------------- KL

def test_kl_nonnegative_per_token_and_zero_at_reference():
    logp, old, ref, adv, mask = make_batch(5, spread=2.0)
    per_token = jax.jit(lambda m: run_loss(logp, old, ref, adv, m, beta=0.04)[1]["kl"])
    for i, j in [(0, 0), (0, 3), (3, 1), (4, 2), (5, 0)]:
        one_hot = np.zeros_like(mask)
        one_hot[i, j] = 1
        d = ref[i, j] - logp[i, j]
        kl = float(per_token(one_hot))
        assert kl >= 0 and kl == pytest.approx(math.exp(d) - d - 1, rel=1e-5)

    loss_same_ref, m_same = run_loss(logp, old, logp, adv, mask, beta=0.5)
    loss_no_ref, m_none = run_loss(logp, old, None, adv, mask, beta=0.5)
    assert float(m_same["kl"]) == 0.0 and "kl" not in m_none
    assert float(loss_same_ref) == float(loss_no_ref)


def test_beta_zero_skips_kl():
    logp, old, ref, adv, mask = make_batch(6)
    with_ref, _ = run_loss(logp, old, ref, adv, mask, beta=0.0)
    without, _ = run_loss(logp, old, None, adv, mask, beta=0.0)
    with_beta, _ = run_loss(logp, old, ref, adv, mask, beta=0.1)
    assert float(with_ref) == float(without) and float(with_beta) > float(without)
    far_ref = ref + 200.0  # exp(ref - logp) overflows float32: a 0·inf KL term would be NaN
    assert float(run_loss(logp, old, far_ref, adv, mask, beta=0.0)[0]) == float(without)


# ---------------------------------------------------------------- robustness, jit, errors

@pytest.mark.parametrize("agg", AGGS)
def test_masked_garbage_and_empty_rows_stay_finite(agg):
    logp, old, ref, adv, mask = make_batch(7)
    for x in (logp, old, ref):
        x[mask == 0] = np.nan
    logp[2, :] = 1e30  # fully masked row with absurd values
    loss, grad = jax.value_and_grad(lambda lp: run_loss(lp, old, ref, adv, mask, beta=0.04, agg=agg)[0])(
        jnp.asarray(logp, jnp.float32))
    clean = make_batch(7)
    assert float(loss) == pytest.approx(float(run_loss(*clean, beta=0.04, agg=agg)[0]), rel=1e-6)
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[mask == 0] == 0)
    all_masked = run_loss(logp, old, ref, adv, np.zeros_like(mask), agg=agg)
    assert float(all_masked[0]) == 0.0
    assert all(np.isfinite(float(v)) for v in all_masked[1].values())


def test_policy_loss_jit_matches_eager():
    logp, old, ref, adv, mask = make_batch(8)
    args = [jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask)]
    for agg in AGGS:
        fn = functools.partial(grpo.policy_loss, eps_high=0.28, beta=0.04, agg=agg)
        eager, m_eager = fn(*args)
        jitted, m_jit = jax.jit(fn)(*args)
        assert float(jitted) == pytest.approx(float(eager), rel=1e-6)
        assert set(m_jit) == set(m_eager)


def test_policy_loss_errors():
    logp, old, ref, adv, mask = make_batch(9)
    with pytest.raises(ValueError, match="agg"):
        run_loss(logp, old, ref, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="advantages"):
        run_loss(logp, old, ref, adv[:3], mask)
    with pytest.raises(ValueError, match="ref_logp"):
        run_loss(logp, old, ref[:, :3], adv, mask)


# ---------------------------------------------------------------- token_entropy

def test_token_entropy_matches_numpy():
    rng = np.random.default_rng(10)
    logits = rng.normal(0, 2.0, (3, 4, 11))
    logits[0, 0, :5] = -np.inf  # banned tokens
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float64)
    expected, count = 0.0, 0
    for i in range(3):
        for j in range(4):
            if mask[i, j]:
                z = logits[i, j]
                p = np.exp(z - z.max())
                p /= p.sum()
                expected += -sum(pv * math.log(pv) for pv in p if pv > 0)
                count += 1
    got = float(grpo.token_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(mask)))
    assert got == pytest.approx(expected / count, rel=1e-5)
    uniform = grpo.token_entropy(jnp.zeros((2, 3, 16)), jnp.ones((2, 3)))
    assert float(uniform) == pytest.approx(math.log(16), rel=1e-6)
    assert float(grpo.token_entropy(jnp.asarray(logits, jnp.float32), jnp.zeros((3, 4)))) == 0.0


# ---------------------------------------------------------------- the trainer's memory options (tiny model, 1 device)

@functools.lru_cache(maxsize=None)
def _trainer_world():
    import ml_collections as mlc

    from r1jax import models
    from r1jax.rl import trainer
    from r1jax.sharding import DEFAULT_RULES, make_mesh

    cfg = models.get_preset("tiny_dense", n_layers=1, n_dense_layers=1, vocab_size=64)
    mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
    # eps = 1: Adam's first step is ~lr * grad, so comparing params compares gradients (with eps = 1e-8 it is
    # lr * sign(grad), which turns the rounding of a near-zero gradient into a full step).
    opt = trainer.optimizer_key(mlc.ConfigDict(dict(lr=1.0, warmup_steps=0, schedule="constant", end_lr_ratio=1.0,
                                                    b1=0.9, b2=0.95, eps=1.0, weight_decay=0.0, clip_norm=0.0)))
    rng = np.random.default_rng(0)
    prompts = [[1, 5, 9], [1, 7], [2, 3, 4, 5], [6]] * 2
    batch = trainer.build_batch(prompts, rng.integers(4, 64, (8, 6)).astype(np.int32),
                                np.array([6, 3, 5, 1, 2, 6, 4, 1]), prompt_buckets=(4,), completion_buckets=(6,),
                                pad_id=0, train_mask_n=np.array([1, 1, 1, 0, 1, 1, 1, 1], bool))
    return cfg, mesh, DEFAULT_RULES, opt, batch


@pytest.mark.parametrize("mini_batches,agg,beta", [(1, "token-mean", 0.0), (2, "seq-mean-token-mean", 0.1)])
def test_update_micro_batches_equal_one_pass(mini_batches, agg, beta):
    """Gradient accumulation over 2 micro-batches gives the mini-batch's update and metrics: the fused single
    update (π_old its own forward) with token-mean, and 2 mini-batches with the paper's seq-mean and a KL."""
    from r1jax.rl import trainer
    from r1jax.train import state as state_lib

    cfg, mesh, rules, opt, batch = _trainer_world()
    adv = np.array([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.5, 1.0], np.float32)
    scorer = trainer.make_scorer(cfg, 0.8, mesh=mesh, rules=rules)
    out = []
    for micro in (1, 2):
        loss = trainer.LossSpec(temperature=0.8, agg=agg, beta=beta, mini_batches=mini_batches, micro_batches=micro)
        update = trainer.make_update(cfg, opt, 10, loss, mesh=mesh, rules=rules)
        state = state_lib.init_state(cfg, update.tx, 0, update.shardings)
        old_logp = None if update.fused else scorer(state.params, batch)[0]
        ref_logp = scorer(state.params, batch)[0] - 0.1 if beta else None
        out.append(update(state, batch, old_logp, ref_logp, adv, jax.random.PRNGKey(0)))
    (state1, metrics1, logp1), (state2, metrics2, logp2) = jax.device_get(out)
    assert float(metrics1["grad_norm"]) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), state2.params, state1.params)
    assert metrics1.keys() == metrics2.keys()
    for k in metrics1:
        np.testing.assert_allclose(metrics2[k], metrics1[k], atol=1e-6, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(logp2, logp1, atol=1e-6)


def test_scorer_row_chunks_and_bf16_reference():
    """The log-prob pass over chunks of 2 rows equals the whole-batch pass; a bf16 reference copy (router leaves
    kept fp32) scores exactly like its fp32 original when the model computes in bf16."""
    from r1jax import models
    from r1jax.rl import trainer

    cfg, mesh, rules, _, batch = _trainer_world()
    params = models.init(cfg, jax.random.PRNGKey(1))
    whole = trainer.make_scorer(cfg, 0.8, mesh=mesh, rules=rules)(params, batch)
    chunked = trainer.make_scorer(cfg, 0.8, mesh=mesh, rules=rules, chunk_rows=2)(params, batch)
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-6)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        trainer.make_scorer(cfg, 0.8, mesh=mesh, rules=rules, chunk_rows=3)(params, batch)

    moe = models.get_preset("tiny_moe", n_layers=2, mtp_depth=0, dtype="bfloat16")
    moe_params = models.init(moe, jax.random.PRNGKey(2))
    ref = trainer.copy_params(moe_params, models.param_shardings(moe, mesh, rules), dtype="bfloat16")
    dtypes = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda x: x.dtype, ref))[0]
    assert {str(d) for p, d in dtypes if p[-1].key in ("router", "router_bias")} == {"float32"}
    assert {str(d) for p, d in dtypes if p[-1].key not in ("router", "router_bias")} == {"bfloat16"}
    score = trainer.make_scorer(moe, 1.0, mesh=mesh, rules=rules)
    np.testing.assert_array_equal(score(ref, batch)[0], score(moe_params, batch)[0])


# ---------------------------------------------------------------- packed trainer batch (rl.pack)

def test_pack_batch_keeps_every_row_whole():
    """Every real token lands once, each row contiguous in one sequence with its own segment id and positions
    from 0; `start` + 1 + j is the column of completion token j; R a multiple of 4; Layout round-trips rows."""
    from r1jax.rl import trainer

    rng = np.random.default_rng(3)
    n, p, t = 37, 6, 9
    prompts = [list(rng.integers(1, 64, rng.integers(1, p + 1))) for _ in range(n)]
    lengths = rng.integers(1, t + 1, n)
    completions = rng.integers(1, 64, (n, t)).astype(np.int32)
    batch = trainer.build_batch(prompts, completions, lengths, prompt_buckets=(p,), completion_buckets=(t,),
                                pad_id=0, train_mask_n=rng.random(n) > 0.2)
    packed, layout = trainer.pack_batch(batch, multiple=4)
    r, k = layout.slots.shape
    assert r % 4 == 0 and packed["tokens"].shape == (r, p + t) and packed["mask"].shape == (r, k, t)
    assert sorted(layout.slots[layout.slots >= 0].tolist()) == list(range(n))  # every row exactly once
    assert (packed["segment_ids"] > 0).sum() == sum(map(len, prompts)) + lengths.sum()
    for j, s in zip(*np.nonzero(layout.slots >= 0)):
        i = layout.slots[j, s]
        cols = np.flatnonzero(packed["segment_ids"][j] == s + 1)
        row = np.concatenate([prompts[i], completions[i, :lengths[i]]])
        assert (np.diff(cols) == 1).all() and len(cols) == len(row)  # contiguous, whole
        np.testing.assert_array_equal(packed["tokens"][j, cols], row)
        np.testing.assert_array_equal(packed["positions"][j, cols], np.arange(len(row)))
        completion_cols = packed["start"][j, s] + 1 + np.arange(lengths[i])
        np.testing.assert_array_equal(packed["tokens"][j, completion_cols], completions[i, :lengths[i]])
        np.testing.assert_array_equal(packed["mask"][j, s], batch["mask"][i])
    assert (packed["start"][layout.slots < 0] == -1).all() and packed["mask"][layout.slots < 0].sum() == 0
    np.testing.assert_array_equal(layout.unrows(layout.rows(batch["mask"])), batch["mask"])
    # first-fit decreasing: no two sequences could have been one
    used = np.sort((packed["segment_ids"] > 0).sum(1)[(layout.slots >= 0).any(1)])
    assert used[0] + used[1] > p + t
    assert [trainer.pack_rows_bucket(x, 4) for x in (1, 8, 32, 33, 37, 70)] == [4, 8, 32, 36, 40, 72]


@pytest.mark.parametrize("agg,micro,beta", [("token-mean", 1, 0.0), ("token-mean", 2, 0.0),
                                            ("seq-mean-token-mean", 2, 0.1)])
def test_packed_update_equals_unpacked(agg, micro, beta):
    """One fused update on the packed batch gives the unpacked update's params, metrics and log-probs: with
    gradient accumulation, a KL term, a truncated row masked (row 3) and empty slots and sequences."""
    from r1jax.rl import trainer
    from r1jax.train import state as state_lib

    cfg, mesh, rules, opt, batch = _trainer_world()
    adv = np.array([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.5, 1.0], np.float32)
    loss = trainer.LossSpec(temperature=0.8, agg=agg, beta=beta, micro_batches=micro)
    packed, layout = trainer.pack_batch(batch, 2 * trainer.row_multiple(mesh, rules, loss))  # 5 sequences -> 6, 8
    empty = layout.slots < 0
    assert empty.all(1).any() and (empty & ~empty.all(1, keepdims=True)).any()  # empty sequences and slots
    out = []
    for pack, b in ((False, batch), (True, packed)):
        update = trainer.make_update(cfg, opt, 10, loss, mesh=mesh, rules=rules, pack=pack)
        state = state_lib.init_state(cfg, update.tx, 0, update.shardings)
        ref = scorer_logp(cfg, mesh, rules, state.params, batch) - 0.1 if beta else None
        rows = layout.rows if pack else (lambda x: x)
        out.append(jax.device_get(update(state, b, None, None if ref is None else rows(ref), rows(adv),
                                         jax.random.PRNGKey(0))))
    (state1, metrics1, logp1), (state2, metrics2, logp2) = out
    assert float(metrics1["grad_norm"]) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), state2.params, state1.params)
    assert metrics1.keys() == metrics2.keys()
    for k in metrics1:
        np.testing.assert_allclose(metrics2[k], metrics1[k], atol=1e-6, rtol=1e-5, err_msg=k)
    real = batch["segment_ids"][:, -6:] > 0
    np.testing.assert_allclose(layout.unrows(logp2) * real, logp1 * real, atol=1e-5)


def scorer_logp(cfg, mesh, rules, params, batch):
    from r1jax.rl import trainer

    return np.asarray(trainer.make_scorer(cfg, 0.8, mesh=mesh, rules=rules)(params, batch)[0])


def test_packed_scorer_equals_unpacked():
    from r1jax import models
    from r1jax.rl import trainer

    cfg, mesh, rules, _, batch = _trainer_world()
    params = models.init(cfg, jax.random.PRNGKey(1))
    packed, layout = trainer.pack_batch(batch, 2)
    logp, entropy = trainer.make_scorer(cfg, 0.8, mesh=mesh, rules=rules, pack=True)(params, packed)
    whole, whole_entropy = trainer.make_scorer(cfg, 0.8, mesh=mesh, rules=rules)(params, batch)
    real = batch["segment_ids"][:, -6:] > 0
    assert logp.shape == packed["mask"].shape
    np.testing.assert_allclose(layout.unrows(logp) * real, np.asarray(whole) * real, atol=1e-5)
    np.testing.assert_allclose(entropy, whole_entropy, rtol=1e-5)


@pytest.mark.parametrize("agg", AGGS)
def test_empty_slots_do_not_count_as_rows(agg):
    """Rows of mask 0 appended (a packed layout's empty slots), with `rows` = the real rows: the loss and its
    gradient are the unpadded ones in every mode; a real row whose mask is 0 (a masked truncated row) keeps
    counting as it does unpadded (only in Dr. GRPO's N)."""
    logp, old, ref, adv, mask = make_batch(11)
    mask[2] = 0  # a truncated row, masked
    pad = lambda x: np.concatenate([x, np.full((3,) + x.shape[1:], 0.7, x.dtype)])  # noqa: E731
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg, max_len=9)
    f = lambda lp: run_loss(lp, old, ref, adv, mask, **kw)[0]  # noqa: E731
    base, g_base = jax.value_and_grad(f)(jnp.asarray(logp, jnp.float32))
    mask_pad = np.concatenate([mask, np.zeros((3, mask.shape[1]), mask.dtype)])
    g = lambda lp: run_loss(lp, pad(old), pad(ref), pad(adv), mask_pad, rows=len(mask), **kw)[0]  # noqa: E731
    padded, g_padded = jax.value_and_grad(g)(jnp.asarray(pad(logp), jnp.float32))
    assert float(padded) == pytest.approx(float(base), rel=1e-6)
    np.testing.assert_allclose(np.asarray(g_padded)[:len(mask)], g_base, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- sequence ratio (GSPO), rollout correction

def np_corrected_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, agg, level, sampler, tis_cap, band):
    """Loops in float64: GSPO's sequence ratio or the token ratio, TIS weights min(π_old/μ, C), rows whose
    geometric-mean ratio π_old/μ leaves the band dropped from the loss and its normaliser."""
    n, t = logp.shape
    mask = mask.copy()
    for i in range(n):
        m = int(mask[i].sum())
        if band and m:
            g = math.exp(sum(old[i, j] - sampler[i, j] for j in range(m)) / m)
            if not band[0] <= g <= band[1]:
                mask[i] = 0
    tok = np.zeros((n, t))
    for i in range(n):
        m = int((np.arange(t) < (mask[i] > 0).sum()).sum())
        seq = math.exp(sum(logp[i, j] - old[i, j] for j in range(m)) / max(m, 1))
        for j in range(m):
            rho = seq if level == "sequence" else math.exp(logp[i, j] - old[i, j])
            rho_c = min(max(rho, 1 - eps_low), 1 + eps_high)
            s = min(rho * adv[i], rho_c * adv[i])
            w = min(math.exp(old[i, j] - sampler[i, j]), tis_cap) if tis_cap else 1.0
            d = ref[i, j] - logp[i, j]
            tok[i, j] = -(w * s - beta * (math.exp(d) - d - 1))
    return np_aggregate(tok, mask, agg, t)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("level,tis_cap,band", [("sequence", 0.0, None), ("token", 1.5, None),
                                                ("token", 0.0, (0.7, 1.3)), ("sequence", 2.0, (0.8, 1.25))])
def test_sequence_ratio_and_rollout_correction_match_numpy(agg, level, tis_cap, band):
    logp, old, ref, adv, mask = make_batch(5, spread=0.3)
    sampler = old + np.random.default_rng(6).normal(0.0, 0.3, old.shape)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg)
    loss, metrics = run_loss(logp, old, ref, adv, mask, ratio_level=level, sampler_logp=jnp.asarray(sampler),
                             tis_cap=tis_cap, is_mask_band=band, **kw)
    expected = np_corrected_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.04, agg, level, sampler, tis_cap, band)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    m = mask > 0
    delta = old - sampler
    assert float(metrics["sampler_logp_abs_diff"]) == pytest.approx(np.abs(delta)[m].mean(), rel=1e-5)
    assert float(metrics["sampler_kl"]) == pytest.approx((np.exp(delta) - 1 - delta)[m].mean(), rel=1e-5)
    if tis_cap:
        assert 0 < float(metrics["tis_capped_frac"]) < 1
    if band:
        rows = mask.sum(1) > 0
        g = np.exp((delta * mask).sum(1) / np.maximum(mask.sum(1), 1))
        dropped = rows & ((g < band[0]) | (g > band[1]))
        assert float(metrics["is_masked_frac"]) == pytest.approx(dropped.sum() / rows.sum(), rel=1e-6)
        assert 0 < dropped.sum() < rows.sum()


@pytest.mark.parametrize("agg", AGGS)
def test_corrections_are_exactly_todays_loss_when_sampler_equals_trainer(agg):
    logp, old, ref, adv, mask = make_batch(7)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg)
    f = lambda lp, **extra: run_loss(lp, old, ref, adv, mask, **kw, **extra)[0]  # noqa: E731
    base, g_base = jax.value_and_grad(f)(jnp.asarray(logp, jnp.float32))
    same, g_same = jax.value_and_grad(lambda lp: f(lp, sampler_logp=jnp.asarray(old, jnp.float32), tis_cap=2.0,
                                                     is_mask_band=(0.5, 2.0)))(jnp.asarray(logp, jnp.float32))
    assert float(same) == float(base) and (np.asarray(g_same) == np.asarray(g_base)).all()


def test_gspo_clips_whole_sequences():
    # row 0: token ratios 2 and 0.5 (sequence ratio 1: nothing clipped); row 1: 1.5 and 1.5 (clipped at 1.2)
    logp = np.log(np.array([[2.0, 0.5], [1.5, 1.5]]))
    old, mask, adv = np.zeros_like(logp), np.ones_like(logp), np.array([1.0, 1.0])
    _, tok = run_loss(logp, old, None, adv, mask, beta=0.0)
    _, seq = run_loss(logp, old, None, adv, mask, beta=0.0, ratio_level="sequence")
    assert float(tok["clip_frac"]) == 0.75 and float(seq["clip_frac"]) == 0.5
    with pytest.raises(ValueError, match="ratio_level"):
        run_loss(logp, old, None, adv, mask, ratio_level="seq")
    with pytest.raises(ValueError, match="sampler_logp"):
        run_loss(logp, old, None, adv, mask, tis_cap=2.0)


def test_update_reports_sampler_drift_and_corrects_it():
    """The update takes the sampler's log-probs: with the trainer's own numbers the corrected update is the plain
    one; shifted sampler log-probs show as drift, and rows whose ratio leaves the band are dropped."""
    from r1jax.rl import trainer
    from r1jax.train import state as state_lib

    cfg, mesh, rules, opt, batch = _trainer_world()
    adv = np.array([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.5, 1.0], np.float32)
    plain = trainer.make_update(cfg, opt, 10, trainer.LossSpec(), mesh=mesh, rules=rules)
    fixed = trainer.make_update(cfg, opt, 10, trainer.LossSpec(tis_cap=2.0, is_mask_band=(0.5, 2.0)), mesh=mesh,
                                rules=rules)
    params = state_lib.init_state(cfg, plain.tx, 0, plain.shardings).params
    own = np.asarray(trainer.make_scorer(cfg, 1.0, mesh=mesh, rules=rules)(params, batch)[0])
    fresh = lambda: state_lib.init_state(cfg, plain.tx, 0, plain.shardings)  # noqa: E731 (donated each call)
    base = jax.device_get(plain(fresh(), batch, None, None, adv, jax.random.PRNGKey(0), own))
    same = jax.device_get(fixed(fresh(), batch, None, None, adv, jax.random.PRNGKey(0), own))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), same[0].params, base[0].params)
    assert base[1]["sampler_logp_abs_diff"] <= 1e-6 and same[1]["is_masked_frac"] == 0
    shifted = own + np.where(np.arange(8) % 2 == 0, 1.0, 0.05)[:, None]  # even rows: ratio e^-1 leaves the band
    drift = jax.device_get(fixed(fresh(), batch, None, None, adv, jax.random.PRNGKey(0), shifted))[1]
    real = batch["mask"] > 0
    assert drift["sampler_logp_abs_diff"] == pytest.approx(np.abs(shifted - own)[real].mean(), rel=1e-4)
    assert drift["is_masked_frac"] == pytest.approx(4 / 7, rel=1e-6)  # 7 rows with trained tokens, 4 even
    with pytest.raises(ValueError, match="sampler_logp"):
        fixed(fresh(), batch, None, None, adv, jax.random.PRNGKey(0))
