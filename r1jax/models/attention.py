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
`blocked_cache_attention` instead: a lax.switch over cache prefixes of whole cfg.decode_block blocks
(`decode_widths`), each branch one dot attention over that prefix read straight from the stacked cache, taking
the shortest prefix that holds the farthest query. A batch whose rows are all short does not read the empty tail
of the cache. With cfg.decode_row_groups > 1 the rows are first sorted by length and cut into that many runs
(of at least MIN_RUN_ROWS rows, `decode_runs`), each reading its own prefix, so the slot engine's short rows do
not read as far as its longest. Masked positions get probability exactly 0: a row's result does not depend on
how far its run read, up to the rounding of sums.

Without a cache, both paths attend with `attend`: `dot_attention` (the [B,N,T,S] scores at once) or, when T exceeds
cfg.attn_block, `chunked_attention` (query blocks x key blocks with an online softmax, FlashAttention-2's
algorithm in pure JAX, each block rematerialised in the backward pass), which never holds more than one block's
scores: at T = S = 32k the full scores are 64 GiB per row for 16 heads. The mask travels as its ids
(q_seg, q_slot, k_seg, k_slot), so the [B,T,S] mask is never built whole either.
"""

from __future__ import annotations

import functools

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


# Most prefix widths a decode step chooses among (`decode_widths`): each is a branch of one lax.switch per run of
# rows and layer; past this many blocks the widths step by several blocks (a 32k cache in blocks of 1024: 12
# widths of 3 blocks) and a row reads at most one step more than it needs.
MAX_DECODE_WIDTHS = 16


def decode_widths(n_keys: int, block: int) -> tuple[int, ...]:
    """The cache prefixes a decode step may read: multiples of `block` (of several blocks when there would be
    more than MAX_DECODE_WIDTHS), the last one the whole cache."""
    blocks = -(-n_keys // block)
    step = -(-blocks // MAX_DECODE_WIDTHS)
    return tuple(sorted({min(i * block, n_keys) for i in range(step, blocks + step, step)}))


def blocked_cache_attention(q, read, n_keys: int, kv: int, mask_ids, scale: float, block: int, runs: int = 1):
    """dot_attention's result for queries q [B,T,N,H] (or parts, see `attend`) over a cache of n_keys positions,
    each row reading only a prefix of the cache about as long as its own farthest query needs.

    read(width, lo, hi) -> (key parts [hi-lo,K,width,H_i], values [hi-lo,K,width,Hv]): cache positions
    0..width-1 of batch rows lo..hi-1, heads-major (K = kv). mask_ids as `attend`; the key slot of a cache
    position is the position itself.
    1. The batch is cut into `runs` runs of consecutive rows (cfg.decode_row_groups; `transformer.decode_step`
       sorts its rows by length first, so a run holds rows of similar length).
    2. Each run attends over the shortest prefix in `decode_widths(n_keys, block)` that holds its farthest
       query (one lax.switch branch per width, each a plain dot attention over that prefix): a batch of short
       rows does not read the cache's empty tail, and with runs > 1 the slot engine's short rows (r1jax/rl/
       engine.py: rows of every length side by side) do not read as far as its longest.
    The positions past a row's own query are masked (probability exactly 0), so a row's result is the whole-
    cache dot attention's up to the rounding of its sums, whatever prefix its run read."""
    b = _parts(q)[0].shape[0]
    widths = decode_widths(n_keys, block)
    runs = max(1, min(runs, b))
    edges = [b * i // runs for i in range(runs + 1)]
    outs = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        cut = (lambda x: x) if (lo, hi) == (0, b) else (lambda x, lo=lo, hi=hi: x[lo:hi])  # noqa: E731
        outs.append(_prefix_attention(jax.tree.map(cut, q), functools.partial(read, lo=lo, hi=hi), widths,
                                      tuple(map(cut, mask_ids)), scale))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


def _prefix_attention(q, read, widths: tuple[int, ...], mask_ids, scale: float):
    """Dot attention of q [B,T,N,H] (or parts) over the shortest cache prefix in `widths` that holds the farthest
    query slot; read(width) -> (key parts [B,K,width,H_i], values [B,K,width,Hv])."""
    q_seg, q_slot, k_seg, _ = mask_ids

    def over(width):
        def fn():
            keys, v = read(width)
            visible = (q_seg[:, :, None] == k_seg[:, None, :width]) & (jnp.arange(width) <= q_slot[:, :, None])
            k_rows = tuple(x.transpose(0, 2, 1, 3).astype(_parts(q)[0].dtype) for x in keys)  # [B,width,K,H_i]
            return _dot_attention(_parts(q), k_rows, v.transpose(0, 2, 1, 3).astype(_parts(q)[0].dtype), visible,
                                  scale)
        return fn

    index = jnp.searchsorted(jnp.asarray(widths), jnp.max(q_slot) + 1)  # the first width > the farthest slot
    return jax.lax.switch(jnp.minimum(index, len(widths) - 1), [over(w) for w in widths])


def cache_prefix(buf, layer, width: int, axis: int, rows=None, lo: int = 0, hi: int | None = None, pages=None):
    """Positions 0..width-1 along `axis` (of one layer's array [B, ...]) of layer `layer` of a stacked cache buffer,
    for batch rows lo..hi-1: only that prefix of those rows is read.
    - rows None, pages None: the buffer is [L, B, ...] and batch row b is cache row b;
    - rows [B]: batch row b is cache row rows[b] (decode_step's rows sorted by length);
    - pages [B, M]: a paged buffer [L, pages, ..., page, ...] (`transformer.init_cache(pages=...)`), batch row b's positions
      j*page..(j+1)*page-1 in page pages[b, j]; width a multiple of the page."""
    if pages is None:
        prefix = (slice(None),) * (axis - 1) + (slice(0, width),)
        return buf[(layer, slice(lo, hi) if rows is None else rows[lo:hi]) + prefix]
    page = buf.shape[axis + 1]
    got = jnp.moveaxis(buf[layer, pages[lo:hi, :width // page]], 1, axis)  # [R, ..., width/page, page, ...]
    return got.reshape(got.shape[:axis] + (width,) + got.shape[axis + 2:])


def write_index(b: int, slots, rows=None, pages=None, page: int = 0) -> tuple:
    """Where a batch's new entries at `slots` [B,T] go in one layer's buffer: (cache row [B,1] and slots, or page
    [B,T] and position in it [B,T]); rows / pages as `cache_prefix`."""
    if pages is None:
        return (jnp.arange(b) if rows is None else rows)[:, None], slots
    return jnp.take_along_axis(pages, slots // page, axis=1), slots % page


# Fewest rows in a run of `blocked_cache_attention`: a run of fewer rows costs more in its gathers and its switch
# than it saves in positions not read (a decode step of 4 rows costs 47 us per row on XLA:CPU, of 28 rows 17).
MIN_RUN_ROWS = 8


def decode_runs(cfg: ModelConfig, rows: int) -> int:
    """Runs of rows a decode step of `rows` rows attends in: cfg.decode_row_groups, fewer where a run would hold
    fewer than MIN_RUN_ROWS rows (1 = the batch as it is, unsorted)."""
    return max(1, min(cfg.decode_row_groups, rows // MIN_RUN_ROWS))


def decode_blocked(cfg: ModelConfig, queries: int, n_keys: int) -> bool:
    """Whether a cached call attends over a prefix of whole blocks (`blocked_cache_attention`): a decode step (one
    query per row) over a cache longer than one block of cfg.decode_block positions."""
    return bool(cfg.decode_block) and queries == 1 and n_keys > cfg.decode_block


def update_layer_cache(cache, layer, new: dict, index: tuple) -> dict:
    """Write new entries {name: array} into layer `layer` of the stacked cache {name: [L,B,...]} (or its paged
    buffers [L,pages,...]) at `index`, the advanced index of one layer's buffer. The stacked cache is the carry of
    the layer scan (and of the sampler's while_loop), so XLA scatters in place: a decode step writes B x T entries
    per layer, not whole buffers."""
    return {name: buf.at[(layer,) + index].set(new[name].astype(buf.dtype)) for name, buf in cache.items()}


# ------------------------------------------------------------------------------------------------- MLA

def mla(p, x, cos, sin, mask_ids, cfg: ModelConfig, cache=None, layer=None, slots=None, rows=None, pages=None):
    """MLA over x [B,T,D]. Without a cache: full path. With a stacked cache {c_kv [L,B,S,C], k_pe [L,B,S,R]}:
    write the new latents into `layer` at `slots` [B,T] and attend (absorbed) over that layer's cache (a decode
    step: over the prefix its farthest query needs, `blocked_cache_attention`).
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
        page = cache["c_kv"].shape[2]  # positions per row (unpaged) or per page
        index = write_index(x.shape[0], slots, rows, pages, page)
        cache = update_layer_cache(cache, layer, {"c_kv": c_kv, "k_pe": k_pe}, index)
        w_uk, w_uv = w_kv_b[..., :dn], w_kv_b[..., dn:]
        q_lat = jnp.einsum("btnh,cnh->btnc", q_nope, w_uk)  # [B,T,N,C]: W_UK absorbed into the query
        n_keys = page if pages is None else page * pages.shape[1]

        def read(width, lo=0, hi=None):  # [R,1,width,C|R]: the latent is one shared "head"
            c_pre, pe_pre = (cache_prefix(cache[k], layer, width, 1, rows, lo, hi, pages)[:, None]
                             for k in ("c_kv", "k_pe"))
            return (c_pre, pe_pre), c_pre

        if decode_blocked(cfg, x.shape[1], n_keys):
            o_lat = blocked_cache_attention((q_lat, q_pe), read, n_keys, 1, mask_ids, cfg.softmax_scale,
                                            cfg.decode_block, decode_runs(cfg, x.shape[0]))  # [B,T,N,C]
        else:
            (c_all, k_pe_all), _ = read(n_keys)
            c_all, k_pe_all = (a.transpose(0, 2, 1, 3).astype(q_lat.dtype) for a in (c_all, k_pe_all))  # [B,S,1,C|R]
            o_lat = attend((q_lat, q_pe), (c_all, k_pe_all), c_all, mask_ids, cfg.softmax_scale,
                           cfg.attn_block)  # [B,T,N,C]
        o = jnp.einsum("btnc,cnh->btnh", o_lat, w_uv)  # [B,T,N,Dv]: W_UV absorbed into the output
    o = constrain(o, ("act_batch", "act_len", "act_heads", None))
    return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache


# ------------------------------------------------------------------------------------------------- GQA

def gqa(p, x, cos, sin, mask_ids, cfg: ModelConfig, cache=None, layer=None, slots=None, rows=None, pages=None):
    """Grouped-query attention over x [B,T,D]; stacked heads-major cache {k, v} [L,B,K,S,H] (written into
    `layer` at `slots`, then attended; a decode step over the prefix it needs, `blocked_cache_attention`).
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
        page = cache["k"].shape[3]  # positions per row (unpaged) or per page
        first, second = write_index(b, slots, rows, pages, page)
        index = (first[:, None, :], jnp.arange(kv)[None, :, None], second[:, None, :])  # [B,K,T]
        new = {"k": k.transpose(0, 2, 1, 3), "v": v.transpose(0, 2, 1, 3)}  # [B,K,T,H]
        cache = update_layer_cache(cache, layer, new, index)
        n_keys = page if pages is None else page * pages.shape[1]

        def read(width, lo=0, hi=None):  # [R,K,width,H] each
            k_pre, v_pre = (cache_prefix(cache[name], layer, width, 2, rows, lo, hi, pages) for name in ("k", "v"))
            return (k_pre,), v_pre

        if decode_blocked(cfg, x.shape[1], n_keys):
            o = blocked_cache_attention(q, read, n_keys, kv, mask_ids, cfg.softmax_scale, cfg.decode_block,
                                        decode_runs(cfg, b))
            return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache
        (k,), v = read(n_keys)
        k, v = (a.transpose(0, 2, 1, 3).astype(q.dtype) for a in (k, v))  # [B,S,K,H]
    o = attend(q, k, v, mask_ids, cfg.softmax_scale, cfg.attn_block, in_order=cache is None)
    return jnp.einsum("btnh,nhd->btd", o, p["wo"]), cache


def attention(p, x, cos, sin, mask_ids, cfg: ModelConfig, cache=None, layer=None, slots=None, rows=None,
              pages=None):
    """mask_ids: (q_seg [B,T], q_slot [B,T], k_seg [B,S], k_slot [B,S]), see make_mask. cache: the stacked
    layer cache (or None), layer: this layer's index in it; rows [B]: the cache row of each batch row (a decode
    step's rows sorted by length, `transformer.decode_step`), None = the same row; pages [B, M]: each batch row's
    page table when the cache is paged (`transformer.init_cache(pages=...)`). Without a cache the queries
    are the keys, at slots 0..T-1 (the full forward, transformer.hidden_states), and attention skips the key
    blocks past each query block (`causal_dot_attention`)."""
    fn = mla if cfg.attention == "mla" else gqa
    return fn(p, x, cos, sin, mask_ids, cfg, cache, layer, slots, rows, pages)


def empty_layer_cache(cfg: ModelConfig, n_layers: int, batch: int, max_len: int, dtype):
    """Per-layer cache arrays stacked on a leading layer axis: the MLA latent {c_kv [L,B,S,C], k_pe [L,B,S,R]};
    GQA keys and values heads-major {k, v} [L,B,K,S,H], the layout `dot_attention`'s matmuls read in place.
    A paged cache is the same arrays with pages for rows and a page's positions for S (`cache_prefix`)."""
    if cfg.attention == "mla":
        return {"c_kv": jnp.zeros((n_layers, batch, max_len, cfg.kv_lora_rank), dtype),
                "k_pe": jnp.zeros((n_layers, batch, max_len, cfg.qk_rope_head_dim), dtype)}
    shape = (n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
