"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) and grouped-query attention (Qwen/Llama).

Dimension letters: B batch, T query length, S key length (cache slots), D model, N query heads, K kv heads,
H head dim, C kv_lora_rank (latent), R rope dim, Q q_lora_rank.

Masking is by *slots* and *segments*: a query at slot t of segment g sees keys at slots s <= t of the same
segment. Packed rows (several documents) and padding (segment 0) need no special case, and the same rule works
for the full forward pass (slots = 0..T-1) and for decoding over a cache (query slot = where it was written).

MLA has two paths over the same weights (REFERENCE.md §1):
- full: expand the latent c_kv [B,S,C] to per-head keys/values with W_kv_b, then ordinary attention;
- absorbed: fold W_kv_b's key half into the query (q_nope @ W_UK -> [B,T,N,C]) and its value half into the
  output, and attend directly over the cached latent [c_kv | k_pe] (C + R values per token), i.e. multi-query
  attention with one shared "head" of size C + R. Used whenever a cache is given (prefill and decode), as the
  official DeepSeek inference code does with attn_impl="absorb".

Both paths attend with `attend`: `dot_attention` (the [B,N,T,S] scores at once) or, when T exceeds
cfg.attn_block, `chunked_attention` (query blocks x key blocks with an online softmax, FlashAttention-2's
algorithm in pure JAX, each block rematerialised in the backward pass), which never holds more than one block's
scores: at T = S = 32k the full scores are 64 GiB per row for 16 heads. The mask travels as its ids
(q_seg, q_slot, k_seg, k_slot), so the [B,T,S] mask is never built whole either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.models.config import ModelConfig
from r1jax.models.layers import apply_rope, rms_norm
from r1jax.sharding import constrain

NEG_INF = -1e30  # finite: a row with no visible key (never a real token) gets a uniform softmax, not NaN


def make_mask(q_seg, q_slot, k_seg, k_slot):
    """[B, T, S] bool: same segment and key slot <= query slot."""
    same = q_seg[:, :, None] == k_seg[:, None, :]
    causal = k_slot[:, None, :] <= q_slot[:, :, None]
    return same & causal


def attend(q, k, v, mask_ids, scale: float, block: int):
    """Attention of q [B,T,N,H] over k [B,S,K,H], v [B,S,K,Hv] under make_mask(*mask_ids): chunked when
    block > 0 and T > block, else dot attention. -> [B,T,N,Hv]."""
    if block and q.shape[1] > block:
        return chunked_attention(q, k, v, mask_ids, scale, block)
    return dot_attention(q, k, v, make_mask(*mask_ids), scale)


