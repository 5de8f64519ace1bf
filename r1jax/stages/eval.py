"""The evaluation stage: pass@1 over k samples and cons@k per (model, benchmark), as R1 reports them.

    python -m r1jax.main --config configs/eval.py:tiny --workdir /tmp/eval --config.models.model.checkpoint=RUN_DIR

R1's protocol (docs/reference.md §4): k samples per question at temperature 0.6, top-p 0.95; pass@1 = mean
correctness over the k samples, then over questions; cons@k = accuracy of the majority answer. pass@k (the
unbiased estimator) is reported too. config.models names the models ({name: checkpoint, template, stop
strings}: a base model and an R1-Zero model answer in the R1-Zero template, the cold-start family in the readable
format), config.benchmarks the benchmarks ({kind, files, fields, limit}: r1jax/eval/benchmarks.py), and
config.run_benchmarks the ones to run (empty: all; `--config.run_benchmarks=math500` runs that one alone). The
model's template "checkpoint" renders each question with the checkpoint's own chat template (as transformers'
apply_chat_template(..., add_generation_prompt=True)), with a system turn when models.<name>.system is set. One
straight flow per model:

  0. data        every selected benchmark is read and checked first (seconds): a missing or wrong-typed
                 question / answer field fails naming file:line, the field and its config key; references are
                 read in GSM8K's `#### 72`, MATH's `\\boxed{}` or bare form
  1. weights     the checkpoint (an r1jax run, its checkpoints/ or a step dir, or a Hugging Face directory)
  2. sample      k completions per question (r1jax/eval/generate.py: one prefill per question), seeded per
                 (benchmark, batch), so a rerun samples the same completions; questions longer than the largest
                 prompt bucket are left out and counted (`dropped_too_long`)
  3. score       rule checks (math-verify; code and HumanEval in the sandbox, its run counts in the results as
                 sandbox/runs, sandbox/unsafe_runs), majority vote
  4. write       WORKDIR/results/<model>.<benchmark>.json, samples/<model>.<benchmark>.jsonl (every completion),
                 and a few readable rollouts per benchmark in WORKDIR/samples.jsonl (prompt, completion, reward,
                 length, truncated)

A (model, benchmark) whose result file exists is not recomputed: an interrupted evaluation resumes at the first
missing pair. At the end: WORKDIR/results.json ({model: {benchmark: metrics}}) and results.md (a table).
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from r1jax import world
from r1jax.data.files import expand
from r1jax.data.sources import DataError
from r1jax.eval import benchmarks, metrics as metrics_lib
from r1jax.eval.generate import encode_prompts, generate, render, sampler_smoke_step
from r1jax.rl import sandbox
from r1jax.rl import sampler as sampler_lib
from r1jax.train.metrics import append_jsonl
from r1jax.train.run import StageResult, is_primary, load_policy, mesh_and_rules, write_json

log = logging.getLogger(__name__)


def run(config, workdir: str) -> StageResult:
    workdir = os.path.abspath(workdir)
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    mesh, rules = mesh_and_rules(config.mesh)
    sampling = config.sampling
    suite = {name: load_benchmark(config, workdir, name) for name in selected_benchmarks(config)}
    samples_path = os.path.join(workdir, "samples.jsonl")
    results: dict[str, dict[str, dict]] = {}
    for model_name in config.order or list(config.models.keys()):
        spec = config.models[model_name]
        if not spec.checkpoint:
            raise ValueError(f"config.models.{model_name}.checkpoint is empty")
        results[model_name] = {}
        todo = [b for b in suite if not os.path.isfile(_result_path(workdir, model_name, b))]
        if todo:
            policy = load_policy(spec.checkpoint, mesh, rules)
            tokenizer = policy.tokenizer
        for bench_name, problems in suite.items():
            path = _result_path(workdir, model_name, bench_name)
            if bench_name in todo:
                t0 = time.perf_counter()
                texts = [render(spec.template, tokenizer, p.question, spec.get("system")) for p in problems]
                kept, prompts = encode_prompts(tokenizer, texts, max(sampling.prompt_buckets))
                if not kept:
                    raise ValueError(f"benchmark {bench_name}: all {len(problems)} questions are longer than the "
                                     f"largest prompt bucket ({max(sampling.prompt_buckets)} tokens; raise "
                                     "config.sampling.prompt_buckets)")
                problems, texts = [problems[i] for i in kept], [texts[i] for i in kept]
                out = generate(
                    policy.cfg, policy.params, tokenizer, prompts, mesh=mesh, rules=rules,
                    samples=int(sampling.samples), max_new_tokens=int(sampling.max_new_tokens),
                    method=sampler_lib.method_from_config(sampling.method, float(sampling.temperature),
                                                          int(sampling.top_k), float(sampling.top_p)),
                    stop_strings=tuple(spec.stop_strings), batch_prompts=int(sampling.batch_prompts),
                    prompt_buckets=tuple(sampling.prompt_buckets), seed=_seed(config.seed, bench_name))
                runs_before = sandbox.metrics()
                scores = score_samples(problems, out.texts, out.truncated)
                if problems[0].kind != "math":  # programs ran in the sandbox: how (unsafe = without namespaces)
                    scores.update({k: v - runs_before.get(k, 0) for k, v in sandbox.metrics().items()})
                scores["dropped_too_long"] = len(suite[bench_name]) - len(kept)
                scores["eval_s"] = time.perf_counter() - t0
                if is_primary():
                    _write_samples(os.path.join(workdir, "samples", f"{model_name}.{bench_name}.jsonl"),
                                   problems, out.texts)
                    append_jsonl(samples_path, readable_samples(model_name, bench_name, texts, problems, out,
                                                                int(config.get("samples_per_benchmark", 4))))
                    write_json(path, scores)
                log.info("%s on %s: %s", model_name, bench_name,
                         {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)})
            with open(path) as f:
                results[model_name][bench_name] = json.load(f)
    outputs = {"results": os.path.join(workdir, "results.json"), "table": os.path.join(workdir, "results.md"),
               "samples": samples_path}
    if is_primary():
        write_json(outputs["results"], results)
        with open(outputs["table"], "w") as f:
            f.write(results_table(results))
    flat = {f"{m}/{b}/{k}": v for m, per in results.items() for b, r in per.items() for k, v in r.items()
            if k in ("pass@1", "cons@k")}
    return StageResult(stage="eval", workdir=workdir, status="done", outputs=outputs, metrics=flat)


# ------------------------------------------------------------------------------------------ benchmarks and samples


def selected_benchmarks(config) -> dict:
    """config.benchmarks restricted to config.run_benchmarks, in its order (empty: all of them), so a user names
    the benchmarks to run on the command line (--config.run_benchmarks=math500) and leaves the others out."""
    names = list(config.get("run_benchmarks") or config.benchmarks.keys())
    unknown = [n for n in names if n not in config.benchmarks]
    if unknown:
        raise ValueError(f"config.run_benchmarks names {unknown}, which config.benchmarks does not define; it "
                         f"defines {sorted(config.benchmarks.keys())}")
    return {n: config.benchmarks[n] for n in names}


def load_benchmark(config, workdir: str, name: str) -> list[benchmarks.Problem]:
    """Benchmark `name`'s problems, read and checked before any model is loaded: a DataError names file:line, the
    field and the config key that maps it."""
    b = config.benchmarks[name]
    try:
        return benchmarks.load(b.kind, benchmark_files(config, workdir, name), question_field=b.question_field,
                               answer_field=b.answer_field, limit=int(b.limit))
    except DataError as e:
        keys = {b.question_field: "question_field", b.answer_field: "answer_field"}
        hint = f"mapped by config.benchmarks.{name}.{keys[e.field]}" if e.field in keys else e.hint
        raise DataError(e.kind, e.path, e.number, e.unit, e.field, e.expected, e.got, hint) from None


def benchmark_files(config, workdir: str, name: str) -> list[str]:
    """Benchmark `name`'s files (paths, globs, directories); with config.tiny_world, a bare name (no '/') is the
    tiny world's file of that name, the world written into WORKDIR/world on demand."""
    entries = list(config.benchmarks[name].files)
    if config.tiny_world and entries and all("/" not in e for e in entries):
        return world.world_files(workdir, int(config.world_seed), entries)
    return expand(entries, field=f"config.benchmarks.{name}.files") if entries else []


