"""The decoder: parameter declarations, init, forward, prefill/decode over a cache, multi-token prediction.

Every parameter leaf is declared once (`param_specs`) with its shape, logical axes and initializer; `init`,
abstract params and shardings all derive from that one declaration. Layers of one kind are stacked on a leading
`layers` axis and run with one `lax.scan` each (dense prefix, MoE body), so compile time does not grow with depth.

Param tree (letters as in STYLE.md; Lx = layers of that kind):
  embed [V,D]; final_norm [D]; lm_head [D,V] (unless tied)
  dense/ and moe/: attn_norm [Lx,D], mlp_norm [Lx,D], attn/..., mlp/...
    MLA  attn: wq_a [D,Q] q_norm [Q] wq_b [Q,N,Dn+R] (or wq [D,N,Dn+R]), wkv_a [D,C+R], kv_norm [C],
               wkv_b [C,N,Dn+Dv], wo [N,Dv,D]
    GQA  attn: wq [D,N,H] wk/wv [D,K,H] (bq [N,H] bk/bv [K,H]) wo [N,H,D]
    dense mlp: w_gate/w_up [D,F] w_down [F,D]
    MoE   mlp: router [D,E] router_bias [E] w_gate/w_up [E,D,F] w_down [E,F,D] shared/{w_gate,w_up,w_down}
  mtp/: enorm [D] hnorm [D] eh_proj [2D,D] block/... norm [D]   (DeepSeek-V3 MTP, depth 1)
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from r1jax.models.attention import SAVED_NAMES, attention, decode_blocked, decode_runs, empty_layer_cache
from r1jax.models.config import ModelConfig
from r1jax.models.layers import rms_norm, rope_cos_sin, swiglu
from r1jax.models.moe import moe_layer
from r1jax.models import moe as moe_lib
from r1jax.sharding import constrain

# Leaves kept in fp32 inside the compute: the router decides discrete choices, so it never sees bf16.
FP32_LEAVES = ("router", "router_bias")
# Leaves that receive no gradient update (the optimizer must leave them alone).
NON_TRAINABLE = ("router_bias",)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal | zeros | ones
    dtype: str | None = None  # storage dtype; None = the config's param_dtype

    def storage_dtype(self, cfg: ModelConfig):
        return jnp.dtype(self.dtype) if self.dtype else cfg.weight_dtype


# ------------------------------------------------------------------------------------------ declarations

def _attn_specs(cfg: ModelConfig) -> dict:
    d, n = cfg.d_model, cfg.n_heads
    if cfg.attention == "mla":
        s = {}
        if cfg.q_lora_rank:
            s["wq_a"] = ParamSpec((d, cfg.q_lora_rank), ("embed", "q_lora"))
            s["q_norm"] = ParamSpec((cfg.q_lora_rank,), ("norm",), "ones")
            s["wq_b"] = ParamSpec((cfg.q_lora_rank, n, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"))
        else:
            s["wq"] = ParamSpec((d, n, cfg.qk_head_dim), ("embed", "heads", "head_dim"))
        s["wkv_a"] = ParamSpec((d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora"))
        s["kv_norm"] = ParamSpec((cfg.kv_lora_rank,), ("norm",), "ones")
        s["wkv_b"] = ParamSpec((cfg.kv_lora_rank, n, cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads", "head_dim"))
        s["wo"] = ParamSpec((n, cfg.v_head_dim, d), ("heads", "head_dim", "embed"))
        return s
    k, h = cfg.n_kv_heads, cfg.head_dim
    s = {
        "wq": ParamSpec((d, n, h), ("embed", "heads", "head_dim")),
        "wk": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "wv": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "wo": ParamSpec((n, h, d), ("heads", "head_dim", "embed")),
    }
    if cfg.qkv_bias:
        s["bq"] = ParamSpec((n, h), ("heads", "head_dim"), "zeros")
        s["bk"] = ParamSpec((k, h), ("kv_heads", "head_dim"), "zeros")
        s["bv"] = ParamSpec((k, h), ("kv_heads", "head_dim"), "zeros")
    return s


def _mlp_specs(d: int, f: int) -> dict:
    return {"w_gate": ParamSpec((d, f), ("embed", "mlp")), "w_up": ParamSpec((d, f), ("embed", "mlp")),
            "w_down": ParamSpec((f, d), ("mlp", "embed"))}


def _moe_specs(cfg: ModelConfig) -> dict:
    d, e, f = cfg.d_model, cfg.n_routed_experts, cfg.moe_d_ff
    s = {
        "router": ParamSpec((d, e), ("embed", None)),
        # fp32 storage even with bf16 params: rounding the bias can flip near-tied expert choices.
        "router_bias": ParamSpec((e,), (None,), "zeros", "float32"),
        "w_gate": ParamSpec((e, d, f), ("exp", "embed", "exp_mlp")),
        "w_up": ParamSpec((e, d, f), ("exp", "embed", "exp_mlp")),
        "w_down": ParamSpec((e, f, d), ("exp", "exp_mlp", "embed")),
    }
    if cfg.n_shared_experts:
        s["shared"] = _mlp_specs(d, cfg.moe_d_ff * cfg.n_shared_experts)
    return s


def _block_specs(cfg: ModelConfig, moe: bool) -> dict:
    return {
        "attn_norm": ParamSpec((cfg.d_model,), ("norm",), "ones"),
        "mlp_norm": ParamSpec((cfg.d_model,), ("norm",), "ones"),
        "attn": _attn_specs(cfg),
        "mlp": _moe_specs(cfg) if moe else _mlp_specs(cfg.d_model, cfg.d_ff),
    }


def _stack(tree, n: int):
    return jax.tree.map(lambda s: ParamSpec((n,) + s.shape, ("layers",) + s.axes, s.init, s.dtype), tree,
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def param_specs(cfg: ModelConfig) -> dict:
    """The single declaration of every parameter: a pytree of ParamSpec."""
    d, v = cfg.d_model, cfg.vocab_size
    specs: dict[str, Any] = {"embed": ParamSpec((v, d), ("vocab", "embed"))}
    if cfg.n_dense_layers:
        specs["dense"] = _stack(_block_specs(cfg, moe=False), cfg.n_dense_layers)
    if cfg.n_moe_layers:
        specs["moe"] = _stack(_block_specs(cfg, moe=True), cfg.n_moe_layers)
    specs["final_norm"] = ParamSpec((d,), ("norm",), "ones")
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((d, v), ("embed", "vocab"))
    if cfg.mtp_depth:
        specs["mtp"] = {
            "enorm": ParamSpec((d,), ("norm",), "ones"),
            "hnorm": ParamSpec((d,), ("norm",), "ones"),
            "eh_proj": ParamSpec((2 * d, d), (None, "embed")),
            "block": _block_specs(cfg, moe=cfg.is_moe),
            "norm": ParamSpec((d,), ("norm",), "ones"),
        }
    return specs


def _is_spec(x):
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig):
    """Logical axes of every leaf (a pytree of tuples)."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig, shardings=None):
    """ShapeDtypeStructs for every leaf (optionally with shardings); allocates nothing."""
    specs = param_specs(cfg)
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.storage_dtype(cfg)), specs, is_leaf=_is_spec)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.storage_dtype(cfg), sharding=sh), specs,
                        shardings, is_leaf=_is_spec)


