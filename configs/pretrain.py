"""Pre-training the base model (DeepSeek-V3 style: next-token + MTP loss, aux-loss-free bias balancing).

    python -m r1jax.main --config configs/pretrain.py:tiny --workdir /tmp/pt

tiny: tiny_moe on the tiny world's pre-training corpus, generated into WORKDIR/world with its own
SentencePiece tokenizer when no files are given; this is the base model of the tiny R1 pipeline.
Default: DeepSeek-V3 671B with the paper's pre-training recipe (a reference point; R1 itself starts from
the released V3-Base checkpoint, see configs/cold_start.py and configs/sft.py).
"""

from configs import common, mesh_presets


def get_config(arg=None):
    if arg == "tiny":
        return common.sft_config(
            model_block=common.tiny_model("tiny_moe", bias_update_rate=1e-3, mtp_loss_weight=0.3),
            data=common.sft_data(seq_len=256, batch_size=16, text_field="text", template="raw", eval_batches=4,
                                 eval_holdout=256, tiny_world=True, world_files=("pretrain",)),
            optimizer_block=common.optimizer(3e-3, 50, end_lr_ratio=0.1, weight_decay=0.1),
            # copying the question's operands is what improves last (first-step operands right: 46% of samples
            # at 1200 steps, 62% at 2400; docs/results.md)
            train_block=common.tiny_train(2400))
    if arg not in (None, ""):
        raise ValueError(f"configs/pretrain.py: unknown preset {arg!r}; expected '' or 'tiny'")
    # DeepSeek-V3 report §4.2 (not in docs/reference.md: *unverified* here): AdamW b1 0.9, b2 0.95, wd 0.1,
    # clip 1.0; lr warmup 2k steps to 2.2e-4 then decay to 2.2e-5 (the paper holds it constant up to 10T
    # tokens before a cosine decay); batch 15360 x 4096 tokens (ramped from 3072); 14.8T tokens ~ 235k steps.
    # From docs/reference.md §1: bias update gamma 0.001, MTP weight 0.3 early (0.1 later).
    return common.sft_config(
        model_block=common.model("deepseek_v3_671b", bias_update_rate=1e-3, mtp_loss_weight=0.3),
        mesh_block=mesh_presets.get(mesh_presets.V5P_671B),
        data=common.sft_data(seq_len=4096, batch_size=15360, text_field="text", template="raw",
                             train_files=("/path/to/pretrain.arrayrecord",),
                             eval_files=("/path/to/pretrain_eval.arrayrecord",), eval_batches=8),
        optimizer_block=common.optimizer(2.2e-4, 2000, schedule="cosine", end_lr_ratio=0.1, weight_decay=0.1),
        train_block=common.train(235_000, micro_batches=16, log_every=10, eval_every=1000, checkpoint_every=1000))
