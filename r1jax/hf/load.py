"""Load a local Hugging Face checkpoint directory into r1jax params, streaming: no host holds the whole model.

Every leaf is created with `jax.make_array_from_callback(shape, sharding, callback)`; the callback gets the index
of one shard and reads only the HF tensors (layers, experts) and the rows/columns that shard covers, dequantising
FP8 blocks on the way (layout.py, fp8.py). Shardings come from `param_shardings(cfg, mesh, rules)`, so a leaf
arrives already laid out for training and each host reads only its own shards. Peak host memory is one leaf's
local shards (each distinct block read once, however many local devices hold a replica of it).

Before any array is built the whole checkpoint is checked, so a bad checkpoint fails in a second with a message
naming the tensor: every tensor a parameter needs must exist with the expected shape (and an FP8 tensor its
scale), and every tensor in the checkpoint must be used, be a known duplicate, or match an `ignore` pattern.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.hf import fp8
from r1jax.hf.config import config_from_hf
from r1jax.hf.layout import HFTensor, LeafMap, hf_layout, leaf_block
from r1jax.hf.safetensors_io import CheckpointError, SafetensorsDir
from r1jax.models.config import ModelConfig
from r1jax.models.transformer import ParamSpec, abstract_params, param_shardings, param_specs
from r1jax.sharding import DEFAULT_RULES

# Tensors some checkpoints carry that are no parameter (old Llama exports store the RoPE table).
DEFAULT_IGNORE = (r"\.rotary_emb\.inv_freq$",)


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    with open(cfg_path) as f:
        return json.load(f)


def _check(reader: SafetensorsDir, t: HFTensor, what: str, block) -> list[str]:
    """Names consumed by HF tensor t (itself and any FP8 scale); errors name the tensor and what needed it."""
    if t.name not in reader:
        raise CheckpointError(f"tensor {t.name!r} (for {what}) not found in {reader.path}")
    got = reader.info(t.name).shape
    if got != t.shape:
        raise CheckpointError(f"tensor {t.name!r} (for {what}) in {reader.info(t.name).file} has shape {got}, "
                              f"expected {t.shape}")
    if fp8.is_fp8(reader, t.name):
        return [t.name, fp8.check_scale(reader, t.name, block)]
    return [t.name]


def check_checkpoint(reader: SafetensorsDir, leaves: list[LeafMap], duplicates: list[HFTensor], block,
                     ignore: Iterable[str]) -> None:
    """Every needed tensor present with its shape; nothing left over (see module docstring)."""
    used: set[str] = set()
    for leaf in leaves:
        for idx, t in leaf.items():
            used.update(_check(reader, t, f"parameter {leaf.label}{list(idx) if idx else ''}", block))
    for t in duplicates:
        if t.name in reader:  # shares its values with another tensor: its shape is checked, its values are not read
            used.update(_check(reader, t, "a copy of a shared tensor", block))
    patterns = [re.compile(p) for p in ignore]
    left = sorted(n for n in reader.names() if n not in used and not any(p.search(n) for p in patterns))
    if left:
        raise CheckpointError(f"{reader.path}: {len(left)} tensor(s) map to no parameter, e.g. {left[:5]}; "
                              "pass ignore=[regex, ...] to skip them knowingly")


def load_hf_checkpoint(path: str, *, dtype: str = "float32", mesh=None, rules=None, mtp: bool | None = None,
                       ignore: Iterable[str] = DEFAULT_IGNORE) -> tuple[ModelConfig, dict]:
    """(cfg, params) from an HF checkpoint directory (config.json + one or more .safetensors, with or without
    model.safetensors.index.json).

    dtype: parameter dtype (cfg.param_dtype is set to it). mesh/rules: shard every leaf by
      `param_shardings(cfg, mesh, rules)` (rules default to r1jax.sharding.DEFAULT_RULES); no mesh: one device.
    mtp: load the multi-token-prediction layer (layer num_hidden_layers). None: when config.json asks for one and
      the checkpoint holds its tensors (transformers drops that layer when it saves, so its checkpoints have
      none; the returned cfg then has mtp_depth=0). True: require it. False: skip it and its tensors.
    ignore: regexes (re.search) of checkpoint tensors to leave unread instead of failing on them.
    """
    hf = read_hf_config(path)
    cfg = config_from_hf(hf).replace(param_dtype=jnp.dtype(dtype).name)
    reader = SafetensorsDir(path)
    mtp_prefix = f"model.layers.{cfg.n_layers}."
    if mtp and not cfg.mtp_depth:
        raise CheckpointError(f"{path}: mtp=True but config.json has num_nextn_predict_layers = 0")
    ignore = list(ignore) + (["^" + re.escape(mtp_prefix)] if mtp is False else [])  # skipped knowingly
    if mtp is None:
        mtp = bool(cfg.mtp_depth) and any(n.startswith(mtp_prefix) for n in reader.names())
    cfg = cfg.replace(mtp_depth=int(mtp))
    block = fp8.block_size(hf)
    fused = any(n.endswith("mlp.experts.gate_up_proj") for n in reader.names())
    leaves, duplicates = hf_layout(cfg, fused_experts=fused)
    check_checkpoint(reader, leaves, duplicates, block, ignore)

    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = [device] * len(leaves)
    else:
        shardings = jax.tree.leaves(param_shardings(cfg, mesh, DEFAULT_RULES if rules is None else rules))

    def read(t: HFTensor, ranges):
        return fp8.read_float32(reader, t.name, ranges, block)

    dtypes = [np.dtype(a.dtype) for a in jax.tree.leaves(abstract_params(cfg))]  # per-leaf storage dtype
    arrays = []
    for leaf, sharding, out_dtype in zip(leaves, shardings, dtypes):
        blocks: dict = {}  # devices holding the same replica of a block share one read and one host buffer

        def callback(index, leaf=leaf, blocks=blocks, out_dtype=out_dtype):
            ranges = tuple(index_to_ranges(index, leaf.shape))
            if ranges not in blocks:
                blocks[ranges] = leaf_block(leaf, ranges, read, out_dtype)
            return blocks[ranges]

        arrays.append(jax.make_array_from_callback(leaf.shape, sharding, callback))
    treedef = jax.tree.structure(param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
    return cfg, jax.tree.unflatten(treedef, arrays)


def index_to_ranges(index, shape) -> list[tuple[int, int]]:
    """A shard index (tuple of slices, possibly shorter than the rank) -> [start, stop) per axis."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    out = []
    for s, n in zip(index, shape):
        a, b, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((a, b))
    return out
