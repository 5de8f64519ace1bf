"""The evaluation stage: pass@1 over k samples and cons@k per (model, benchmark), as R1 reports them.

    python -m r1jax.main --config configs/eval.py:tiny --workdir /tmp/eval --config.models.model.checkpoint=RUN_DIR

R1's protocol (REFERENCE.md §4): k samples per question at temperature 0.6, top-p 0.95; pass@1 = mean
correctness over the k samples, then over questions; cons@k = accuracy of the majority answer. pass@k (the
unbiased estimator) is reported too. config.models names the models ({name: checkpoint, template, stop
strings}: a base model and an R1-Zero model answer in the R1-Zero template, the cold-start family in the readable
format), config.benchmarks the benchmark files (r1jax/eval/benchmarks.py). One straight flow per model:

  1. weights     the checkpoint (an r1jax run, its checkpoints/ or a step dir, or a Hugging Face directory)
  2. sample      k completions per question (the group sampler: one prefill per question), seeded per
                 (benchmark, batch), so a rerun samples the same completions
  3. score       rule checks (math-verify; code and HumanEval in the sandbox), majority vote
  4. write       WORKDIR/results/<model>.<benchmark>.json, samples/<model>.<benchmark>.jsonl

A (model, benchmark) whose result file exists is not recomputed: an interrupted evaluation resumes at the first
missing pair. At the end: WORKDIR/results.json ({model: {benchmark: metrics}}) and results.md (a table).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from r1jax import models
from r1jax.data import templates
from r1jax.eval import benchmarks, metrics as metrics_lib
from r1jax.rl import sampler as sampler_lib
from r1jax.stages.common import StageResult, is_primary, mesh_and_rules, write_json

log = logging.getLogger(__name__)


def run(config, workdir: str) -> StageResult:
    workdir = os.path.abspath(workdir)
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    mesh, rules = mesh_and_rules(config.mesh)
    sampling = config.sampling
    suite = {name: benchmarks.load(b.kind, resolve_files(config, workdir, b.files), question_field=b.question_field,
                                   answer_field=b.answer_field, limit=int(b.limit))
             for name, b in config.benchmarks.items()}
    results: dict[str, dict[str, dict]] = {}
    for model_name in config.order or list(config.models.keys()):
        spec = config.models[model_name]
        if not spec.checkpoint:
            raise ValueError(f"config.models.{model_name}.checkpoint is empty")
        results[model_name] = {}
        todo = [b for b in suite if not os.path.isfile(_result_path(workdir, model_name, b))]
        if todo:
            cfg, params, tokenizer = load_policy(spec.checkpoint, mesh, rules)
        for bench_name, problems in suite.items():
            path = _result_path(workdir, model_name, bench_name)
            if bench_name in todo:
                t0 = time.perf_counter()
                texts, truncated = generate(
                    cfg, params, tokenizer, [render(spec.template, p.question) for p in problems], mesh=mesh,
                    rules=rules, samples=int(sampling.samples), max_new_tokens=int(sampling.max_new_tokens),
                    method=sampler_lib.method_from_config(sampling.method, float(sampling.temperature),
                                                          int(sampling.top_k), float(sampling.top_p)),
                    stop_strings=tuple(spec.stop_strings), batch_prompts=int(sampling.batch_prompts),
                    prompt_buckets=tuple(sampling.prompt_buckets), seed=_seed(config.seed, bench_name))
                scores = score_samples(problems, texts, truncated)
                scores["eval_s"] = time.perf_counter() - t0
                if is_primary():
                    _write_samples(os.path.join(workdir, "samples", f"{model_name}.{bench_name}.jsonl"),
                                   problems, texts)
                    write_json(path, scores)
                log.info("%s on %s: %s", model_name, bench_name,
                         {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)})
            with open(path) as f:
                results[model_name][bench_name] = json.load(f)
    outputs = {"results": os.path.join(workdir, "results.json"), "table": os.path.join(workdir, "results.md")}
    if is_primary():
        write_json(outputs["results"], results)
        with open(outputs["table"], "w") as f:
            f.write(results_table(results))
    flat = {f"{m}/{b}/{k}": v for m, per in results.items() for b, r in per.items() for k, v in r.items()
            if k in ("pass@1", "cons@k")}
    return StageResult(stage="eval", workdir=workdir, status="done", outputs=outputs, metrics=flat)


# ------------------------------------------------------------------------------------------ files, models, sampling


def resolve_files(config, workdir: str, files) -> list[str]:
    """Benchmark files; with config.tiny_world, a bare name (no '/') is the tiny world's file of that name, the
    world written into WORKDIR/world on demand."""
    out = []
    for name in files:
        if config.tiny_world and "/" not in name:
            from r1jax.stages.sft import ensure_world

            name = os.path.join(ensure_world(workdir, config.world_seed), f"{name}.jsonl")
        out.append(name)
    return out



def load_policy(path: str, mesh, rules):
    """(cfg, params, tokenizer) of an r1jax run / checkpoint (its own saved model config and tokenizer) or a
    Hugging Face directory (config.json, *.safetensors, tokenizer.json)."""
    from r1jax.data.tokenizer import load_tokenizer
    from r1jax.train import checkpoint as ckpt_lib

    found = ckpt_lib.find_checkpoint(path)
    if found is not None:
        reader = ckpt_lib.Checkpointer(found[0], read_only=True)
        meta = reader.restore_meta(found[1])
        reader.close()
        cfg = models.ModelConfig(**meta["model"])
        params, meta = ckpt_lib.load_params(path, cfg, models.param_shardings(cfg, mesh, rules))
        return cfg, params, load_tokenizer(meta["tokenizer"])
    from r1jax import hf

    cfg, params = hf.load_hf_checkpoint(path, mesh=mesh, rules=rules)
    return cfg, params, load_tokenizer(path)


def render(template: str, question: str) -> str:
    """The prompt text: the question through a template of r1jax.data.templates ("" = verbatim)."""
    return templates.render_prompt(template, question) if template else question


def generate(cfg, params, tokenizer, prompts: list[str], *, mesh, rules, samples: int, max_new_tokens: int,
             method, stop_strings: tuple = (), batch_prompts: int, prompt_buckets: tuple, seed: int
             ) -> tuple[list[list[str]], list[list[bool]]]:
    """`samples` completions of every prompt text ([P][k] texts, [P][k] truncated flags) with the group sampler,
    `batch_prompts` prompts per call (the last batch padded, so one compile per prompt bucket). Batch i uses the
    key fold_in(PRNGKey(seed), i): the same call gives the same completions."""
    spec = sampler_lib.SamplerSpec(method=method, group_size=samples, max_new_tokens=max_new_tokens,
                                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                   stop_sequences=sampler_lib.stop_token_sequences(tokenizer, stop_strings))
    sample_fn = sampler_lib.make_sampler(cfg, spec, mesh=mesh, rules=rules)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    texts, truncated = [], []
    for i, start in enumerate(range(0, len(prompts), batch_prompts)):
        chunk = [bos + tokenizer.encode(p) for p in prompts[start:start + batch_prompts]]
        prompts_bp, lengths_b = sampler_lib.pad_prompts(chunk, prompt_buckets, tokenizer.pad_id, batch_prompts)
        out = jax.device_get(sample_fn(params, prompts_bp, lengths_b, jax.random.fold_in(jax.random.PRNGKey(seed), i)))
        for b in range(len(chunk)):
            rows = range(b * samples, (b + 1) * samples)
            texts.append([tokenizer.decode(out.tokens[r, :out.lengths[r]]) for r in rows])
            truncated.append([bool(out.truncated[r]) for r in rows])
    return texts, truncated


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
    """Samples the eval protocol's completions from a fresh tiny model of config.smoke_model for two prompts (no
    files, no checkpoint); "loss" is the mean negative log-likelihood per sampled token."""
    mesh, rules = mesh_and_rules(config.mesh)
    from r1jax.stages.common import model_config

    cfg = model_config(config.smoke_model)
    params = models.init(cfg, jax.random.PRNGKey(config.seed))
    s = config.sampling
    spec = sampler_lib.SamplerSpec(
        method=sampler_lib.method_from_config(s.method, float(s.temperature), int(s.top_k), float(s.top_p)),
        group_size=int(s.samples), max_new_tokens=8, eos_id=2, pad_id=0)
    prompts_bp, lengths_b = sampler_lib.pad_prompts([[1, 5, 6], [1, 7]], tuple(s.prompt_buckets), 0)
    out = jax.device_get(sampler_lib.make_sampler(cfg, spec, mesh=mesh, rules=rules)(
        params, prompts_bp, lengths_b, jax.random.PRNGKey(0)))
    return {"loss": float(-out.logprobs.sum() / max(out.lengths.sum(), 1)), "tokens": float(out.lengths.sum())}