def dot_attention(q, k, v, mask, scale: float):
    """softmax(q k^T * scale) v with K kv heads shared by groups of N/K query heads.

    q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv], mask [B,T,S] -> [B,T,N,Hv]. Scores and softmax in fp32.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)  # [B,T,K,G,H]
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, v.shape[-1])


def _blocks(x, n: int, fill):
    """x [B,L,...] -> [n, B, ceil(L/n), ...]: n equal blocks of the length axis, the tail padded with `fill`."""
    size = -(-x.shape[1] // n)
    pad = [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def chunked_attention(q, k, v, mask_ids, scale: float, block: int):
    """dot_attention's result without its [B,N,T,S] scores (FlashAttention-2, Dao 2023, Algorithm 1).

    q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv], mask_ids (q_seg [B,T], q_slot [B,T], k_seg [B,S], k_slot [B,S]).
    1. Cut T and S into ceil(T/block) and ceil(S/block) equal blocks (the last padded: queries are dropped,
       padded keys get segment -1, which no query has).
    2. For each query block (lax.scan), run over the key blocks (lax.scan) keeping the running max m, the
       running sum l of exp(s - m) and the output accumulator acc [.., Hv], all fp32; a key block rescales
       l and acc by exp(m_old - m_new). Key blocks no query of the block sees (causal, other segments) are
       skipped (lax.cond).
    3. out = acc / l.
    Both scan bodies are jax.checkpoint-ed: the backward pass recomputes each block's scores instead of
    saving them, so it holds the running (m, l, acc) per key block of one query block, not [B,N,T,S].
    A masked key scores NEG_INF like dot_attention's; a query that sees no key at all (never a real token:
    a token sees itself) gets 0 here where dot_attention averages every value.
    """
    b, t, n, h = q.shape
    kv, hv = k.shape[2], v.shape[-1]
    q_seg, q_slot, k_seg, k_slot = mask_ids
    nq, nk = -(-t // block), -(-k.shape[1] // block)
    q_blocks = (_blocks(q.reshape(b, t, kv, n // kv, h), nq, 0), _blocks(q_seg, nq, 0), _blocks(q_slot, nq, 0))
    k_blocks = (_blocks(k, nk, 0), _blocks(v, nk, 0), _blocks(k_seg, nk, -1), _blocks(k_slot, nk, 0))

    def query_block(_, q_block):
        qg, qs, qp = q_block  # [B,Tb,K,G,H], [B,Tb], [B,Tb]

        def key_block(carry, k_block):
            kb, vb, ks, kp = k_block  # [B,Sb,K,H], [B,Sb,K,Hv], [B,Sb], [B,Sb]
            visible = (qs[:, :, None] == ks[:, None, :]) & (kp[:, None, :] <= qp[:, :, None])  # [B,Tb,Sb]

            def update(carry):
                m, l, acc = carry  # [B,K,G,Tb] x2, [B,K,G,Tb,Hv]
                s = jnp.einsum("btkgh,bskh->bkgts", qg, kb, preferred_element_type=jnp.float32) * scale
                s = jnp.where(visible[:, None, None], s, NEG_INF)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                rescale = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
                return m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv

            return jax.lax.cond(visible.any(), update, lambda c: c, carry), None

        stats = jnp.full((b, kv, n // kv, qg.shape[1]), NEG_INF, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros(stats.shape + (hv,), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(jax.checkpoint(key_block), init, k_blocks)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B,K,G,Tb,Hv]
        return None, jnp.moveaxis(out, 3, 1).reshape(b, -1, n, hv).astype(v.dtype)

    _, out = jax.lax.scan(jax.checkpoint(query_block), None, q_blocks)  # [nq, B, Tb, N, Hv]
    return jnp.moveaxis(out, 0, 1).reshape(b, -1, n, hv)[:, :t]


def write_cache(buf, new, slots):
    """Scatter new [B,T,...] into buf [B,S,...] at per-row slots [B,T]."""
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, slots].set(new.astype(buf.dtype))


# ------------------------------------------------------------------------------------------------- MLA

def mla(p, x, cos, sin, mask_ids, cfg: ModelConfig, cache=None, slots=None):
    """MLA over x [B,T,D]. Without a cache: full path. With a cache {c_kv [B,S,C], k_pe [B,S,R]}: write the
    new latents at `slots` [B,T] and attend (absorbed) over the whole cache. Returns (out [B,T,D], cache)."""
    n, dn, dv, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        c_q = rms_norm(x @ p["wq_a"], p["q_norm"], cfg.rms_norm_eps)  # [B,T,Q]
        q = jnp.einsum("btq,qnh->btnh", c_q, p["wq_b"])  # [B,T,N,Dn+R]
    else:
        q = jnp.einsum("btd,dnh->btnh", x, p["wq"])
    q = constrain(q, ("act_batch", "act_len", "act_heads", None))
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    q_pe = apply_rope(q_pe, cos, sin, cfg.rope_interleave)

    kv_a = x @ p["wkv_a"]  # [B,T,C+R]
    c_kv = rms_norm(kv_a[..., :c], p["kv_norm"], cfg.rms_norm_eps)  # [B,T,C]
    k_pe = apply_rope(kv_a[..., None, c:], cos, sin, cfg.rope_interleave)[:, :, 0]  # [B,T,R], one shared head

    w_kv_b = p["wkv_b"]  # [C, N, Dn+Dv]
    if cache is None:
        kv = jnp.einsum("btc,cnh->btnh", c_kv, w_kv_b)  # [B,T,N,Dn+Dv]
        k_nope, v = kv[..., :dn], kv[..., dn:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], k_nope.shape[:3] + k_pe.shape[-1:])], -1)
        qf = jnp.concatenate([q_nope, q_pe], -1)
        o = attend(qf, k, v, mask_ids, cfg.softmax_scale, cfg.attn_block)  # [B,T,N,Dv]
    else:
        cache = {"c_kv": write_cache(cache["c_kv"], c_kv, slots), "k_pe": write_cache(cache["k_pe"], k_pe, slots)}
        w_uk, w_uv = w_kv_b[..., :dn], w_kv_b[..., dn:]
        q_lat = jnp.einsum("btnh,cnh->btnc", q_nope, w_uk)  # [B,T,N,C]: W_UK absorbed into the query
        q_abs = jnp.concatenate([q_lat, q_pe], -1)  # [B,T,N,C+R]
        latent = jnp.concatenate([cache["c_kv"], cache["k_pe"]], -1).astype(q_abs.dtype)[:, :, None]  # [B,S,1,C+R]
        o_lat = attend(q_abs, latent, latent[..., :c], mask_ids, cfg.softmax_scale, cfg.attn_block)  # [B,T,N,C]
        o = jnp.einsum("btnc,cnh->btnh", o_lat, w_uv)  # [B,T,N,Dv]: W_UV absorbed into the output
    o = constrain(o, ("act_batch", "act_len", "act_heads", None))
    return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache


# ------------------------------------------------------------------------------------------------- GQA

def gqa(p, x, cos, sin, mask_ids, cfg: ModelConfig, cache=None, slots=None):
    """Grouped-query attention over x [B,T,D]; cache {k, v} [B,S,K,H] per KV head. Returns (out, cache)."""
    q = jnp.einsum("btd,dnh->btnh", x, p["wq"])
    k = jnp.einsum("btd,dkh->btkh", x, p["wk"])
    v = jnp.einsum("btd,dkh->btkh", x, p["wv"])
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = constrain(q, ("act_batch", "act_len", "act_heads", None))
    q = apply_rope(q, cos, sin, cfg.rope_interleave)
    k = apply_rope(k, cos, sin, cfg.rope_interleave)
    if cache is not None:
        cache = {"k": write_cache(cache["k"], k, slots), "v": write_cache(cache["v"], v, slots)}
        k, v = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
    o = attend(q, k, v, mask_ids, cfg.softmax_scale, cfg.attn_block)
    return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache


def attention(p, x, cos, sin, mask_ids, cfg: ModelConfig, cache=None, slots=None):
    """mask_ids: (q_seg [B,T], q_slot [B,T], k_seg [B,S], k_slot [B,S]), see make_mask."""
    fn = mla if cfg.attention == "mla" else gqa
    return fn(p, x, cos, sin, mask_ids, cfg, cache, slots)


def empty_layer_cache(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype):
    """Per-layer cache arrays stacked on a leading layer axis."""
    if cfg.attention == "mla":
        return {"c_kv": jnp.zeros((n_layers, batch, max_len, cfg.kv_lora_rank), dtype),
                "k_pe": jnp.zeros((n_layers, batch, max_len, cfg.qk_rope_head_dim), dtype)}
    shape = (n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
