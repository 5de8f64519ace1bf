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


def write_cache(buf, new, slots):
    """Scatter new [B,T,...] into buf [B,S,...] at per-row slots [B,T]."""
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, slots].set(new.astype(buf.dtype))


# ------------------------------------------------------------------------------------------------- MLA

def mla(p, x, cos, sin, mask, cfg: ModelConfig, cache=None, slots=None):
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
        o = dot_attention(qf, k, v, mask, cfg.softmax_scale)  # [B,T,N,Dv]
    else:
        cache = {"c_kv": write_cache(cache["c_kv"], c_kv, slots), "k_pe": write_cache(cache["k_pe"], k_pe, slots)}
        w_uk, w_uv = w_kv_b[..., :dn], w_kv_b[..., dn:]
        q_lat = jnp.einsum("btnh,cnh->btnc", q_nope, w_uk)  # [B,T,N,C]: W_UK absorbed into the query
        q_abs = jnp.concatenate([q_lat, q_pe], -1)  # [B,T,N,C+R]
        latent = jnp.concatenate([cache["c_kv"], cache["k_pe"]], -1).astype(q_abs.dtype)[:, :, None]  # [B,S,1,C+R]
        o_lat = dot_attention(q_abs, latent, latent[..., :c], mask, cfg.softmax_scale)  # [B,T,N,C]
        o = jnp.einsum("btnc,cnh->btnh", o_lat, w_uv)  # [B,T,N,Dv]: W_UV absorbed into the output
    o = constrain(o, ("act_batch", "act_len", "act_heads", None))
    return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache


# ------------------------------------------------------------------------------------------------- GQA

def gqa(p, x, cos, sin, mask, cfg: ModelConfig, cache=None, slots=None):
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
    o = dot_attention(q, k, v, mask, cfg.softmax_scale)
    return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache


def attention(p, x, cos, sin, mask, cfg: ModelConfig, cache=None, slots=None):
    fn = mla if cfg.attention == "mla" else gqa
    return fn(p, x, cos, sin, mask, cfg, cache, slots)


def empty_layer_cache(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype):
    """Per-layer cache arrays stacked on a leading layer axis."""
    if cfg.attention == "mla":
        return {"c_kv": jnp.zeros((n_layers, batch, max_len, cfg.kv_lora_rank), dtype),
                "k_pe": jnp.zeros((n_layers, batch, max_len, cfg.qk_rope_head_dim), dtype)}
    shape = (n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
