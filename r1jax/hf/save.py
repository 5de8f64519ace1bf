"""Write r1jax params as a Hugging Face checkpoint that `transformers` (and vLLM / SGLang) load.

Layout: the released-checkpoint names (per-expert `mlp.experts.{j}.*`, which transformers 5 fuses on load and
writes itself on save_pretrained), fp32 or bf16, sharded with `model.safetensors.index.json` past
max_shard_bytes. With MTP the extra layer `model.layers.{num_hidden_layers}` is written as in the released
DeepSeek-V3 checkpoint, including its copies of the embedding and output head (`embed_tokens`,
`shared_head.head`) that MTP loaders expect; transformers itself skips that layer.

With `tokenizer=` (the HF checkpoint directory the model came from, or any directory holding its tokenizer files)
the directory is complete, loadable as-is by transformers, vLLM and SGLang: the tokenizer files and chat template
are copied unchanged (TOKENIZER_FILES), config.json gets bos/eos/pad_token_id, and generation_config.json (the
source's, sampling defaults kept) gets every EOS id the source stops on (r1jax.data.tokenizer.HFTokenizer.eos_ids).

Memory stays bounded by one HF tensor: each is gathered from its (possibly sharded) leaf with a jitted dynamic
index, fetched with jax.device_get, converted and written before the next. Single process: every shard must be
addressable from this host (gather on one host first for a multi-host mesh).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.hf.config import config_to_hf
from r1jax.hf.layout import FP32_TENSORS, HFTensor, LeafMap, hf_layout, to_hf
from r1jax.hf.safetensors_io import CheckpointError, write_dir
from r1jax.models.config import ModelConfig


@jax.jit
def _take(x, idx):
    """x[idx[0], idx[1], ...] with traced indices: one compile per leaf shape, not per layer/expert."""
    return x[tuple(idx[i] for i in range(idx.shape[0]))]


def _fetch(x, idx: tuple[int, ...]) -> np.ndarray:
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            raise CheckpointError("save_hf_checkpoint needs every shard on this host; gather a multi-host array "
                                  "to one host first")
        x = _take(x, jnp.asarray(idx, jnp.int32)) if idx else x
        return np.asarray(jax.device_get(x))
    return np.asarray(x)[idx]


def _natural(name: str):
    """Sort key putting layer 10 after layer 9."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# What a checkpoint's tokenizer is made of, across tokenizer kinds and transformers versions; copied unchanged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def special_token_ids(tokenizer_dir: str) -> dict:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} of a checkpoint's tokenizer, as config.json and
    generation_config.json spell them: eos_token_id a list when it stops on several ids; no BOS: None."""
    from r1jax.data.tokenizer import HFTokenizer  # noqa: PLC0415

    tok = HFTokenizer(tokenizer_dir)
    eos = list(tok.eos_ids)
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": tok.pad_id}


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of checkpoint directory `src` (TOKENIZER_FILES that exist) into `dst`; returns
    their names. Raises CheckpointError when `src` has no tokenizer.json (not an HF tokenizer)."""
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        raise CheckpointError(f"{src}: no tokenizer.json; expected the Hugging Face checkpoint directory the model "
                              "came from (a SentencePiece .model of the tiny runs cannot be exported as one)")
    os.makedirs(dst, exist_ok=True)
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for name in names:
        if os.path.abspath(os.path.join(src, name)) != os.path.abspath(os.path.join(dst, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return names


def _generation_config(tokenizer_dir: str, ids: dict) -> dict:
    """The source's generation_config.json (sampling defaults and all) with the special-token ids set; its own EOS
    ids keep their order, the tokenizer's EOS joins them when missing."""
    path = os.path.join(tokenizer_dir, "generation_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    own = config.get("eos_token_id")
    own = [] if own is None else own if isinstance(own, list) else [own]
    new = ids["eos_token_id"] if isinstance(ids["eos_token_id"], list) else [ids["eos_token_id"]]
    eos = list(dict.fromkeys(own + new))
    config.update({k: v for k, v in ids.items() if v is not None}, eos_token_id=eos if len(eos) > 1 else eos[0])
    return config


def save_hf_checkpoint(path: str, cfg: ModelConfig, params, *, dtype: str = "float32",
                       max_shard_bytes: int = 5 * 2**30, tokenizer: str | None = None) -> list[str]:
    """Write config.json and safetensors for (cfg, params) into directory `path`; returns the files written.
    dtype: "float32" or "bfloat16" for the weights (the router's selection bias stays fp32).
    tokenizer: the HF checkpoint directory whose tokenizer files, chat template, special-token ids and
      generation_config.json go along (see the module docstring); None writes the model alone."""
    out_dtype = jnp.dtype(dtype)
    if out_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"save_hf_checkpoint: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    ids = special_token_ids(tokenizer) if tokenizer is not None else {}
    generation = _generation_config(tokenizer, ids) if tokenizer is not None else None
    if generation is not None:
        ids["eos_token_id"] = generation["eos_token_id"]  # config.json stops on the same ids
    if tokenizer is not None:
        from r1jax.data.tokenizer import HFTokenizer  # noqa: PLC0415

        n_tokens = HFTokenizer(tokenizer).vocab_size
        if n_tokens > cfg.vocab_size:
            raise CheckpointError(f"tokenizer {tokenizer} has {n_tokens} tokens, more than the model's vocab_size "
                                  f"{cfg.vocab_size}")
    leaves, _ = hf_layout(cfg)
    flat = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    by_path = {leaf.path: leaf for leaf in leaves}
    missing = [leaf.label for leaf in leaves if leaf.path not in flat]
    extra = ["/".join(p) for p in flat if p not in by_path]
    if missing or extra:
        raise CheckpointError(f"params do not match cfg: missing {missing[:5]}, unexpected {extra[:5]}")
    for leaf in leaves:
        if tuple(flat[leaf.path].shape) != leaf.shape:
            raise CheckpointError(f"param {leaf.label} has shape {tuple(flat[leaf.path].shape)}, cfg says {leaf.shape}")

    jobs: list[tuple[str, LeafMap, tuple[int, ...], HFTensor]] = []
    for leaf in leaves:
        jobs += [(t.name, leaf, idx, t) for idx, t in leaf.items()]
    if cfg.mtp_depth:  # the released layout's copies of the shared embedding / head
        pre = f"model.layers.{cfg.n_layers}."
        head = by_path[("embed",)] if cfg.tie_embeddings else by_path[("lm_head",)]
        jobs += [(pre + "embed_tokens.weight", by_path[("embed",)], (), by_path[("embed",)].pieces),
                 (pre + "shared_head.head.weight", head, (), head.pieces)]
    jobs.sort(key=lambda j: _natural(j[0]))

    def tensor_dtype(name):
        return np.dtype(np.float32) if name.endswith(FP32_TENSORS) else np.dtype(out_dtype)

    entries = [(name, t.shape, tensor_dtype(name)) for name, _, _, t in jobs]

    def produce(i):
        name, leaf, idx, t = jobs[i]
        piece = _fetch(flat[leaf.path], idx).astype(np.float32)
        return to_hf(t, piece).astype(tensor_dtype(name))

    os.makedirs(path, exist_ok=True)
    files = write_dir(path, entries, produce, max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config_to_hf(cfg, str(out_dtype)), **ids}, f, indent=2)
    files.append("config.json")
    if tokenizer is not None:
        files += copy_tokenizer_files(tokenizer, path)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        files.append("generation_config.json")
    return files