def param_shardings(cfg: ModelConfig, mesh, rules):
    from r1jax.sharding import tree_shardings

    specs = param_specs(cfg)
    return tree_shardings(param_axes(cfg), jax.tree.map(lambda s: s.shape, specs, is_leaf=_is_spec), mesh, rules)


def init(cfg: ModelConfig, rng) -> dict:
    """Random params: N(0, init_std) for matrices, ones for norms, zeros for biases. Each leaf's key is folded from
    its path, so values do not depend on sharding or on which other leaves exist. Jit it with out_shardings to
    create the params already sharded."""

    def make(path, s: ParamSpec):
        dtype = s.storage_dtype(cfg)
        if s.init == "zeros":
            return jnp.zeros(s.shape, dtype)
        if s.init == "ones":
            return jnp.ones(s.shape, dtype)
        key = jax.random.fold_in(rng, zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF)
        return (cfg.init_std * jax.random.normal(key, s.shape, jnp.float32)).astype(dtype)

    return jax.tree_util.tree_map_with_path(make, param_specs(cfg), is_leaf=_is_spec)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total parameters (main model, MTP separately) and parameters activated per token."""
    import math

    specs = param_specs(cfg)
    mtp = specs.pop("mtp", None)
    total = sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=_is_spec))
    routed = 0
    if cfg.is_moe:
        m = specs["moe"]["mlp"]
        routed = sum(math.prod(m[k].shape) for k in ("w_gate", "w_up", "w_down"))
    active = total - routed + routed * cfg.n_experts_per_tok // max(cfg.n_routed_experts, 1)
    mtp_total = sum(math.prod(s.shape) for s in jax.tree.leaves(mtp, is_leaf=_is_spec)) if mtp else 0
    return {"total": total, "activated": active, "mtp": mtp_total}


def trainable_mask(params) -> Any:
    """True for leaves the optimizer updates; False for the router's selection bias (moved by its own rule)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in NON_TRAINABLE, params)


