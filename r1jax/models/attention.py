"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) and grouped-query attention (Qwen/Llama).

Dimension letters: B batch, T query length, S key length (cache slots), D model, N query heads, K kv heads,
H head dim, C kv_lora_rank (latent), R rope dim, Q q_lora_rank.

Masking is by *slots* and *segments*: a query at slot t of segment g sees keys at slots s <= t of the same
segment. Packed rows (several documents) and padding (segment 0) need no special case, and the same rule works
for the full forward pass (slots = 0..T-1) and for decoding over a cache (query slot = where it was written).

MLA has two paths over the same weights (docs/reference.md §1):
- full: expand the latent c_kv [B,S,C] to per-head keys/values with W_kv_b, then ordinary attention;
- absorbed: fold W_kv_b's key half into the query (q_nope @ W_UK -> [B,T,N,C]) and its value half into the
  output, and attend directly over the cached latent [c_kv | k_pe] (C + R values per token), i.e. multi-query
  attention with one shared "head" of size C + R. Used whenever a cache is given (prefill and decode), as the
  official DeepSeek inference code does with attn_impl="absorb". The key is passed in its two parts
  (q_lat . c_kv + q_pe . k_pe), so the cache is never concatenated.

The decode cache is stacked over layers [L,B,S,...] and is the layer scan's carry (transformer._scan_blocks):
each layer writes its new entries into its own slice in place (`update_layer_cache`), so a decode step writes
B x T entries per layer instead of copying whole cache buffers.

A decode over a cache (T <= cfg.decode_block queries per row, the cache longer than one block) attends with
`blocked_cache_attention` instead: a lax.while_loop over key blocks of cfg.decode_block positions read straight
from the stacked cache (dynamic slices of one layer), with the online softmax, for only as many blocks as the
farthest query of the batch can see (max query slot + 1). A chunk whose rows are all short does not read the
empty tail of the cache; a block past a row's own length is fully masked and leaves its (m, l, acc) bit for bit
unchanged, so the result does not depend on the other rows of the batch.

Without a cache, both paths attend with `attend`: `dot_attention` (the [B,N,T,S] scores at once) or, when T exceeds
cfg.attn_block, `chunked_attention` (query blocks x key blocks with an online softmax, FlashAttention-2's
algorithm in pure JAX, each block rematerialised in the backward pass), which never holds more than one block's
scores: at T = S = 32k the full scores are 64 GiB per row for 16 heads. The mask travels as its ids
(q_seg, q_slot, k_seg, k_slot), so the [B,T,S] mask is never built whole either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from r1jax.models.config import ModelConfig
from r1jax.models.layers import apply_rope, rms_norm
from r1jax.sharding import constrain

# Queries per block of `causal_dot_attention` (the full forward): smaller blocks skip more of the masked
# half of the scores but run smaller matmuls; 64 measured fastest for the tiny models on CPU (T = 128, 256).
CAUSAL_BLOCK = 64
# At most this many query blocks (the blocks are unrolled in the program: long sequences without attn_block get
# longer blocks rather than a program that grows with T).
MAX_CAUSAL_BLOCKS = 16
# checkpoint_name of what dot attention's backward reads besides its inputs (output and log-sum-exp, both small).
SAVED_NAMES = ("attention_out", "attention_lse")
NEG_INF = -1e30  # finite: a row with no visible key (never a real token) gets a uniform softmax, not NaN


def make_mask(q_seg, q_slot, k_seg, k_slot):
    """[B, T, S] bool: same segment and key slot <= query slot."""
    same = q_seg[:, :, None] == k_seg[:, None, :]
    causal = k_slot[:, None, :] <= q_slot[:, :, None]
    return same & causal


def attend(q, k, v, mask_ids, scale: float, block: int, in_order: bool = False):
    """Attention of q [B,T,N,H] over k [B,S,K,H], v [B,S,K,Hv] under make_mask(*mask_ids): chunked when
    block > 0 and T > block, else dot attention. -> [B,T,N,Hv].

    q and k may also be equal-length tuples of parts (q_i [B,T,N,H_i], k_i [B,S,K,H_i]) whose dot products add
    up to the score: MLA's absorbed path attends over its latent and rope caches without concatenating them.

    in_order: the queries are the keys, at slots 0..T-1 (the full forward without a cache), so no query sees a
    key past its own slot and `causal_dot_attention` skips the key blocks above the diagonal."""
    if block and _parts(q)[0].shape[1] > block:
        return chunked_attention(q, k, v, mask_ids, scale, block)
    if in_order:
        return causal_dot_attention(q, k, v, make_mask(*mask_ids), scale)
    return dot_attention(q, k, v, make_mask(*mask_ids), scale)


