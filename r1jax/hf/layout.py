"""Where every r1jax parameter lives in a Hugging Face checkpoint, and how to cut any block of it from there.

One table serves load and save. Each leaf of the param tree (transformer.py's docstring) maps to a grid of
*pieces*, one HF tensor each: a stacked leaf's leading `layers` axis indexes `model.layers.{i}` (layer i of the
checkpoint is dense[i] for i < first_k_dense_replace, else moe[i - first_k_dense_replace]); a per-expert leaf's
`exp` axis indexes `mlp.experts.{j}` (released checkpoints), or the expert axis stays inside one fused tensor
(`mlp.experts.gate_up_proj` [E, 2F, D], gate rows first, and `mlp.experts.down_proj` [E, D, F], as transformers
5 keeps them in memory).

A piece is our block = HF tensor -> (rows of axis -2, for one half of gate_up) -> (swap the last two axes: torch
Linear weights are [out, in], ours [in, out]) -> reshape (split a flat axis into heads: q_b_proj [N*(Dn+R), Q] ->
wq_b [Q, N, Dn+R]; o_proj [D, N*Dv] -> wo [N, Dv, D]; q_proj.bias [N*H] -> bq [N, H]). A reshape that only
splits axes maps a block [a, b) of the outer split axis to one contiguous range of the flat axis, so a shard of a
leaf is read as a covering block of each HF tensor it needs and nothing more.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from r1jax.models.config import ModelConfig
from r1jax.models.transformer import ParamSpec, param_specs

Ranges = Sequence[tuple[int, int]]
# Stored in fp32 whatever the checkpoint dtype: the bias decides discrete expert choices (HF keeps it fp32 too).
FP32_TENSORS = ("e_score_correction_bias",)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]  # full shape in the checkpoint
    transpose: bool = False  # swap the last two axes (torch Linear [out, in] -> ours [in, out])
    rows: tuple[int, int] | None = None  # only rows [a, b) of axis -2 (one half of a fused gate_up_proj)

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """Shape after taking `rows` and transposing: our piece's shape before splitting axes."""
        s = list(self.shape)
        if self.rows:
            s[-2] = self.rows[1] - self.rows[0]
        if self.transpose:
            s[-2], s[-1] = s[-1], s[-2]
        return tuple(s)


@dataclasses.dataclass(frozen=True)
class LeafMap:
    path: tuple[str, ...]  # e.g. ("moe", "mlp", "w_gate")
    shape: tuple[int, ...]  # our leaf's shape
    n_stack: int  # leading axes of the leaf that index pieces: 0, 1 (layers or experts), 2 (layers, experts)
    pieces: Any  # HFTensor nested n_stack tuples deep

    @property
    def label(self) -> str:
        return "/".join(self.path)

    def piece(self, idx: tuple[int, ...]) -> HFTensor:
        p = self.pieces
        for i in idx:
            p = p[i]
        return p

    def items(self) -> Iterator[tuple[tuple[int, ...], HFTensor]]:
        for idx in itertools.product(*(range(n) for n in self.shape[: self.n_stack])):
            yield idx, self.piece(idx)


# --------------------------------------------------------------------------------------------- the table