# --------------------------------------------------------------------------------------------- forward

def _cast(tree, dtype):
    """Cast weights to the compute dtype, except the fp32 router leaves."""
    return {k: (v if k in FP32_LEAVES else _cast(v, dtype) if isinstance(v, dict) else v.astype(dtype))
            for k, v in tree.items()}


# "dots" policies also keep dot attention's output and log-sum-exp (attention.SAVED_NAMES), so its hand-written
# backward runs without recomputing the forward's softmax.
_ATTENTION_SAVED = jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)
_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.dots_saveable, _ATTENTION_SAVED),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _ATTENTION_SAVED),
}


def _block(p, x, ctx, cfg: ModelConfig, moe: bool, cache=None, layer=None):
    """One pre-norm decoder block (layer `layer` of the stacked cache, if any). Returns (x, moe stats or None,
    cache)."""
    p = _cast(p, cfg.compute_dtype)
    cos, sin, mask_ids, valid, slots, rows, pages = ctx
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    a, cache = attention(p["attn"], h, cos, sin, mask_ids, cfg, cache, layer, slots, rows, pages)
    x = constrain(x + a, ("act_batch", "act_len", "act_embed"))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    if moe:
        m, stats = moe_layer(p["mlp"], h, valid, cfg)
    else:
        m, stats = swiglu(h, p["mlp"]["w_gate"], p["mlp"]["w_up"], p["mlp"]["w_down"]), None
    x = constrain(x + m, ("act_batch", "act_len", "act_embed"))
    return x, stats, cache


def _scan_blocks(stacked, x, ctx, cfg: ModelConfig, moe: bool, cache=None):
    """Run a stack of blocks with lax.scan (+ remat). Returns (x, stacked stats, stacked cache).

    The stacked cache [L,B,S,...] rides in the carry, not in the scanned inputs/outputs: each layer updates its
    slice in place, where stacked outputs would be a fresh (zero-filled) copy of the whole cache every call."""

    def body(carry, layer):
        y, c = carry
        p, index = layer
        y, stats, c = _block(p, y, ctx, cfg, moe, c, index)
        return (y, c), stats

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    (x, cache), stats = jax.lax.scan(body, (x, cache), (stacked, jnp.arange(n_layers)))
    return x, stats, cache


def default_positions(segment_ids):
    """Position within each segment: 0, 1, ... restarting where the segment id changes. [B,T] -> [B,T]."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    change = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
    return idx - start


def _embed(params, tokens, cfg: ModelConfig):
    x = jnp.take(params["embed"], tokens, axis=0).astype(cfg.compute_dtype)
    return constrain(x, ("act_batch", "act_len", "act_embed"))


def _logits(params, h, cfg: ModelConfig):
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    return _head(params, h, cfg)


def _head(params, h, cfg: ModelConfig):
    w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    logits = jnp.dot(h, w.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_len", "act_vocab"))


def _trunk(params, x, ctx, cfg: ModelConfig, cache=None):
    """Dense prefix then MoE body. Returns (hidden [B,T,D], moe stats, cache)."""
    stats = None
    new_cache = {}
    if cfg.n_dense_layers:
        x, _, c = _scan_blocks(params["dense"], x, ctx, cfg, False, None if cache is None else cache["dense"])
        new_cache["dense"] = c
    if cfg.n_moe_layers:
        x, stats, c = _scan_blocks(params["moe"], x, ctx, cfg, True, None if cache is None else cache["moe"])
        new_cache["moe"] = c
    return x, stats, new_cache


def forward(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None):
    """Logits [B,T,V] (fp32) for tokens [B,T], and aux:
      expert_load [L_moe, E]  share of routed slots per expert per MoE layer (for the bias update)
      aux_loss                sequence-wise balance loss, already times aux_loss_alpha (0 when off)
      mtp_logits [B,T,V]      (when mtp_depth=1) position t predicts token t+2
    segment_ids [B,T] (default all 1) keep packed documents apart; 0 marks padding.
    positions [B,T] default to the position inside each segment.
    """
    h, aux = hidden_states(params, tokens, cfg, positions=positions, segment_ids=segment_ids, mtp=True)
    if "mtp_hidden" in aux:
        aux["mtp_logits"] = _head(params, aux.pop("mtp_hidden"), cfg)
    return _head(params, h, cfg), aux


def hidden_states(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None, mtp: bool = False):
    """Final-normed hidden states [B,T,D] and aux (as `forward`, with mtp_hidden [B,T,D], the MTP module's
    final-normed states, in place of mtp_logits; only when mtp=True). A reward model puts its scalar head on
    these; training puts the output head on them with `token_logprobs`."""
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
    if positions is None:
        positions = default_positions(segment_ids)
    slots = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    cos, sin = rope_cos_sin(positions, cfg)
    ctx = (cos, sin, (segment_ids, slots, segment_ids, slots), segment_ids > 0, slots, None, None)
    h, stats, _ = _trunk(params, _embed(params, tokens, cfg), ctx, cfg)
    aux = {}
    if cfg.is_moe:
        aux["expert_load"] = stats["load"]
        aux["aux_loss"] = cfg.aux_loss_alpha * stats["aux_loss"].sum()
    else:
        aux["aux_loss"] = jnp.zeros((), jnp.float32)
    if cfg.mtp_depth and mtp:
        aux["mtp_hidden"] = _mtp(params, h, tokens, ctx, cfg)
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps), aux


def _mtp(params, h, tokens, ctx, cfg: ModelConfig):
    """DeepSeek-V3 MTP module (depth 1): h'_t = Block(W [enorm(Emb(x_{t+1})) ; hnorm(h_t)]), final-normed; the
    shared output head goes on it. The input order of eh_proj follows the released checkpoint's use in vLLM."""
    p = params["mtp"]
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # x_{t+1} (last: masked by loss)
    e = rms_norm(_embed(params, nxt, cfg), p["enorm"], cfg.rms_norm_eps)
    hn = rms_norm(h, p["hnorm"], cfg.rms_norm_eps)
    x = jnp.concatenate([e, hn], axis=-1) @ p["eh_proj"].astype(cfg.compute_dtype)
    x, _, _ = _block(p["block"], x, ctx, cfg, cfg.is_moe)
    return rms_norm(x, p["norm"], cfg.rms_norm_eps)


