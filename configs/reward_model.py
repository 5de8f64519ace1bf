"""Reward model (docs/reference.md §4.5): the decoder with a scalar head on the last token plus a weight on its own
mean log-likelihood of what it scores, Bradley-Terry on preference pairs; one run per aspect: helpful (scores the
final summary only) or harmless (scores the whole response).

    python -m r1jax.main --config configs/reward_model.py:tiny --workdir /tmp/rm_helpful
    python -m r1jax.main --config configs/reward_model.py:tiny --workdir /tmp/rm_harmless --config.rm.aspect=harmless
    python -m r1jax.main --config configs/reward_model.py --workdir gs://BUCKET/rm_helpful \
        --config.init_from=/path/to/DeepSeek-V3-Base --config.data.train_files=/path/to/preferences.jsonl
    python -m r1jax.main --config configs/reward_model.py:hf --workdir W --config.init_from=DIR \
        --config.data.train_files=F

tiny: tiny_moe on the tiny world's preferences_train / preferences_heldout (their `kind` field is the aspect),
from scratch unless --config.init_from names a tiny pretrain run (configs/r1.py starts it from the base model).
Default: DeepSeek-V3 671B from the base checkpoint. The R1 paper does not describe its reward models beyond
the two aspects (they come from the DeepSeek-V3 pipeline): sizes, data and optimizer below are *unverified*.
hf: a Hugging Face checkpoint on one TPU host with TRL's reward-modeling example (huggingface/trl
examples/scripts/reward_modeling.py, Qwen2-0.5B-Instruct on UltraFeedback): lr 1e-5, linearly to 0 without warmup
(transformers' default schedule), 8 pairs per step, 2048 tokens, 1 epoch, AdamW with transformers' defaults (betas
0.9 / 0.999, no weight decay, clipping 1.0); the prompt in the checkpoint's chat template. Set train.steps to the
pairs / 8 of one epoch.
"""

import ml_collections as mlc
from ml_collections.config_dict import placeholder

from configs import common, mesh_presets


def data_block(*, seq_len: int, batch_size: int, train_files: tuple = (), eval_files: tuple = (),
               tokenizer: str | None = None, prompt_field: str = "question", template: str = "chat",
               tiny_world: bool = False, world_files: tuple = ("preferences_train",),
               eval_world_files: tuple = ("preferences_heldout",), world_seed: int = 0) -> mlc.ConfigDict:
    """config.data: preference files (prompt_field, chosen, rejected[, kind]); batch_size pairs per step; each
    side is template(prompt_field) + the scored part, cut to its last seq_len tokens."""
    return mlc.ConfigDict(dict(
        train_files=tuple(train_files), eval_files=tuple(eval_files),
        tokenizer=tokenizer if tokenizer is not None else placeholder(str), seq_len=seq_len, batch_size=batch_size,
        prompt_field=prompt_field, template=template, tiny_world=tiny_world, world_files=tuple(world_files),
        eval_world_files=tuple(eval_world_files), world_seed=world_seed))


def rm_config(*, model_block, data, aspect: str, optimizer_block, train_block, mesh_block=None,
              init_from: str | None = None, kinds: tuple = (), likelihood_init: float = 1.0,
              seed: int = 0) -> mlc.ConfigDict:
    """A complete config for the `reward_model` stage. rm.kinds: the pair kinds trained on (empty = [aspect]);
    rm.likelihood_init: the starting weight of the decoder's mean log-likelihood of the scored part in the score
    (r1jax/rl/reward_model.py; 0 = a plain last-token head)."""
    return mlc.ConfigDict(dict(
        stage="reward_model", seed=seed, model=model_block,
        mesh=mesh_block if mesh_block is not None else common.mesh(),
        init_from=init_from if init_from is not None else placeholder(str),
        rm=dict(aspect=aspect, kinds=tuple(kinds), likelihood_init=float(likelihood_init)), data=data,
        optimizer=optimizer_block, train=train_block))


def get_config(arg=None):
    if arg == "tiny":
        return rm_config(
            model_block=common.tiny_model("tiny_moe", bias_update_rate=0.0),
            # the tiny world's pairs are <= 84 tokens with their EOS (seq_len 96: right padding changes no score).
            # helpfulness on the pipeline's base: 85.8% held-out; 66.5% with likelihood_init=0 (docs/results.md)
            data=data_block(seq_len=96, batch_size=16, template="raw", tiny_world=True),
            aspect="helpful",
            optimizer_block=common.optimizer(1e-3, 10, end_lr_ratio=0.1, weight_decay=0.0),
            train_block=common.train(120, log_every=10, eval_every=40, checkpoint_every=40, keep_checkpoints=2))
    if arg == "hf":
        return rm_config(
            model_block=common.hf_model(), init_from=common.HF_CHECKPOINT,
            data=data_block(seq_len=2048, batch_size=8, train_files=("/path/to/preferences_train.jsonl",),
                            prompt_field="prompt", template=common.CHECKPOINT_TEMPLATE),
            aspect="helpful",
            optimizer_block=common.optimizer(1e-5, 0, schedule="linear", end_lr_ratio=0.0, b2=0.999,
                                             weight_decay=0.0, clip_norm=1.0),
            train_block=common.train(1000, log_every=10, checkpoint_every=200))
    if arg not in (None, ""):
        raise ValueError(f"configs/reward_model.py: unknown preset {arg!r}; expected '', 'tiny' or 'hf'")
    return rm_config(
        model_block=common.model("deepseek_v3_671b", bias_update_rate=0.0, mtp_depth=0),
        mesh_block=mesh_presets.get(mesh_presets.V5P_671B),
        init_from="/path/to/DeepSeek-V3-Base",
        data=data_block(seq_len=8192, batch_size=256, train_files=("/path/to/preferences_train.jsonl",),
                        eval_files=("/path/to/preferences_heldout.jsonl",)),  # *unverified*
        aspect="helpful",
        optimizer_block=common.optimizer(1e-6, 50, schedule="cosine", end_lr_ratio=0.1, weight_decay=0.0),
        train_block=common.train(2000, log_every=10, eval_every=200, checkpoint_every=200))  # *unverified*: all of it
