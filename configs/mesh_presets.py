"""Mesh and sharding-rule presets for DeepSeek-V3 671B on TPU slices (docs/sharding.md has the measured numbers).

A preset is a `config.mesh` block (the format of configs/common.py `mesh()`): ICI axis sizes per slice, DCN sizes
across slices, and the logical -> mesh axis rules. The real-scale 671B stage configs use `V5P_671B` (the plan
docs/sharding.md measured) through `mesh_block=get(V5P_671B)`; `python -m r1jax.aot --config ... --mesh_preset NAME`
checks another preset against a config without editing it.

The plan (per slice; slices are pure data parallel over DCN, each holds the whole model state):
  * experts: expert parallelism (EP) over `expert`, the all-to-all exchange of r1jax/models/moe.py; each expert's
    D dimension FSDP over `fsdp`, its width F over `tensor` when there is one.
  * everything else: FSDP over `fsdp` on the model dimension D, tensor parallelism over `tensor` on heads, MLP width
    and vocabulary, and their other axis FSDP over `expert` (MLA's q_lora / kv_lora, or heads / MLP / vocab when
    there is no tensor axis). `embed` itself cannot take `expert`: the expert weights' D axis has the same logical
    name. Without a tensor axis MLA's wq_b / wkv_b ([Q or C, N, H]: no `embed`) are only split 8 ways.
  * activations: rows over data x fsdp x expert (the EP group exchanges tokens, so every device of it holds
    different rows), heads / vocabulary over `tensor`; with tensor > 1 the residual stream between blocks is also
    split over `tensor` on D (what Megatron calls sequence parallelism, on D), so the per-layer remat checkpoint
    is 1/tensor of a row.
  * remat: the model's "full" policy (nothing saved inside a block; the block input is the only per-layer
    residual), the only one that leaves room for 671B's optimizer state.
  * the GRPO reference model: the same shardings as the policy's params (r1jax.rl.trainer.copy_params).
Rows per (micro-)batch must be a multiple of data x fsdp x expert (the SFT step checks it).
"""

from __future__ import annotations

import ml_collections as mlc

from r1jax.sharding import DEFAULT_RULES


def mesh_block(*, fsdp: int = -1, expert: int = 1, tensor: int = 1, data: int = 1, dcn_data: int = -1,
               dcn_fsdp: int = 1) -> mlc.ConfigDict:
    """config.mesh for FSDP x EP x TP inside a slice and data (or FSDP) parallelism across slices."""
    rules = dict(DEFAULT_RULES)
    if expert > 1 and tensor == 1:  # weights' heads / MLP / vocab axes: FSDP over `expert` (gathered for use)
        rules.update(heads="expert", mlp="expert", vocab="expert")
    if expert > 1 and tensor > 1:  # MLA's low-rank axes and the MLP / vocab over `expert` too
        rules.update(q_lora="expert", kv_lora="expert", mlp=("tensor", "expert"), vocab=("tensor", "expert"))
    if tensor > 1:
        rules["act_embed"] = "tensor"  # the residual stream between blocks: D over tensor
        rules["cache_batch"] = ("data", "fsdp", "expert", "tensor")  # the decode cache over every chip
    rules = {k: tuple(v) if isinstance(v, (tuple, list)) else ((v,) if v else ()) for k, v in rules.items()}
    return mlc.ConfigDict({
        "ici": {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor},
        "dcn": {"data": dcn_data, "fsdp": dcn_fsdp, "expert": 1, "tensor": 1},
        "rules": rules,
    })


PRESETS = {
    # v5p-512 (256 chips, 95 GiB): rows over fsdp 32 x expert 8 = 256; 32 experts per chip group of 8.
    # For batches of >= 256 rows per micro-batch (e.g. seq 4096 x 256).
    "v5p_fsdp_ep8": lambda: mesh_block(fsdp=-1, expert=8),
    # v5p-512 with tensor parallelism 8: rows over fsdp 4 x expert 8 = 32, so a micro-batch of 32 rows of 32k
    # tokens (configs/sft.py) shards; heads, MLP, vocab and each expert's width over tensor.
    "v5p_fsdp_ep8_tp8": lambda: mesh_block(fsdp=-1, expert=8, tensor=8),
    # v6e-256 (32 GiB per chip): one slice cannot hold 671B's fp32 master weights + Adam (~42 GB per chip fully
    # sharded); two slices with FSDP over DCN halve it. Tensor 4 keeps the vocab / heads activations in budget.
    "v6e_fsdp_ep8_tp4_dcn_fsdp": lambda: mesh_block(fsdp=-1, expert=8, tensor=4, dcn_data=1, dcn_fsdp=-1),
}


# The plan of docs/sharding.md: what every real-scale 671B stage config uses.
V5P_671B = "v5p_fsdp_ep8_tp8"


def get(name: str) -> mlc.ConfigDict:
    if name not in PRESETS:
        raise KeyError(f"unknown mesh preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