def token_logprobs(params, h, targets, cfg: ModelConfig, *, temperature: float = 1.0, with_entropy: bool = False):
    """log softmax(head(h) / temperature) at targets [B,T] (fp32) for final-normed states h [B,T,D], and with
    with_entropy the entropy [B,T] of that distribution. Over chunks of cfg.logits_chunk positions (lax.scan,
    each chunk rematerialised in the backward pass), so the fp32 logits [B,T,V] are never whole."""

    def chunk(h_c, targets_c):
        logits = _head(params, h_c, cfg) / temperature  # [B,Tc,V] fp32
        lse = jax.nn.logsumexp(logits, axis=-1)
        out = (jnp.take_along_axis(logits, targets_c[..., None], axis=-1)[..., 0] - lse,)
        if with_entropy:
            out += (lse - jnp.sum(jnp.exp(logits - lse[..., None]) * logits, axis=-1),)
        return out

    b, t = targets.shape
    if not cfg.logits_chunk or t <= cfg.logits_chunk:
        return chunk(h, targets)
    n = -(-t // cfg.logits_chunk)
    size = -(-t // n)

    def blocks(x):  # [B,T,...] -> [n, B, size, ...], the tail padded
        x = jnp.pad(x, [(0, 0), (0, n * size - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)

    _, outs = jax.lax.scan(jax.checkpoint(lambda _, xs: (None, chunk(*xs))), None, (blocks(h), blocks(targets)))
    return tuple(jnp.moveaxis(o, 0, 1).reshape(b, n * size)[:, :t] for o in outs)


# ----------------------------------------------------------------------------------------- cached decode

def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, *, pages: int = 0, page: int = 0) -> dict:
    """An empty decode cache. MLA caches the latent (kv_lora_rank + qk_rope_head_dim values per token per layer);
    GQA caches K and V per KV head. Bookkeeping: segment id per slot (0 = empty), next free slot and next
    position per row, and the segment being decoded.

    pages > 0: a paged cache (vLLM's PagedAttention layout, used by the slot engine r1jax/rl/engine.py): the
    layer arrays hold `pages` pages of `page` positions instead of batch x max_len, and "pages" [batch,
    max_len / page] is each row's page table (position j of row b lives in page pages[b, j // page]); every
    row starts on page 0. The bookkeeping stays per row."""
    dtype = cfg.compute_dtype if dtype is None else dtype
    cache = {
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "length": jnp.zeros((batch,), jnp.int32),
        "next_position": jnp.zeros((batch,), jnp.int32),
        "segment": jnp.ones((batch,), jnp.int32),
    }
    rows, width = batch, max_len
    if pages:
        if page < 1 or max_len % page:
            raise ValueError(f"a paged cache needs pages of page >= 1 positions dividing max_len={max_len}; "
                             f"got page={page}")
        cache["pages"] = jnp.zeros((batch, max_len // page), jnp.int32)
        rows, width = pages, page
    if cfg.n_dense_layers:
        cache["dense"] = empty_layer_cache(cfg, cfg.n_dense_layers, rows, width, dtype)
    if cfg.n_moe_layers:
        cache["moe"] = empty_layer_cache(cfg, cfg.n_moe_layers, rows, width, dtype)
    return cache


def _cached_step(params, tokens, cfg, cache, positions, segment_ids, slots, rows=None):
    """tokens [B,T] written at `slots` [B,T] of cache rows `rows` [B] (None: row b of the batch is cache row b)
    and attended over those rows' caches (through their page tables if the cache is paged). Returns (logits
    [B,T,V], cache)."""
    s = cache["segment_ids"].shape[1]
    index = (jnp.arange(tokens.shape[0]) if rows is None else rows)[:, None]
    seg_cache = cache["segment_ids"].at[index, slots].set(segment_ids)
    k_seg = seg_cache if rows is None else seg_cache[rows]  # [B,S]: the batch rows' own cache segments
    k_slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), k_seg.shape)
    cos, sin = rope_cos_sin(positions, cfg)
    pages = cache.get("pages")
    pages = pages if pages is None or rows is None else pages[rows]  # [B, M]: the batch rows' page tables
    ctx = (cos, sin, (segment_ids, slots, k_seg, k_slot), segment_ids > 0, slots, rows, pages)
    h, _, layers = _trunk(params, _embed(params, tokens, cfg), ctx, cfg, cache)
    return _logits(params, h, cfg), {**cache, **layers, "segment_ids": seg_cache}


def prefill(params, tokens, cfg: ModelConfig, cache, *, positions=None, segment_ids=None):
    """Run prompts tokens [B,T] (right-padded with segment 0, or packed) into an empty cache at slots 0..T-1.

    Returns (logits [B,T,V], cache). Decoding then continues each row's *last* non-padding segment, from the
    slot after its last non-padding token."""
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
    if positions is None:
        positions = default_positions(segment_ids)
    b, t = tokens.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = _cached_step(params, tokens, cfg, cache, positions, segment_ids, slots)
    real = segment_ids > 0
    last = jnp.max(jnp.where(real, slots, -1), axis=1)  # [B] slot of the last real token
    rows = jnp.arange(b)
    cache["length"] = last + 1
    cache["next_position"] = positions[rows, jnp.maximum(last, 0)] + 1
    cache["segment"] = segment_ids[rows, jnp.maximum(last, 0)]
    return logits, cache


def decode_step(params, tokens, cfg: ModelConfig, cache):
    """One token per row (tokens [B]) at each row's next slot. Returns (logits [B,V], cache).

    With more than one run (attention.decode_runs; a decode over cache blocks) the rows run sorted by their cache
    length, shortest first, so that decode attention's runs of rows (attention.blocked_cache_attention) are
    contiguous in the batch: the order is taken once per step, and each layer reads its cache rows through it."""
    rows = None
    if decode_runs(cfg, tokens.shape[0]) > 1 and decode_blocked(cfg, 1, cache["segment_ids"].shape[1]):
        rows = jnp.argsort(cache["length"])  # [B]: the cache row of each (sorted) batch row
    take = (lambda x: x) if rows is None else (lambda x: x[rows])  # noqa: E731
    logits, cache = _cached_step(params, take(tokens)[:, None], cfg, cache, take(cache["next_position"])[:, None],
                                 take(cache["segment"])[:, None], take(cache["length"])[:, None], rows)
    cache["length"] = cache["length"] + 1
    cache["next_position"] = cache["next_position"] + 1
    logits = logits[:, 0]
    return (logits, cache) if rows is None else (jnp.zeros_like(logits).at[rows].set(logits), cache)


def update_router_bias(params, expert_load, rate: float):
    """Apply the aux-loss-free bias update to every MoE layer: expert_load [L_moe, E] from forward's aux."""
    if "moe" not in params or rate == 0:
        return params
    mlp = dict(params["moe"]["mlp"])
    mlp["router_bias"] = moe_lib.update_router_bias(mlp["router_bias"], expert_load, rate)
    return {**params, "moe": {**params["moe"], "mlp": mlp}}