def _parts(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _grouped(q, kv: int) -> tuple:
    """Query parts [B,T,N,H_i] -> [B,T,K,G,H_i]: K kv heads, each shared by G = N/K query heads."""
    return tuple(x.reshape(*x.shape[:2], kv, x.shape[2] // kv, x.shape[3]) for x in _parts(q))


def _scores(qg, k) -> jax.Array:
    """chunked_attention's block scores, sum_i q_i k_i^T over the parts: qg parts [B,T,K,G,H_i], k parts
    [B,S,K,H_i] -> [B,K,G,T,S] fp32."""
    return sum(jnp.einsum("btkgh,bskh->bkgts", qi, ki, preferred_element_type=jnp.float32)
               for qi, ki in zip(qg, _parts(k)))


def dot_attention(q, k, v, mask, scale: float):
    """softmax(q k^T * scale) v with K kv heads shared by groups of N/K query heads.

    q [B,T,N,H], k [B,S,K,H] (or tuples of parts, see `attend`), v [B,S,K,Hv], mask [B,T,S] -> [B,T,N,Hv].
    Scores and softmax in fp32. Both products are batched matmuls over (B, K) with the G*T queries of a KV head
    as the rows ([B,K,G*T,H] x [B,K,S,H]): with K = 1 (the MLA latent) or a heads-major cache the keys and
    values enter XLA:CPU's matmuls as they are stored, where a [B,T,K,G,H] x [B,S,K,H] einsum copied (and
    transposed) the whole cache of every layer at every decode step.

    The gradient is written by hand (`_dot_attention_bwd`, FlashAttention-2's backward without the blocks): the
    forward saves its inputs, output and the log-sum-exp [B,K,G,T] of the scores, never the [B,K,G,T,S]
    probabilities, and the backward recomputes them with one matmul. Under the layer scan, autodiff's residual
    probabilities were stacked over layers ([L,B,N,T,S], zero-filled, written and read back every step): in
    the tiny pretraining step that bookkeeping cost more than the recomputing matmul.
    """
    return _dot_attention(_parts(q), _parts(k), v, mask, scale)


def causal_dot_attention(q, k, v, mask, scale: float):
    """dot_attention for queries that are the keys, at slots 0..T-1 (T = S): query block [a, b) attends over
    keys [0, b) only, in blocks of about CAUSAL_BLOCK queries. The skipped scores are masked anyway (key slot >
    query slot), so the result is dot_attention's (at most MAX_CAUSAL_BLOCKS blocks); with 4 blocks the score
    matmuls and softmax work shrink to 10/16 of the square."""
    t = v.shape[1]
    if _parts(q)[0].shape[1] != t:
        raise ValueError(f"causal_dot_attention: {_parts(q)[0].shape[1]} queries over {t} keys; needs T = S")
    n = min(max(1, t // CAUSAL_BLOCK), MAX_CAUSAL_BLOCKS)
    edges = [t * i // n for i in range(n + 1)]
    cut = lambda x, a, b: tuple(p[:, a:b] for p in _parts(x))  # noqa: E731
    outs = [_dot_attention(cut(q, a, b), cut(k, 0, b), v[:, :b], mask[:, a:b, :b], scale)
            for a, b in zip(edges[:-1], edges[1:])]
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def _layout(qs, v):
    """(rows, heads, back) for query parts [B,T,N,H_i] and v [B,S,K,Hv]: rows [B,T,N,H] -> [B,K,G*T,H],
    heads [B,S,K,H] -> [B,K,S,H] and back [B,K,G*T,H] -> [B,T,N,H] (rows' inverse)."""
    b, t, n = qs[0].shape[:3]
    kv = v.shape[2]
    g = n // kv
    rows = lambda x: x.reshape(b, t, kv, g, -1).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, -1)  # noqa: E731
    heads = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    back = lambda x: x.reshape(b, kv, g, t, -1).transpose(0, 3, 1, 2, 4).reshape(b, t, n, -1)  # noqa: E731
    return rows, heads, back


def _masked_scores(qs, ks, mask, scale: float, rows, heads):
    """scale * sum_i q_i k_i^T, NEG_INF where masked: [B,K,G,T,S] fp32."""
    scores = sum(jnp.einsum("bkqh,bksh->bkqs", rows(qi), heads(ki), preferred_element_type=jnp.float32)
                 for qi, ki in zip(qs, ks))  # [B,K,G*T,S]
    b, kv, _, s = scores.shape
    scores = scores.reshape(b, kv, -1, mask.shape[1], s) * scale
    return jnp.where(mask[:, None, None], scores, NEG_INF)


def _dot_attention_fwd(qs, ks, v, mask, scale: float):
    rows, heads, back = _layout(qs, v)
    scores = _masked_scores(qs, ks, mask, scale, rows, heads)
    m = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = (e / total).astype(v.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs.reshape(*probs.shape[:2], -1, probs.shape[-1]), heads(v))
    # Named so that the remat policies keep them (transformer._REMAT): then the backward needs nothing of the
    # forward's [B,K,G,T,S] work, where a dots policy would save the score matmul and redo the softmax.
    out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(m + jnp.log(total), "attention_lse")
    return back(out), (qs, ks, v, mask, out, lse)


def _dot_attention_bwd(scale: float, res, d_out):
    """dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o O)) (masked), dQ_i = dS K_i, dK_i = dS^T Q_i."""
    qs, ks, v, mask, out, lse = res
    rows, heads, back = _layout(qs, v)
    probs = jnp.exp(_masked_scores(qs, ks, mask, scale, rows, heads) - lse)  # [B,K,G,T,S]
    flat = lambda x: x.reshape(*x.shape[:2], -1, x.shape[-1])  # noqa: E731  [B,K,G,T,S] -> [B,K,G*T,S]
    d_rows = rows(d_out)  # [B,K,G*T,Hv]
    dv = jnp.einsum("bkqs,bkqh->bksh", flat(probs).astype(v.dtype), d_rows.astype(v.dtype))
    dp = jnp.einsum("bkqh,bksh->bkqs", d_rows, heads(v), preferred_element_type=jnp.float32)
    delta = jnp.sum(d_rows.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,K,G*T]
    ds = probs * (dp.reshape(probs.shape) - delta.reshape(probs.shape[:-1])[..., None]) * scale
    ds = flat(jnp.where(mask[:, None, None], ds, 0.0))  # a query that sees no key passes no gradient to scores
    dqs = tuple(back(jnp.einsum("bkqs,bksh->bkqh", ds.astype(qi.dtype), heads(ki))) for qi, ki in zip(qs, ks))
    dks = tuple(heads(jnp.einsum("bkqs,bkqh->bksh", ds.astype(ki.dtype), rows(qi))) for qi, ki in zip(qs, ks))
    return dqs, dks, heads(dv), None


_dot_attention = jax.custom_vjp(lambda qs, ks, v, mask, scale: _dot_attention_fwd(qs, ks, v, mask, scale)[0],
                                nondiff_argnums=(4,))
_dot_attention.defvjp(_dot_attention_fwd, _dot_attention_bwd)


def _blocks(x, n: int, fill):
    """x [B,L,...] -> [n, B, ceil(L/n), ...]: n equal blocks of the length axis, the tail padded with `fill`."""
    size = -(-x.shape[1] // n)
    pad = [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def chunked_attention(q, k, v, mask_ids, scale: float, block: int):
    """dot_attention's result without its [B,N,T,S] scores (FlashAttention-2, Dao 2023, Algorithm 1).

    q [B,T,N,H], k [B,S,K,H] (or tuples of parts, see `attend`), v [B,S,K,Hv], mask_ids (q_seg [B,T],
    q_slot [B,T], k_seg [B,S], k_slot [B,S]).
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
    b, t, n = _parts(q)[0].shape[:3]
    kv, hv = v.shape[2], v.shape[-1]
    q_seg, q_slot, k_seg, k_slot = mask_ids
    nq, nk = -(-t // block), -(-v.shape[1] // block)
    q_blocks = (tuple(_blocks(x, nq, 0) for x in _grouped(q, kv)), _blocks(q_seg, nq, 0), _blocks(q_slot, nq, 0))
    k_blocks = (tuple(_blocks(x, nk, 0) for x in _parts(k)), _blocks(v, nk, 0), _blocks(k_seg, nk, -1),
                _blocks(k_slot, nk, 0))

    def query_block(_, q_block):
        qg, qs, qp = q_block  # parts [B,Tb,K,G,H_i], [B,Tb], [B,Tb]

        def key_block(carry, k_block):
            kb, vb, ks, kp = k_block  # parts [B,Sb,K,H_i], [B,Sb,K,Hv], [B,Sb], [B,Sb]
            visible = (qs[:, :, None] == ks[:, None, :]) & (kp[:, None, :] <= qp[:, :, None])  # [B,Tb,Sb]

            def update(carry):
                m, l, acc = carry  # [B,K,G,Tb] x2, [B,K,G,Tb,Hv]
                s = _scores(qg, kb) * scale
                s = jnp.where(visible[:, None, None], s, NEG_INF)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                rescale = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
                return m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv

            return jax.lax.cond(visible.any(), update, lambda c: c, carry), None

        stats = jnp.full((b, kv, n // kv, qg[0].shape[1]), NEG_INF, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros(stats.shape + (hv,), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(jax.checkpoint(key_block), init, k_blocks)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B,K,G,Tb,Hv]
        return None, jnp.moveaxis(out, 3, 1).reshape(b, -1, n, hv).astype(v.dtype)

    _, out = jax.lax.scan(jax.checkpoint(query_block), None, q_blocks)  # [nq, B, Tb, N, Hv]
    return jnp.moveaxis(out, 0, 1).reshape(b, -1, n, hv)[:, :t]


def blocked_cache_attention(q, read, n_keys: int, kv: int, mask_ids, scale: float, block: int):
    """dot_attention's result for queries q [B,T,N,H] (or parts, see `attend`) over a cache of n_keys positions
    read one block at a time, only as far as the farthest query of the batch sees (flash decoding).

    read(start, size) -> (key parts [B,K,size,H_i], values [B,K,size,Hv]): cache positions start..start+size-1,
    heads-major (K = kv). mask_ids as `attend`; the key slot of a cache position is the position itself.
    1. n = ceil((max q_slot + 1) / block) blocks (at most ceil(n_keys / block)): a lax.fori_loop whose trip
       count is known only at run time, so short rows skip the empty tail of the cache.
    2. Each block updates the running max m, sum l and accumulator acc in fp32 (chunked_attention's online
       softmax). Block i starts at min(i * block, n_keys - block) (the last block is shifted back to stay in
       the cache) and masks the positions below i * block that the previous block covered.
    A block past a query's own slot is all NEG_INF: m stays, p = exp(NEG_INF - m) = 0 and the rescale is
    exp(0) = 1, so (m, l, acc) pass through bit for bit: a row's result does not depend on how many blocks the
    batch's farthest row needed. Needs block <= n_keys."""
    qs = _parts(q)
    b, t, n = qs[0].shape[:3]
    g = n // kv
    q_seg, q_slot, k_seg, _ = mask_ids
    q_rows = tuple(x.reshape(b, t, kv, g, -1).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, -1) for x in qs)
    n_blocks = jnp.clip(jnp.max(q_slot) // block + 1, 1, -(-n_keys // block))

    def body(i, carry):
        m, l, acc = carry  # [B,K,G,T] x2, [B,K,G*T,Hv] fp32
        start = jnp.minimum(i * block, n_keys - block)
        keys, v = read(start, block)  # parts [B,K,Sb,H_i], [B,K,Sb,Hv]
        slot = start + jnp.arange(block, dtype=jnp.int32)  # [Sb]
        seg = jax.lax.dynamic_slice_in_dim(k_seg, start, block, axis=1)  # [B,Sb]
        visible = ((q_seg[:, :, None] == seg[:, None, :]) & (slot <= q_slot[:, :, None])
                   & (slot >= i * block))  # [B,T,Sb]
        s = sum(jnp.einsum("bkqh,bksh->bkqs", qi, ki.astype(qi.dtype), preferred_element_type=jnp.float32)
                for qi, ki in zip(q_rows, keys))  # [B,K,G*T,Sb]
        s = jnp.where(visible[:, None, None], s.reshape(b, kv, g, t, block) * scale, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        pv = jnp.einsum("bkqs,bksh->bkqh", p.reshape(b, kv, g * t, block).astype(qs[0].dtype),
                        v.astype(qs[0].dtype), preferred_element_type=jnp.float32)
        return m_new, l * rescale + p.sum(-1), acc * rescale.reshape(b, kv, g * t, 1) + pv

    hv = jax.eval_shape(lambda: read(0, block))[1].shape[-1]
    stats = jnp.full((b, kv, g, t), NEG_INF, jnp.float32)
    init = (stats, jnp.zeros_like(stats), jnp.zeros((b, kv, g * t, hv), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0).reshape(b, kv, g * t, 1)  # [B,K,G*T,Hv]
    return out.reshape(b, kv, g, t, hv).transpose(0, 3, 1, 2, 4).reshape(b, t, n, hv).astype(qs[0].dtype)


def cache_block(buf, layer, start, size: int, axis: int):
    """Positions start..start+size-1 along `axis` (of one layer's array) of layer `layer` of a stacked cache
    buffer [L, ...]: one dynamic slice, so only that block is read."""
    index = [0] * buf.ndim
    index[0], index[axis + 1] = layer, start
    return jax.lax.dynamic_slice(buf, index, (1,) + buf.shape[1:axis + 1] + (size,) + buf.shape[axis + 2:])[0]


def _blocked_decode(cfg: ModelConfig, queries: int, n_keys: int) -> bool:
    """Whether a cached call attends block by block (`blocked_cache_attention`): a decode step (one query per
    row) over a cache longer than one block of cfg.decode_block positions."""
    return bool(cfg.decode_block) and queries == 1 and n_keys > cfg.decode_block


def update_layer_cache(cache, layer, new: dict, index: tuple):
    """Write new entries {name: array} into layer `layer` of the stacked cache {name: [L,B,...]} at `index`,
    the advanced index of one layer's buffer. Returns (cache, that layer's arrays {name: [B,...]}). The stacked
    cache is the carry of the layer scan (and of the sampler's while_loop), so XLA scatters in place: a decode
    step writes B x T entries per layer, not whole buffers."""
    cache = {name: buf.at[(layer,) + index].set(new[name].astype(buf.dtype)) for name, buf in cache.items()}
    return cache, {name: buf[layer] for name, buf in cache.items()}


# ------------------------------------------------------------------------------------------------- MLA

def mla(p, x, cos, sin, mask_ids, cfg: ModelConfig, cache=None, layer=None, slots=None):
    """MLA over x [B,T,D]. Without a cache: full path. With a stacked cache {c_kv [L,B,S,C], k_pe [L,B,S,R]}:
    write the new latents into `layer` at `slots` [B,T] and attend (absorbed) over that layer's cache (a decode
    step: block by block up to the batch's farthest query, `blocked_cache_attention`).
    Returns (out [B,T,D], cache)."""
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
        o = attend(qf, k, v, mask_ids, cfg.softmax_scale, cfg.attn_block, in_order=True)  # [B,T,N,Dv]
    else:
        rows = jnp.arange(x.shape[0])[:, None]
        cache, cached = update_layer_cache(cache, layer, {"c_kv": c_kv, "k_pe": k_pe}, (rows, slots))  # [B,S,C|R]
        w_uk, w_uv = w_kv_b[..., :dn], w_kv_b[..., dn:]
        q_lat = jnp.einsum("btnh,cnh->btnc", q_nope, w_uk)  # [B,T,N,C]: W_UK absorbed into the query
        n_keys = cache["c_kv"].shape[2]
        if _blocked_decode(cfg, x.shape[1], n_keys):
            def read(start, size):  # [B,1,Sb,C|R]: the latent is one shared "head"
                c_blk, pe_blk = (cache_block(cache[k], layer, start, size, 1)[:, None] for k in ("c_kv", "k_pe"))
                return (c_blk, pe_blk), c_blk

            o_lat = blocked_cache_attention((q_lat, q_pe), read, n_keys, 1, mask_ids, cfg.softmax_scale,
                                            cfg.decode_block)  # [B,T,N,C]
        else:
            c_all = cached["c_kv"].astype(q_lat.dtype)[:, :, None]  # [B,S,1,C]: one shared "head"
            k_pe_all = cached["k_pe"].astype(q_lat.dtype)[:, :, None]  # [B,S,1,R]
            o_lat = attend((q_lat, q_pe), (c_all, k_pe_all), c_all, mask_ids, cfg.softmax_scale,
                           cfg.attn_block)  # [B,T,N,C]
        o = jnp.einsum("btnc,cnh->btnh", o_lat, w_uv)  # [B,T,N,Dv]: W_UV absorbed into the output
    o = constrain(o, ("act_batch", "act_len", "act_heads", None))
    return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache


# ------------------------------------------------------------------------------------------------- GQA

def gqa(p, x, cos, sin, mask_ids, cfg: ModelConfig, cache=None, layer=None, slots=None):
    """Grouped-query attention over x [B,T,D]; stacked heads-major cache {k, v} [L,B,K,S,H] (written into
    `layer` at `slots`, then attended; a decode step block by block, `blocked_cache_attention`).
    Returns (out, cache)."""
    q = jnp.einsum("btd,dnh->btnh", x, p["wq"])
    k = jnp.einsum("btd,dkh->btkh", x, p["wk"])
    v = jnp.einsum("btd,dkh->btkh", x, p["wv"])
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = constrain(q, ("act_batch", "act_len", "act_heads", None))
    q = apply_rope(q, cos, sin, cfg.rope_interleave)
    k = apply_rope(k, cos, sin, cfg.rope_interleave)
    if cache is not None:
        b, kv = x.shape[0], cfg.n_kv_heads
        index = (jnp.arange(b)[:, None, None], jnp.arange(kv)[None, :, None], slots[:, None, :])  # [B,K,T]
        new = {"k": k.transpose(0, 2, 1, 3), "v": v.transpose(0, 2, 1, 3)}  # [B,K,T,H]
        cache, cached = update_layer_cache(cache, layer, new, index)
        n_keys = cache["k"].shape[3]
        if _blocked_decode(cfg, x.shape[1], n_keys):
            def read(start, size):  # [B,K,Sb,H] each
                k_blk, v_blk = (cache_block(cache[name], layer, start, size, 2) for name in ("k", "v"))
                return (k_blk,), v_blk

            o = blocked_cache_attention(q, read, n_keys, kv, mask_ids, cfg.softmax_scale, cfg.decode_block)
            return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache
        k, v = (cached[name].transpose(0, 2, 1, 3).astype(q.dtype) for name in ("k", "v"))  # [B,S,K,H]
    o = attend(q, k, v, mask_ids, cfg.softmax_scale, cfg.attn_block, in_order=cache is None)
    return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache


def attention(p, x, cos, sin, mask_ids, cfg: ModelConfig, cache=None, layer=None, slots=None):
    """mask_ids: (q_seg [B,T], q_slot [B,T], k_seg [B,S], k_slot [B,S]), see make_mask. cache: the stacked
    layer cache (or None), layer: this layer's index in it. Without a cache the queries are the keys, at slots
    0..T-1 (the full forward, transformer.hidden_states), and attention skips the key blocks past each query
    block (`causal_dot_attention`)."""
    fn = mla if cfg.attention == "mla" else gqa
    return fn(p, x, cos, sin, mask_ids, cfg, cache, layer, slots)


def empty_layer_cache(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype):
    """Per-layer cache arrays stacked on a leading layer axis: the MLA latent {c_kv [L,B,S,C], k_pe [L,B,S,R]};
    GQA keys and values heads-major {k, v} [L,B,K,S,H], the layout `dot_attention`'s matmuls read in place."""
    if cfg.attention == "mla":
        return {"c_kv": jnp.zeros((n_layers, batch, max_len, cfg.kv_lora_rank), dtype),
                "k_pe": jnp.zeros((n_layers, batch, max_len, cfg.qk_rope_head_dim), dtype)}
    shape = (n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
