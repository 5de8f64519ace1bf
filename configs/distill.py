"""Distillation (docs/reference.md §4.6): SFT a dense Qwen2.5 / Llama-3 student on the teacher's ~800k samples; no RL.

    python -m r1jax.main --config configs/distill.py:tiny --workdir /tmp/distill
    python -m r1jax.main --config configs/distill.py:qwen2.5_math_7b --workdir DIR \
        --config.init_from=/path/to/Qwen2.5-Math-7B --config.data.train_files=/path/to/r1_800k.jsonl
    python -m r1jax.main --config configs/distill.py:hf --workdir W --config.init_from=DIR --config.data.train_files=F

Presets: a student preset name (qwen2.5_math_1.5b, qwen2.5_math_7b [default], qwen2.5_14b, qwen2.5_32b,
llama3.1_8b, llama3.3_70b), initialised from its HF checkpoint (whose tokenizer.json is used); tiny =
tiny_dense on the tiny world's SFT sets, standing in for the teacher's samples (the pipeline points
data.train_files at the rejection-sampling output instead); hf = any Hugging Face student checkpoint on one TPU host
with open-r1's distillation recipe on conversations in `messages` (configs/common.py hf_sft_config).
"""

from configs import common

STUDENTS = ("qwen2.5_math_1.5b", "qwen2.5_math_7b", "qwen2.5_14b", "qwen2.5_32b", "llama3.1_8b", "llama3.3_70b")
HF_NAMES = {"qwen2.5_math_1.5b": "Qwen2.5-Math-1.5B", "qwen2.5_math_7b": "Qwen2.5-Math-7B",
            "qwen2.5_14b": "Qwen2.5-14B", "qwen2.5_32b": "Qwen2.5-32B", "llama3.1_8b": "Llama-3.1-8B",
            "llama3.3_70b": "Llama-3.3-70B-Instruct"}


def get_config(arg=None):
    if arg == "tiny":
        return common.sft_config(
            model_block=common.tiny_model("tiny_dense"),
            data=common.sft_data(seq_len=256, batch_size=8, template="raw", eval_batches=4, eval_holdout=48,
                                 tiny_world=True, world_files=("cold_start", "non_reasoning")),
            optimizer_block=common.optimizer(3e-3, 20, end_lr_ratio=0.1, weight_decay=0.0),
            train_block=common.tiny_train(200))
    if arg == "hf":
        return common.hf_sft_config(train_files=("/path/to/r1_800k.jsonl",))
    student = arg or "qwen2.5_math_7b"
    if student not in STUDENTS:
        raise ValueError(f"configs/distill.py: unknown preset {arg!r}; expected 'tiny', 'hf' or one of {STUDENTS}")
    # The paper gives the data (the ~800k SFT samples) and "SFT only"; lr, batch, length and epochs are
    # *unverified* choices (2 epochs as in the V3 SFT stage).
    return common.sft_config(
        model_block=common.model(student),
        mesh_block=common.mesh(fsdp=-1),
        init_from=f"/path/to/{HF_NAMES[student]}",  # HF directory: architecture, weights and tokenizer.json
        data=common.sft_data(seq_len=32768, batch_size=64, train_files=("/path/to/r1_800k.jsonl",),
                             eval_files=("/path/to/r1_800k_eval.jsonl",), template="chat", num_epochs=2,
                             eval_batches=16),
        optimizer_block=common.optimizer(1e-5, 100, schedule="cosine", end_lr_ratio=0.0, weight_decay=0.0),  # *unverified*
        train_block=common.train(4000, micro_batches=8, log_every=1, eval_every=250, checkpoint_every=250))
