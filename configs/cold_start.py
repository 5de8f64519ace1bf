"""Cold start (docs/reference.md §4.2): SFT the base model on thousands of long-CoT samples in the readable
format `<|reasoning|>...<|summary|>...`, before reasoning-oriented RL.

    python -m r1jax.main --config configs/cold_start.py:tiny --workdir /tmp/cold_start \
        --config.init_from=/tmp/pt
    python -m r1jax.main --config configs/cold_start.py:hf --workdir W --config.init_from=DIR \
        --config.data.train_files=F

tiny: tiny_moe on the tiny world's cold_start.jsonl (init_from a tiny pretrain run; from scratch if unset).
Default: DeepSeek-V3 671B from the HF base checkpoint. hf: any Hugging Face base checkpoint on one TPU host,
long-CoT conversations in `messages`, open-r1's distillation SFT recipe (configs/common.py hf_sft_config).
"""

from configs import common, mesh_presets


def get_config(arg=None):
    if arg == "tiny":
        return common.sft_config(
            model_block=common.tiny_model("tiny_moe"),
            data=common.sft_data(seq_len=256, batch_size=8, template="raw", eval_batches=4, eval_holdout=40,
                                 tiny_world=True, world_files=("cold_start",)),
            optimizer_block=common.optimizer(1e-3, 10, end_lr_ratio=0.1, weight_decay=0.0),
            train_block=common.tiny_train(150))
    if arg == "hf":  # thousands of samples: the 5 epochs end the run long before 2000 steps
        return common.hf_sft_config(train_files=("/path/to/cold_start.jsonl",))
    if arg not in (None, ""):
        raise ValueError(f"configs/cold_start.py: unknown preset {arg!r}; expected '', 'tiny' or 'hf'")
    # The paper says "thousands" of samples and nothing about the optimizer: lr, batch, length and
    # epochs below are *unverified* choices (2 epochs as in the later 800k SFT).
    return common.sft_config(
        model_block=common.model("deepseek_v3_671b", bias_update_rate=0.0, mtp_loss_weight=0.1),
        mesh_block=mesh_presets.get(mesh_presets.V5P_671B),
        init_from="/path/to/DeepSeek-V3-Base",  # HF directory of the base model
        data=common.sft_data(seq_len=32768, batch_size=64, train_files=("/path/to/cold_start.jsonl",),
                             template="chat", num_epochs=2, eval_holdout=0, eval_batches=0),
        optimizer_block=common.optimizer(5e-6, 10, schedule="cosine", end_lr_ratio=0.1),  # *unverified*
        train_block=common.train(100, micro_batches=8, log_every=1, checkpoint_every=50))
