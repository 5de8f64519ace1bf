"""Model tests on tiny configs: cached decoding == full forward, routing by hand, dropless dispatch, MTP, counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import models as M
from r1jax.models import moe as moe_lib

jax.config.update("jax_default_matmul_precision", "highest")


@functools.lru_cache(maxsize=None)
def _setup(name):
    cfg = M.get_preset(name, mtp_depth=0)
    params = M.init(cfg, jax.random.PRNGKey(0))
    fwd = jax.jit(lambda p, t, pos, seg: M.forward(p, t, cfg, positions=pos, segment_ids=seg)[0])
    pre = jax.jit(lambda p, t, seg, c: M.prefill(p, t, cfg, c, segment_ids=seg))
    dec = jax.jit(lambda p, t, c: M.decode_step(p, t, cfg, c))
    return cfg, params, fwd, pre, dec


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_dense"])
def test_cached_decode_matches_forward_padded(name):
    """Right-padded prompts of different lengths, then one token at a time == full forward on each sequence."""
    cfg, params, fwd, pre, dec = _setup(name)
    rng = np.random.default_rng(0)
    b, t_prompt, n_new, s = 3, 7, 5, 16
    lengths = np.array([7, 4, 2])
    seqs = rng.integers(0, cfg.vocab_size, (b, t_prompt + n_new))
    prompt = np.zeros((b, t_prompt), np.int32)
    seg = np.zeros((b, t_prompt), np.int32)
    for i, n in enumerate(lengths):
        prompt[i, :n] = seqs[i, :n]
        seg[i, :n] = 1
    cache = M.init_cache(cfg, b, s)
    logits_p, cache = pre(params, jnp.asarray(prompt), jnp.asarray(seg), cache)
    got = {i: [np.asarray(logits_p[i, : lengths[i]])] for i in range(b)}
    for step in range(n_new):
        tok = np.array([seqs[i, lengths[i] + step] for i in range(b)], np.int32)
        logit, cache = dec(params, jnp.asarray(tok), cache)
        for i in range(b):
            got[i].append(np.asarray(logit[i])[None])
    for i in range(b):
        n = lengths[i] + n_new
        full = fwd(params, jnp.asarray(seqs[i : i + 1, :n]), None, None)[0]
        np.testing.assert_allclose(np.concatenate(got[i]), np.asarray(full), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_dense"])
def test_chunked_prefill_matches_dot_prefill(name):
    """A prefill longer than attn_block runs chunked attention over the cache (for MLA: the absorbed query and
    key in two parts): same logits as the unchunked prefill."""
    outs = []
    for block in (0, 4):
        cfg = M.get_preset(name, mtp_depth=0, n_layers=2, n_dense_layers=1 if name == "tiny_moe" else 2,
                           attn_block=block)
        params = M.init(cfg, jax.random.PRNGKey(0))
        tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
        seg = jnp.asarray(np.array([[1] * 11, [1] * 6 + [0] * 5]), jnp.int32)
        logits, _ = M.prefill(params, tokens, cfg, M.init_cache(cfg, 2, 16), segment_ids=seg)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(outs[1][1, :6], outs[0][1, :6], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_dense"])
def test_cached_decode_matches_forward_packed(name):
    """A packed prompt row (two documents): prefill logits equal the forward of each document alone, and
    decoding continues the last document without seeing the first."""
    cfg, params, fwd, pre, dec = _setup(name)
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, cfg.vocab_size, 5), rng.integers(0, cfg.vocab_size, 9)
    row = np.concatenate([doc_a, doc_b[:6]])[None].astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 6], np.int32)
    cache = M.init_cache(cfg, 1, 16)
    logits_p, cache = pre(params, jnp.asarray(row), jnp.asarray(seg), cache)
    steps = [np.asarray(logits_p[0, 5:])]
    for tok in doc_b[6:]:
        logit, cache = dec(params, jnp.asarray([tok], jnp.int32), cache)
        steps.append(np.asarray(logit))
    full_b = fwd(params, jnp.asarray(doc_b[None]), None, None)[0]
    full_a = fwd(params, jnp.asarray(doc_a[None]), None, None)[0]
    np.testing.assert_allclose(np.concatenate(steps), np.asarray(full_b), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits_p[0, :5]), np.asarray(full_a), atol=1e-5, rtol=0)


def test_packed_forward_equals_separate():
    cfg, params, fwd, _, _ = _setup("tiny_moe")
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, cfg.vocab_size, 6), rng.integers(0, cfg.vocab_size, 8)
    row = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    seg = jnp.asarray([[1] * 6 + [2] * 8], jnp.int32)
    packed = fwd(params, row, None, seg)[0]
    np.testing.assert_allclose(packed[:6], fwd(params, jnp.asarray(a[None]), None, None)[0], atol=1e-5)
    np.testing.assert_allclose(packed[6:], fwd(params, jnp.asarray(b[None]), None, None)[0], atol=1e-5)


def test_chunked_attention_equals_dot_attention():
    """Values and gradients of the chunked (flash) attention == dot attention (fp32), for a packed + padded
    forward (GQA: 4 query heads over 2 kv heads, qk head dim 6 != v head dim 4, T = S = 11 in blocks of 4: the
    last block padded) and a cache-style call (MQA, T = 5 queries at slots 3..7 over S = 13 slots, 2 of them
    empty), where the block skipping (lax.cond) and the padded keys matter."""
    from r1jax.models.attention import attend

    def loss(q, k, v, ids, block):
        out = attend(q, k, v, ids, 0.4, block)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))), out

    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=4)
    rng = np.random.default_rng(3)
    seg = jnp.asarray([[1] * 4 + [2] * 5 + [0] * 2, [1] * 9 + [0] * 2], jnp.int32)  # packed; padding = segment 0
    slot = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11))
    k_seg = jnp.asarray([[1] * 8 + [0] * 5, [1, 1, 2, 0, 2, 2, 2, 2, 0, 0, 0, 0, 0]], jnp.int32)  # 0 = empty slot
    cases = [((2, 11, 4, 6), (2, 11, 2, 6), (2, 11, 2, 4), (seg, slot, seg, slot)),
             ((2, 5, 4, 6), (2, 13, 1, 6), (2, 13, 1, 4),
              (jnp.asarray([[1] * 5, [2] * 5], jnp.int32), slot[:, 3:8], k_seg,
               jnp.broadcast_to(jnp.arange(13, dtype=jnp.int32), (2, 13))))]
    for q_shape, k_shape, v_shape, ids in cases:
        q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (q_shape, k_shape, v_shape))
        (_, want), want_grads = grads(q, k, v, ids, 0)
        (_, got), got_grads = grads(q, k, v, ids, 4)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_chunked_attention_and_logits_in_the_model():
    """tiny_moe (MLA) with attn_block=4 and logits_chunk=5 on packed rows of 14 tokens: the log-probs and
    entropies of token_logprobs and their parameter gradients equal the unchunked model's, whose log-probs
    are log_softmax of forward's logits."""
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, 512, (2, 14)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    seg = jnp.asarray([[1] * 6 + [2] * 8, [1] * 11 + [0] * 3], jnp.int32)

    def loss(params, chunked):
        cfg = M.get_preset("tiny_moe", mtp_depth=0, n_layers=2, attn_block=4 * chunked, logits_chunk=5 * chunked)
        h, _ = M.hidden_states(params, tokens, cfg, segment_ids=seg)
        logp, entropy = M.token_logprobs(params, h, targets, cfg, temperature=0.7, with_entropy=True)
        return jnp.mean(logp) + 0.1 * jnp.mean(entropy), (logp, entropy)

    cfg = M.get_preset("tiny_moe", mtp_depth=0, n_layers=2)
    params = M.init(cfg, jax.random.PRNGKey(0))
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, want), want_grads = grad_fn(params, False)
    (_, got), got_grads = grad_fn(params, True)
    logits = jax.jit(lambda p: M.forward(p, tokens, cfg, segment_ids=seg)[0])(params)
    logp_all = jax.nn.log_softmax(logits / 0.7)
    np.testing.assert_allclose(want[0], jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(want[1], -jnp.sum(jnp.exp(logp_all) * logp_all, -1), atol=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=0), got_grads, want_grads)