def _block(cfg: ModelConfig, prefix: str, moe: bool, fused: bool) -> dict[tuple[str, ...], Any]:
    """One decoder block: our path inside the block -> HFTensor (or a tuple over experts)."""
    d, n = cfg.d_model, cfg.n_heads

    def lin(name, out, inp):
        return HFTensor(f"{prefix}{name}.weight", (out, inp), transpose=True)

    def vec(name, size):
        return HFTensor(prefix + name, (size,))

    m: dict[tuple[str, ...], Any] = {("attn_norm",): vec("input_layernorm.weight", d),
                                     ("mlp_norm",): vec("post_attention_layernorm.weight", d)}
    a = "self_attn."
    if cfg.attention == "mla":
        qk, c, r = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            m["attn", "wq_a"] = lin(a + "q_a_proj", cfg.q_lora_rank, d)
            m["attn", "q_norm"] = vec(a + "q_a_layernorm.weight", cfg.q_lora_rank)
            m["attn", "wq_b"] = lin(a + "q_b_proj", n * qk, cfg.q_lora_rank)
        else:
            m["attn", "wq"] = lin(a + "q_proj", n * qk, d)
        m["attn", "wkv_a"] = lin(a + "kv_a_proj_with_mqa", c + r, d)
        m["attn", "kv_norm"] = vec(a + "kv_a_layernorm.weight", c)
        m["attn", "wkv_b"] = lin(a + "kv_b_proj", n * (cfg.qk_nope_head_dim + cfg.v_head_dim), c)
        m["attn", "wo"] = lin(a + "o_proj", d, n * cfg.v_head_dim)
    else:
        k, h = cfg.n_kv_heads, cfg.head_dim
        m["attn", "wq"] = lin(a + "q_proj", n * h, d)
        m["attn", "wk"] = lin(a + "k_proj", k * h, d)
        m["attn", "wv"] = lin(a + "v_proj", k * h, d)
        m["attn", "wo"] = lin(a + "o_proj", d, n * h)
        if cfg.qkv_bias:
            m["attn", "bq"] = vec(a + "q_proj.bias", n * h)
            m["attn", "bk"] = vec(a + "k_proj.bias", k * h)
            m["attn", "bv"] = vec(a + "v_proj.bias", k * h)
    if not moe:
        f = cfg.d_ff
        m["mlp", "w_gate"] = lin("mlp.gate_proj", f, d)
        m["mlp", "w_up"] = lin("mlp.up_proj", f, d)
        m["mlp", "w_down"] = lin("mlp.down_proj", d, f)
        return m
    e, f = cfg.n_routed_experts, cfg.moe_d_ff
    m["mlp", "router"] = lin("mlp.gate", e, d)
    m["mlp", "router_bias"] = vec("mlp.gate.e_score_correction_bias", e)
    if fused:
        gate_up, down = f"{prefix}mlp.experts.gate_up_proj", f"{prefix}mlp.experts.down_proj"
        m["mlp", "w_gate"] = HFTensor(gate_up, (e, 2 * f, d), transpose=True, rows=(0, f))
        m["mlp", "w_up"] = HFTensor(gate_up, (e, 2 * f, d), transpose=True, rows=(f, 2 * f))
        m["mlp", "w_down"] = HFTensor(down, (e, d, f), transpose=True)
    else:
        m["mlp", "w_gate"] = tuple(lin(f"mlp.experts.{j}.gate_proj", f, d) for j in range(e))
        m["mlp", "w_up"] = tuple(lin(f"mlp.experts.{j}.up_proj", f, d) for j in range(e))
        m["mlp", "w_down"] = tuple(lin(f"mlp.experts.{j}.down_proj", d, f) for j in range(e))
    if cfg.n_shared_experts:
        fs = f * cfg.n_shared_experts
        m["mlp", "shared", "w_gate"] = lin("mlp.shared_experts.gate_proj", fs, d)
        m["mlp", "shared", "w_up"] = lin("mlp.shared_experts.up_proj", fs, d)
        m["mlp", "shared", "w_down"] = lin("mlp.shared_experts.down_proj", d, fs)
    return m


def hf_layout(cfg: ModelConfig, *, fused_experts: bool = False) -> tuple[list[LeafMap], list[HFTensor]]:
    """(one LeafMap per param leaf, in param-tree order; duplicates): duplicates are tensors a checkpoint may
    hold that copy another one (the MTP layer's `embed_tokens` and `shared_head.head`, which DeepSeek-V3 shares
    with the main model; `lm_head` of a tied model). They are read by no parameter."""
    v, d = cfg.vocab_size, cfg.d_model
    table: dict[tuple[str, ...], Any] = {("embed",): HFTensor("model.embed_tokens.weight", (v, d)),
                                         ("final_norm",): HFTensor("model.norm.weight", (d,))}
    duplicates = []
    if cfg.tie_embeddings:
        duplicates.append(HFTensor("lm_head.weight", (v, d)))
    else:
        table["lm_head",] = HFTensor("lm_head.weight", (v, d), transpose=True)
    for kind, layers in (("dense", range(cfg.n_dense_layers)), ("moe", range(cfg.n_dense_layers, cfg.n_layers))):
        blocks = [_block(cfg, f"model.layers.{i}.", kind == "moe", fused_experts) for i in layers]
        for sub in blocks[0] if blocks else ():
            table[(kind,) + sub] = tuple(b[sub] for b in blocks)
    if cfg.mtp_depth:
        pre = f"model.layers.{cfg.n_layers}."
        table["mtp", "enorm"] = HFTensor(pre + "enorm.weight", (d,))
        table["mtp", "hnorm"] = HFTensor(pre + "hnorm.weight", (d,))
        table["mtp", "eh_proj"] = HFTensor(pre + "eh_proj.weight", (d, 2 * d), transpose=True)
        table["mtp", "norm"] = HFTensor(pre + "shared_head.norm.weight", (d,))
        for sub, t in _block(cfg, pre, cfg.is_moe, fused_experts).items():
            table[("mtp", "block") + sub] = t
        duplicates += [HFTensor(pre + "embed_tokens.weight", (v, d)), HFTensor(pre + "shared_head.head.weight", (v, d))]

    leaves = []
    for path, spec in jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))[0]:
        key = tuple(k.key for k in path)
        if key not in table:
            raise AssertionError(f"hf layout has no entry for parameter {'/'.join(key)}")
        pieces = table.pop(key)
        n_stack, first = 0, pieces
        while isinstance(first, tuple):
            n_stack, first = n_stack + 1, first[0]
        _split_groups(first.inner_shape, spec.shape[n_stack:])  # the table and param_specs agree, or fail here
        leaves.append(LeafMap(key, spec.shape, n_stack, pieces))
    if table:
        raise AssertionError(f"hf layout maps parameters that param_specs does not declare: {sorted(table)}")
    return leaves, duplicates


