"""SFT on the ~800k mix (docs/reference.md §4.4): the *base* model, 2 epochs.

    python -m r1jax.main --config configs/sft.py:tiny --workdir /tmp/sft
    python -m r1jax.main --config configs/sft.py --workdir gs://BUCKET/sft \
        --config.init_from=/path/to/DeepSeek-V3-Base --config.data.train_files=/path/to/sft_800k.jsonl
    python -m r1jax.main --config configs/sft.py:hf --workdir W --config.init_from=DIR --config.data.train_files=F

Presets: default = DeepSeek-V3 671B from its HF base checkpoint; tiny = tiny_moe on the tiny world's cold-start
and non-reasoning sets (trained from scratch unless --config.init_from names a tiny pretrain run); hf = any Hugging
Face checkpoint on one TPU host, conversations in `messages`, open-r1's distillation SFT recipe
(configs/common.py hf_sft_config).
"""

from configs import common, mesh_presets


def get_config(arg=None):
    if arg == "tiny":
        return common.sft_config(
            model_block=common.tiny_model("tiny_moe"),
            data=common.sft_data(seq_len=256, batch_size=8, template="raw", num_epochs=None, eval_batches=4,
                                 eval_holdout=48, tiny_world=True, world_files=("cold_start", "non_reasoning")),
            optimizer_block=common.optimizer(3e-3, 20, end_lr_ratio=0.1, weight_decay=0.0),
            train_block=common.tiny_train(200))
    if arg == "hf":
        return common.hf_sft_config()
    if arg not in (None, ""):
        raise ValueError(f"configs/sft.py: unknown preset {arg!r}; expected '', 'tiny' or 'hf'")
    # Real scale. The paper gives the data (~600k reasoning + ~200k non-reasoning samples) and 2 epochs;
    # batch size, sequence length and learning rate are not published: *unverified* choices below.
    return common.sft_config(
        model_block=common.model("deepseek_v3_671b", bias_update_rate=0.0, mtp_loss_weight=0.1),
        mesh_block=mesh_presets.get(mesh_presets.V5P_671B),
        init_from="/path/to/DeepSeek-V3-Base",  # HF directory of the base model (docs/reference.md §4.4)
        data=common.sft_data(seq_len=32768, batch_size=256, train_files=("/path/to/sft_800k.jsonl",),
                             eval_files=("/path/to/sft_eval.jsonl",), template="chat", num_epochs=2,
                             eval_batches=16),  # seq_len, batch_size *unverified*
        optimizer_block=common.optimizer(5e-6, 100, schedule="cosine", end_lr_ratio=0.1, weight_decay=0.1),  # *unverified*
        train_block=common.train(2000, micro_batches=8, log_every=1, eval_every=200, checkpoint_every=200))
        # 2000 steps ~ 2 epochs of 800k packed samples at ~10k tokens each: *unverified*; training also
        # stops when the 2 epochs of data end.
