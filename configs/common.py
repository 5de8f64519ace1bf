"""Shared building blocks of the stage configs: model, mesh, optimizer, training and data blocks.

Every stage config file has `get_config(arg=None)` (arg picks a preset; `tiny` runs on a 2-core CPU) and
is run with `python -m r1jax.main --config configs/<file>.py[:preset] --workdir DIR [--config.a.b=value]`.
Configs are locked: overriding a field that does not exist is an error. Fields that are None by default
are typed placeholders, so `--config.init_from=/path` and `--config.model.overrides.n_layers=2` work.
"""

from __future__ import annotations

import dataclasses

import ml_collections as mlc
from ml_collections.config_dict import placeholder

from r1jax.models import get_preset
from r1jax.sharding import DEFAULT_RULES


def model(preset: str, **overrides) -> mlc.ConfigDict:
    """config.model: a ModelConfig preset plus overrides. Every ModelConfig field is present in
    `overrides` (None = the preset's value), typed like the preset's value, so a typo is an error."""
    base = get_preset(preset)
    fields = {f.name: placeholder(type(getattr(base, f.name))) for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise KeyError(f"unknown ModelConfig field(s) {unknown} in overrides of preset {preset!r}")
    block = mlc.ConfigDict({"preset": preset, "overrides": fields})
    for name, value in overrides.items():
        block.overrides[name] = value
    return block


# The tiny world's SentencePiece tokenizer needs ~530 pieces for its characters and byte fallback alone,
# more than the tiny presets' 512: every tiny config uses this vocabulary (init_from needs equal shapes).
TINY_VOCAB = 1024


# MLA sizes of the tiny world's MoE model. The tiny_moe preset's (q/kv LoRA 32, nope 16, rope 8, v 16) with the
# 0.02 init never learned to copy the question's operands into its worked steps within the pretraining budget;
# wider MLA projections and an init scaled to d_model = 64 (0.1 ~ 0.8 / sqrt(d)) do (docs/results.md, measured).
TINY_MLA = dict(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                init_std=0.1)


def tiny_model(preset: str = "tiny_moe", **overrides) -> mlc.ConfigDict:
    """config.model of the tiny presets (2-core CPU), with the tiny world's vocabulary (and TINY_MLA for tiny_moe)."""
    sizes = TINY_MLA if preset == "tiny_moe" else {}
    return model(preset, **{"vocab_size": TINY_VOCAB, **sizes, **overrides})


def mesh(**ici) -> mlc.ConfigDict:
    """config.mesh: ICI axis sizes per slice (default: everything FSDP), DCN sizes across slices (default:
    data parallel over slices) and the logical -> mesh axis rules (tuples of mesh axes; () = replicated)."""
    sizes = {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}
    sizes.update(ici)
    rules = {name: tuple(axes) if isinstance(axes, (tuple, list)) else ((axes,) if axes else ())
             for name, axes in DEFAULT_RULES}
    return mlc.ConfigDict({"ici": sizes, "dcn": {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}, "rules": rules})


def optimizer(lr: float, warmup_steps: int, *, schedule: str = "cosine", end_lr_ratio: float = 0.1,
              b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
              clip_norm: float = 1.0, warmup_ratio: float = 0.0, moment_dtype: str = "float32") -> mlc.ConfigDict:
    """config.optimizer: AdamW, linear warmup then `schedule` decay to lr * end_lr_ratio; clip_norm 0 = off.
    warmup_ratio > 0 replaces warmup_steps by that share of train.steps (follows an overridden train.steps).
    moment_dtype: the dtype AdamW's moments are stored in ("bfloat16" as DeepSeek-V3 does, r1jax/train/optimizer.py)."""
    return mlc.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, schedule=schedule,
                               end_lr_ratio=end_lr_ratio, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                               clip_norm=clip_norm, moment_dtype=moment_dtype))


def train(steps: int, *, micro_batches: int = 1, log_every: int = 10, eval_every: int = 0,
          checkpoint_every: int = 1000, keep_checkpoints: int = 3, async_checkpoints: bool = True,
          progress: bool = True) -> mlc.ConfigDict:
    """config.train: `steps` optimizer updates (the LR schedule's length), each over `micro_batches`
    micro-batches of the global batch; eval every `eval_every` steps (0 = never)."""
    return mlc.ConfigDict(dict(steps=steps, micro_batches=micro_batches, log_every=log_every, eval_every=eval_every,
                               checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                               async_checkpoints=async_checkpoints, progress=progress))