def test_mla_cache_is_latent():
    cfg = M.get_preset("tiny_moe")
    cache = M.init_cache(cfg, 2, 8)
    per_token = sum(v.shape[-1] for v in cache["moe"].values())
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim == cfg.cache_values_per_token
    assert set(cache["moe"]) == {"c_kv", "k_pe"}
    assert M.get_preset("deepseek_v3_671b").cache_values_per_token == 576


# ------------------------------------------------------------------------------------------------ routing

def _route_cfg(**kw):
    base = dict(n_routed_experts=8, n_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=1.0,
                norm_topk_prob=True)
    base.update(kw)
    return M.get_preset("tiny_moe", **base)


def _route_from_scores(scores, bias, cfg):
    """Feed chosen sigmoid scores s by making x @ W = logit(s) with an identity router."""
    logits = np.log(scores) - np.log1p(-scores)
    return moe_lib.route(jnp.asarray(logits, jnp.float32), jnp.eye(scores.shape[1]), jnp.asarray(bias, jnp.float32), cfg)


def test_group_limited_routing_masks_groups():
    cfg = _route_cfg()
    # groups of 2: g0=[.90,.10] top2 sum 1.0, g1=[.55,.50]=1.05, g2=[.80,.05]=.85, g3=[.30,.30]=.6
    s = np.array([[0.90, 0.10, 0.55, 0.50, 0.80, 0.05, 0.30, 0.30]])
    w, idx, _ = _route_from_scores(s, np.zeros(8), cfg)
    # Kept groups: g1 (1.05) and g0 (1.0). Expert 4 (0.80) is in dropped g2 although its score beats 2 and 3.
    assert sorted(np.asarray(idx[0]).tolist()) == [0, 2]
    np.testing.assert_allclose(np.sort(np.asarray(w[0])), np.sort([0.90 / 1.45, 0.55 / 1.45]), rtol=1e-6)