# ------------------------------------------------------------------------------------------ block reads

def _split_groups(inner: Sequence[int], piece: Sequence[int]) -> list[list[int]]:
    """For each inner axis, the consecutive piece axes it splits into (inner [4, 6] -> piece [4, 2, 3]: [[0], [1, 2]])."""
    groups, k = [], 0
    for size in inner:
        group, prod = [k], piece[k] if k < len(piece) else 0
        k += 1
        while prod < size and k < len(piece):
            group.append(k)
            prod, k = prod * piece[k], k + 1
        if prod != size:
            raise AssertionError(f"inner shape {tuple(inner)} does not split into {tuple(piece)}")
        groups.append(group)
    if k != len(piece):
        raise AssertionError(f"inner shape {tuple(inner)} does not split into {tuple(piece)}")
    return groups


def piece_block(t: HFTensor, piece_shape: Sequence[int], ranges: Ranges,
                read: Callable[[HFTensor, Ranges], np.ndarray]) -> np.ndarray:
    """Block `ranges` of one piece, reading only a covering block of its HF tensor via read(t, hf_ranges)."""
    groups = _split_groups(t.inner_shape, piece_shape)
    inner = []
    for g in groups:
        rest = math.prod(piece_shape[i] for i in g[1:])
        a, b = ranges[g[0]]
        inner.append((a * rest, b * rest))
    hf = list(inner)
    if t.transpose:
        hf[-2], hf[-1] = hf[-1], hf[-2]
    if t.rows:
        hf[-2] = (hf[-2][0] + t.rows[0], hf[-2][1] + t.rows[0])
    x = read(t, hf)
    if t.transpose:
        x = np.swapaxes(x, -1, -2)
    split = [ranges[i][1] - ranges[i][0] if i == g[0] else piece_shape[i] for g in groups for i in g]
    keep = tuple(slice(None) if i == g[0] else slice(*ranges[i]) for g in groups for i in g)
    return x.reshape(split)[keep]


def leaf_block(leaf: LeafMap, ranges: Ranges, read: Callable[[HFTensor, Ranges], np.ndarray],
               dtype=np.float32) -> np.ndarray:
    """Block `ranges` ([start, stop) per axis) of a whole leaf, piece by piece, in `dtype`."""
    stack, inner = ranges[: leaf.n_stack], ranges[leaf.n_stack:]
    counts = tuple(b - a for a, b in stack)
    out = np.empty(counts + tuple(b - a for a, b in inner), dtype)
    piece_shape = leaf.shape[leaf.n_stack:]
    for idx in itertools.product(*(range(a, b) for a, b in stack)):
        local = tuple(i - a for i, (a, _) in zip(idx, stack))
        out[local] = piece_block(leaf.piece(idx), piece_shape, inner, read)
    return out


def to_hf(t: HFTensor, piece: np.ndarray) -> np.ndarray:
    """The HF tensor for one full piece of our leaf (the inverse of piece_block on the whole piece)."""
    if t.rows:
        raise ValueError(f"{t.name}: fused expert tensors are read-only; save writes per-expert tensors")
    x = piece.reshape(t.inner_shape)
    return np.swapaxes(x, -1, -2) if t.transpose else x