def sft_data(*, seq_len: int, batch_size: int, train_files: tuple = (), eval_files: tuple = (),
             tokenizer: str | None = None, text_field: str | None = None, prompt_field: str | None = "prompt",
             response_field: str | None = "response", messages_field: str | None = None, system_field: str | None = None,
             template: str = "chat", num_epochs: int | None = None, pack: bool = True,
             eval_batches: int = 8, eval_holdout: int = 0, tiny_world: bool = False,
             world_files: tuple = (), world_seed: int = 0) -> mlc.ConfigDict:
    """config.data for the SFT stage (pretraining = SFT with `text_field` set: every token trained).

    train_files / eval_files: JSONL / Parquet / ArrayRecord; eval_holdout > 0 with no eval_files holds
      out that many shuffled training records as the eval split (small datasets).
    tokenizer: a SentencePiece .model or an HF tokenizer dir; None = the init_from checkpoint's, else
      (tiny world) train one on the world.
    Record fields (None = not read): prompt_field + response_field, or messages_field (a conversation; SFT
      trains its assistant turns) with an optional system_field, or text_field (every token trained).
    batch_size: global rows of seq_len tokens per optimizer step (packed). num_epochs None = repeat.
    skip_malformed: skip (and count) bad records instead of failing; max_skips_in_a_row: a search that skips this
      many records in a row (or every record of two passes over the data) ends the run with the counts.
    tiny_world: with no train_files, write the tiny synthetic world into WORKDIR/world and train on its
      `world_files` (names without .jsonl).
    """
    return mlc.ConfigDict(dict(
        train_files=tuple(train_files), eval_files=tuple(eval_files),
        tokenizer=tokenizer if tokenizer is not None else placeholder(str),
        seq_len=seq_len, batch_size=batch_size,
        text_field=text_field if text_field is not None else placeholder(str),
        prompt_field=prompt_field if prompt_field is not None else placeholder(str),
        response_field=response_field if response_field is not None else placeholder(str),
        messages_field=messages_field if messages_field is not None else placeholder(str),
        system_field=system_field if system_field is not None else placeholder(str), template=template,
        num_epochs=num_epochs if num_epochs is not None else placeholder(int),
        shuffle=True, pack=pack, skip_malformed=True, max_skips_in_a_row=10_000, eval_batches=eval_batches,
        eval_holdout=eval_holdout,
        tiny_world=tiny_world, world_files=tuple(world_files), world_seed=world_seed))


def sft_config(*, model_block, data, optimizer_block, train_block, mesh_block=None, init_from: str | None = None,
               seed: int = 0) -> mlc.ConfigDict:
    """A complete config for the `sft` stage (pretrain, cold start, 800k SFT and distillation use it)."""
    return mlc.ConfigDict(dict(
        stage="sft", seed=seed, model=model_block, mesh=mesh_block if mesh_block is not None else mesh(),
        init_from=init_from if init_from is not None else placeholder(str),
        data=data, optimizer=optimizer_block, train=train_block))


def tiny_train(steps: int, **kw) -> mlc.ConfigDict:
    """Training settings for the 2-core CPU presets: frequent logs, small eval, a few checkpoints."""
    return train(steps, **{"log_every": 10, "eval_every": 50, "checkpoint_every": 100, "keep_checkpoints": 2, **kw})


# ------------------------------------------------------------------------------------------------ :hf presets
# The `:hf` preset of a stage config runs a Hugging Face checkpoint (--config.init_from=DIR) on one TPU host
# (v5p-8 / v6e-8). The checkpoint's config.json gives the architecture (r1jax/hf/config.py), its tokenizer files the
# tokenizer and chat template; the model block below gives only the training fields (dtypes, remat, the attention
# and output-head chunks) and the mesh is FSDP over every device (expert 1: the students are dense). Left at this
# placeholder path, init_from fails before anything heavy runs.
HF_CHECKPOINT = "/path/to/HF_CHECKPOINT"
CHECKPOINT_TEMPLATE = "checkpoint"  # data.template: the checkpoint's own chat template (r1jax/data/chat.py)


def hf_model() -> mlc.ConfigDict:
    """config.model of the :hf presets: a dense Qwen2.5 preset for the training fields (the size is the
    checkpoint's)."""
    return model("qwen2.5_math_1.5b")


def hf_sft_config(*, train_files: tuple = ("/path/to/train.jsonl",), steps: int = 2000) -> mlc.ConfigDict:
    """The :hf preset of the SFT stages (cold start, 800k SFT, distillation): open-r1's distillation recipe
    (huggingface/open-r1 recipes/R1-Distill-Qwen-7B/sft/config_v00.00.yaml, Qwen2.5-7B on OpenR1-Math-220k):
    lr 1e-5, cosine down to 10% (cosine_with_min_lr, min_lr_rate 0.1) after 3% warmup, gradient clipping 0.2,
    AdamW with transformers' defaults (betas 0.9 / 0.999, no weight decay), 32768-token sequences, 128 per step
    (2 per GPU x 8 GPUs x 8 accumulation), 5 epochs, conversations in `messages` rendered with the checkpoint's
    chat template. Departure: r1jax packs samples into the 128 rows (open-r1: packing false, one sample per row),
    so a step holds more samples when they are short. Set train.steps to the run's length (the schedule's);
    the run also ends when the 5 epochs do. 16 micro-batches of 8 rows: one row per chip on v6e-8, two on v5p-8."""
    return sft_config(
        model_block=hf_model(), init_from=HF_CHECKPOINT,
        data=sft_data(seq_len=32768, batch_size=128, train_files=train_files, prompt_field=None,
                      response_field=None, messages_field="messages", template=CHECKPOINT_TEMPLATE, num_epochs=5,
                      eval_batches=0),
        optimizer_block=optimizer(1e-5, 0, warmup_ratio=0.03, schedule="cosine", end_lr_ratio=0.1,
                                  b2=0.999, weight_decay=0.0, clip_norm=0.2),
        train_block=train(steps, micro_batches=16, log_every=1, checkpoint_every=200))