def test_bias_changes_selection_not_weights_and_scaling():
    cfg = _route_cfg(n_group=1, topk_group=1, routed_scaling_factor=2.5)
    s = np.array([[0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1]])
    _, idx0, _ = _route_from_scores(s, np.zeros(8), cfg)
    assert sorted(np.asarray(idx0[0]).tolist()) == [0, 1]
    bias = np.zeros(8)
    bias[2] = 0.5  # expert 2 now selected over expert 1 ...
    w, idx, _ = _route_from_scores(s, bias, cfg)
    assert sorted(np.asarray(idx[0]).tolist()) == [0, 2]
    # ... but its weight uses the unbiased score, normalised, times the scaling factor.
    got = dict(zip(np.asarray(idx[0]).tolist(), np.asarray(w[0]).tolist()))
    np.testing.assert_allclose(got[2], 2.5 * 0.7 / 1.6, rtol=1e-6)
    np.testing.assert_allclose(got[0], 2.5 * 0.9 / 1.6, rtol=1e-6)


def test_bias_update_direction():
    load = jnp.array([[0.5, 0.25, 0.125, 0.125]])
    new = moe_lib.update_router_bias(jnp.zeros((1, 4)), load, 0.01)
    np.testing.assert_allclose(np.asarray(new), [[-0.01, 0.0, 0.01, 0.01]])
    cfg = M.get_preset("tiny_moe")
    params = M.init(cfg, jax.random.PRNGKey(0))
    load = jnp.zeros((cfg.n_moe_layers, cfg.n_routed_experts)).at[:, 0].set(1.0)
    p2 = M.update_router_bias(params, load, 0.001)
    b = np.asarray(p2["moe"]["mlp"]["router_bias"])
    assert (b[:, 0] < 0).all() and (b[:, 1:] > 0).all()
    assert M.update_router_bias(params, load, 0.0) is params


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled", "tiled_from_memory"])
def test_dropless_dispatch_equals_dense_reference(impl, monkeypatch):
    if impl == "tiled_from_memory":  # weights past L2: tiles of up to twice the balanced load (16 > 74 rows / 5)
        monkeypatch.setattr(moe_lib, "L2_BYTES", 0)
        assert moe_lib._tile_size(74, 5, 16, weight_bytes=1) == 16
        impl = "tiled"
    rng = np.random.default_rng(3)
    m, d, f, e, k = 37, 8, 6, 5, 2
    x = rng.normal(size=(m, d)).astype(np.float32)
    wg, wu, wd = (rng.normal(size=s).astype(np.float32) for s in [(e, d, f), (e, d, f), (e, f, d)])
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(m)]).astype(np.int32)
    w = rng.random((m, k)).astype(np.float32)
    tile = 16 if moe_lib.L2_BYTES == 0 else 4
    got = moe_lib.dispatch(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), wg, wu, wd, impl, max_tile=tile)
    ref = np.zeros((m, d), np.float32)
    for t in range(m):
        for j in range(k):
            ex = idx[t, j]
            h = x[t] @ wg[ex]
            h = h / (1 + np.exp(-h)) * (x[t] @ wu[ex])
            ref[t] += w[t, j] * (h @ wd[ex])
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)
    # Gradients flow through ragged_dot to the expert weights and the routing weights.
    def loss(wg_, w_):
        return (moe_lib.dispatch(jnp.asarray(x), jnp.asarray(idx), w_, wg_, wu, wd, impl, max_tile=tile) ** 2).sum()

    def loss_ref(wg_, w_):
        return (moe_lib.dispatch(jnp.asarray(x), jnp.asarray(idx), w_, wg_, wu, wd, "ragged_dot") ** 2).sum()

    g = jax.grad(loss, argnums=(0, 1))(jnp.asarray(wg), jnp.asarray(w))
    g_ref = jax.grad(loss_ref, argnums=(0, 1))(jnp.asarray(wg), jnp.asarray(w))
    for a, r in zip(g, g_ref):
        assert np.abs(np.asarray(a)).sum() > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_tile_size_amortises_weights_read_from_memory():
    """Cache-resident expert weights: sqrt(16 P / E) capped at the balanced load; weights from memory: sqrt(256 P / E)
    capped at twice the balanced load (the 100m bench layer: 512 tokens x top-6 over 32 experts of 768 x 256)."""
    small, big = 3 * 128 * 64 * 4, 3 * 768 * 256 * 4
    assert moe_lib._tile_size(8192 * 8, 256, 128, small) == 64  # the flatness bench at E = 256, as measured
    assert moe_lib._tile_size(512 * 6, 32, 128, small) == 32
    assert moe_lib._tile_size(512 * 6, 32, 128, big) == 128
    assert moe_lib._tile_size(64 * 2, 8, 128, big) == 32  # few rows: at most twice the balanced load