def readable_samples(model: str, bench: str, prompts: list[str], problems, out, n: int) -> list[dict]:
    """`n` rollouts for WORKDIR/samples.jsonl: the first completion of each of the first n questions, with the
    rendered prompt text (`prompts`), completion, correctness (the benchmark's reward), length in tokens and
    truncation."""
    rows = list(range(min(n, len(problems))))
    correct = benchmarks.score([problems[i] for i in rows], [out.texts[i][0] for i in rows])
    return [{"model": model, "benchmark": bench, "id": problems[i].id, "prompt": prompts[i],
             "completion": out.texts[i][0], "rewards": {"correct": float(c)}, "length": out.lengths[i][0],
             "truncated": out.truncated[i][0]} for i, c in zip(rows, correct)]


def _seed(seed: int, name: str) -> int:
    """A per-benchmark seed that does not depend on Python's hash randomisation."""
    return (int(seed) * 1_000_003 + sum(ord(c) * 31 ** i for i, c in enumerate(name))) % (2 ** 31)


# ------------------------------------------------------------------------------------------ scoring


def score_samples(problems: list[benchmarks.Problem], texts: list[list[str]], truncated: list[list[bool]]) -> dict:
    """pass@1 (mean over k, then over questions), pass@k, cons@k (math), mean length and truncation."""
    k = len(texts[0])
    flat = benchmarks.score([p for p in problems for _ in range(k)], [t for row in texts for t in row])
    correct_qk = np.asarray(flat, bool).reshape(len(problems), k)
    out = {"n": len(problems), "k": k, "pass@1": metrics_lib.pass_at_1_mean(correct_qk),
           f"pass@{k}": float(np.mean([metrics_lib.pass_at_k(k, int(c), k) for c in correct_qk.sum(1)])),
           "response_chars_mean": float(np.mean([len(t) for row in texts for t in row])),
           "truncated_frac": float(np.mean(truncated))}
    if problems[0].kind == "math":
        votes = [[benchmarks.vote_answer(p, t) for t in row] for p, row in zip(problems, texts)]
        out["cons@k"] = metrics_lib.cons_at_k(
            votes, lambda q, a: benchmarks.filters.answer_correct(a, problems[q].answer))
    return out


def results_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per model, pass@1 and cons@k columns per benchmark."""
    benches = list(dict.fromkeys(b for per in results.values() for b in per))
    header = ["model"] + [f"{b} {m}" for b in benches for m in ("pass@1", "cons@k")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, per in results.items():
        cells = [model]
        for b in benches:
            r = per.get(b, {})
            cells += [f"{100 * r['pass@1']:.1f}" if "pass@1" in r else "-",
                      f"{100 * r['cons@k']:.1f}" if "cons@k" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    k = next((r["k"] for per in results.values() for r in per.values()), None)
    return "\n".join(lines) + f"\n\npass@1: mean over k={k} samples per question, in %; cons@k: majority vote.\n"


def _result_path(workdir: str, model: str, bench: str) -> str:
    return os.path.join(workdir, "results", f"{model}.{bench}.json")


def _write_samples(path: str, problems, texts) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for p, row in zip(problems, texts):
            f.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer, "completions": row},
                               ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def smoke_step(config) -> dict:
    """The eval protocol's sampler on a fresh model of config.smoke_model (no files, no checkpoint)."""
    return sampler_smoke_step(config)