def test_dispatch_flops_scale_with_activated_experts():
    """The compiled MoE cost on this backend must not grow with the total expert count at fixed top-k."""
    def flops(e):
        m, d, f, k = 256, 32, 16, 2
        args = (jax.ShapeDtypeStruct((m, d), jnp.float32), jax.ShapeDtypeStruct((m, k), jnp.int32),
                jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((e, d, f), jnp.float32),
                jax.ShapeDtypeStruct((e, d, f), jnp.float32), jax.ShapeDtypeStruct((e, f, d), jnp.float32))
        cost = jax.jit(moe_lib.dispatch).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return cost["flops"]

    f8, f256 = flops(8), flops(256)
    assert f256 < 1.5 * f8, (f8, f256)


def test_forward_reports_load_and_balance_loss():
    cfg = M.get_preset("tiny_moe", aux_loss_alpha=0.01)
    params = M.init(cfg, jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    seg = jnp.ones((2, 16), jnp.int32).at[1, 10:].set(0)  # padding is excluded from the load statistics

    def mtp_sum(p):
        logits, aux = M.forward(p, toks, cfg, segment_ids=seg)
        return aux["mtp_logits"].sum(), (logits, aux)

    # one compiled program (eager op-by-op dispatch took ~4x longer): the forward's outputs and MTP's gradient
    (_, (logits, aux)), g = jax.jit(jax.value_and_grad(mtp_sum, has_aux=True))(params)
    assert aux["expert_load"].shape == (cfg.n_moe_layers, cfg.n_routed_experts)
    np.testing.assert_allclose(np.asarray(aux["expert_load"].sum(-1)), 1.0, rtol=1e-5)
    assert float(aux["aux_loss"]) > 0
    assert aux["mtp_logits"].shape == logits.shape
    # MTP gets gradients (it is a trained module, not dead weight).
    assert float(jnp.abs(g["mtp"]["eh_proj"]).sum()) > 0


def test_param_counts_671b():
    c = M.count_params(M.get_preset("deepseek_v3_671b"))
    assert abs(c["total"] - 671e9) / 671e9 < 0.01, c
    assert 36e9 < c["activated"] < 38.5e9, c
    assert c["mtp"] > 0
    abstract = M.abstract_params(M.get_preset("deepseek_v3_671b"))
    assert abstract["moe"]["mlp"]["w_gate"].shape == (58, 256, 7168, 2048)


def test_trainable_mask_excludes_router_bias():
    cfg = M.get_preset("tiny_moe")
    mask = M.trainable_mask(M.init(cfg, jax.random.PRNGKey(0)))
    assert mask["moe"]["mlp"]["router_bias"] is False
    assert mask["moe"]["mlp"]["router"] is True and mask["embed"] is True


def test_config_validation_errors():
    with pytest.raises(ValueError, match="n_group"):
        M.get_preset("tiny_moe", n_group=3)
    with pytest.raises(KeyError, match="unknown model preset"):
        M.get_preset("gpt5")
    with pytest.raises(KeyError, match="unknown ModelConfig field"):
        M.get_preset("tiny_moe", n_layer=3)


def test_yarn_and_llama3_frequencies():
    from r1jax.models.layers import rope_inv_freq

    base = M.get_preset("tiny_dense", head_dim=32, rope_theta=10000.0)
    f0, s0 = rope_inv_freq(base)
    y, sy = rope_inv_freq(base.replace(rope_kind="yarn", rope_factor=4.0, rope_original_max_pos=64,
                                       rope_mscale=1.0, rope_mscale_all_dim=0.0))
    assert s0 == 1.0 and sy == pytest.approx(0.1 * np.log(4.0) + 1)
    np.testing.assert_allclose(y[0], f0[0])  # highest frequency extrapolated (kept)
    np.testing.assert_allclose(y[-1], f0[-1] / 4.0)  # lowest frequency interpolated (/factor)
    l3, _ = rope_inv_freq(base.replace(rope_kind="llama3", rope_factor=8.0, rope_original_max_pos=64))
    np.testing.assert_allclose(l3[0], f0[0])
    np.testing.assert_allclose(l3[-1], f0[-1] / 8.0)


def test_compiled_program_does_not_grow_with_depth():
    """Scan over layers: the 61-layer model's optimized train and decode programs are the size of the 4-layer
    ones (compile *times* are measured by `python -m r1jax.bench.compile`, recorded in docs/performance.md)."""
    from r1jax.bench.compile import compile_stats, depth_config

    shallow = compile_stats(depth_config("tiny_moe", 4), seq=16)
    deep = compile_stats(depth_config("tiny_moe", 61), seq=16)
    assert deep["train_hlo_lines"] <= 1.05 * shallow["train_hlo_lines"], (shallow, deep)
    assert deep["decode_hlo_lines"] <= 1.05 * shallow["decode_hlo_lines"], (shallow, deep)
