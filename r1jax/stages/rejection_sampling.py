"""The rejection-sampling stage: an RL checkpoint's best responses become the reasoning half of the SFT data.

    python -m r1jax.main --config configs/rejection_sampling.py:tiny --workdir /tmp/rs --config.init_from=RL_RUN

R1 (docs/reference.md §4 step 4): near RL convergence, sample several responses per prompt, keep the correct ones
(rule checks; a generative judge where rules cannot check), drop chain-of-thought with mixed languages, long
paragraphs or code blocks (~600k reasoning samples), then add ~200k non-reasoning samples. One straight flow:

  1. policy      config.init_from (an r1jax run or a Hugging Face directory) with its tokenizer
  2. prompts     data.prompt_files (at most data.max_prompts_per_file of each), shuffled (seeded); a prompt's
                 check is `code` when it has `tests`, `math` when it has `answer`, else `judge`
  3. sample      sampling.samples completions per prompt (the group sampler), data.template on
                 prompt_field ("checkpoint": the checkpoint's own chat template)
  4. filter      r1jax.rl.filters.reject_reason (truncated, no_reasoning, code_block, long_paragraph,
                 mixed_language), then correctness: math-verify against `answer`, the sandbox against `tests`,
                 or the judge (config.judge: a reward model or a generative judge model) with score >= min_score;
                 identical responses to one prompt count once (duplicate)
  5. select      up to select.per_prompt of the survivors per prompt, by select.pick (shortest | first | random)
  6. mix         non-reasoning records (data.non_reasoning_files) so they make mix.non_reasoning_share of the
                 dataset (R1: 200k / 800k = 0.25), repeated when the pool is smaller; shuffled (seeded)

Prompts are processed in chunks of output.chunk_prompts; each chunk's kept records and counts are written to
WORKDIR/shards/ when it is complete, so an interrupted run resumes at the first missing chunk and every chunk's
samples depend only on (seed, chunk): a resumed run writes the same dataset as an uninterrupted one.

Outputs: dataset (WORKDIR/dataset.jsonl: prompt, response, source = reasoning | non_reasoning, ...), reasoning
(the reasoning part alone) and stats (WORKDIR/stats.json: samples kept and rejected by reason, per check).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random

from r1jax.data.sources import iterate_records
from r1jax.eval.generate import encode_prompts, generate, render, sampler_smoke_step
from r1jax.rl import filters, rewards, sandbox
from r1jax.rl import sampler as sampler_lib
from r1jax.train.metrics import append_jsonl
from r1jax.train.run import StageResult, data_files, is_primary, load_policy, mesh_and_rules, write_json

log = logging.getLogger(__name__)
CHECKS = ("math", "code", "judge")


def run(config, workdir: str) -> StageResult:
    workdir = os.path.abspath(workdir)
    shard_dir = os.path.join(workdir, "shards")
    samples_path = os.path.join(workdir, "samples.jsonl")
    os.makedirs(shard_dir, exist_ok=True)
    if not config.init_from:
        raise ValueError("config.init_from is empty: rejection sampling needs the RL checkpoint to sample from")

    # ---------------------------------------------------------------- 1-2. policy and prompts
    mesh, rules = mesh_and_rules(config.mesh)
    prompt_files = data_files(config.data, workdir, "prompt_files", "world_files")
    other_files = data_files(config.data, workdir, "non_reasoning_files", "non_reasoning_world_files", required=False)
    records = load_prompt_records(prompt_files, config.data, config.seed)
    needs_judge = any(check_of(r) == "judge" for r in records)
    if needs_judge and not config.judge.kind:
        raise ValueError("some prompts have neither `answer` nor `tests`: set config.judge.kind (reward_model | "
                         "generative) and config.judge.checkpoint, or leave those prompts out")
    size = int(config.output.chunk_prompts)
    chunks = [records[i:i + size] for i in range(0, len(records), size)]
    policy, judge_fn = None, None
    readability = filters.Readability(max_paragraph_chars=int(config.readability.max_paragraph_chars),
                                      min_language_share=float(config.readability.min_language_share),
                                      reject_code_blocks=bool(config.readability.reject_code_blocks))
    s = config.sampling
    method = sampler_lib.method_from_config(s.method, float(s.temperature), int(s.top_k), float(s.top_p))

    # ---------------------------------------------------------------- 3-5. sample, filter, select per chunk
    for c, chunk in enumerate(chunks):
        path = os.path.join(shard_dir, f"{c:05d}")
        if os.path.isfile(path + ".stats.json"):
            continue
        if policy is None:
            policy = load_policy(config.init_from, mesh, rules)
            tokenizer = policy.tokenizer
            if needs_judge:
                judge_fn = make_judge(config.judge, mesh, rules)
        prompts_text = [render(config.data.template, tokenizer, r[config.data.prompt_field]) for r in chunk]
        kept_rows, prompts = encode_prompts(tokenizer, prompts_text, max(s.prompt_buckets))
        prompts_text = [prompts_text[i] for i in kept_rows]
        too_long = len(chunk) - len(kept_rows)
        chunk = [chunk[i] for i in kept_rows]
        out = generate(policy.cfg, policy.params, tokenizer, prompts, mesh=mesh, rules=rules, samples=int(s.samples),
                       max_new_tokens=int(s.max_new_tokens), method=method,
                       stop_strings=tuple(config.data.stop_strings), batch_prompts=int(s.batch_prompts),
                       prompt_buckets=tuple(s.prompt_buckets), seed=config.seed * 100_003 + c)
        texts, truncated = out.texts, out.truncated
        kept, stats = select(chunk, texts, truncated, prompt_field=config.data.prompt_field, readability=readability,
                             judge=judge_fn, min_score=float(config.judge.min_score),
                             per_prompt=int(config.select.per_prompt), pick=config.select.pick,
                             seed=config.seed * 100_003 + c)
        stats["prompts_dropped_too_long"] = too_long
        if is_primary():
            _write_jsonl(path + ".jsonl", kept)
            write_json(path + ".stats.json", stats)
            append_jsonl(samples_path, [{"chunk": c, "prompt": prompts_text[i], "completion": texts[i][0],
                                         "length": out.lengths[i][0], "truncated": truncated[i][0]}
                                        for i in range(min(len(chunk), int(config.get("samples_per_chunk", 4))))])
        log.info("chunk %d/%d: kept %d of %d samples", c + 1, len(chunks), stats["kept"], stats["samples"])

    # ---------------------------------------------------------------- 6. merge and mix
    reasoning, totals = [], collections.Counter()
    for c in range(len(chunks)):
        path = os.path.join(shard_dir, f"{c:05d}")
        reasoning += list(iterate_records([path + ".jsonl"])) if os.path.getsize(path + ".jsonl") else []
        with open(path + ".stats.json") as f:
            totals.update(_flatten(json.load(f)))
    others = load_others(other_files, len(reasoning), float(config.mix.non_reasoning_share), config.seed)
    dataset = reasoning + others
    random.Random(config.seed).shuffle(dataset)
    stats = {**_nest(totals), "prompts": len(records), "reasoning_samples": len(reasoning),
             "non_reasoning_samples": len(others), "dataset_samples": len(dataset),
             "non_reasoning_share": len(others) / max(len(dataset), 1),
             "non_reasoning_pool": count_records(other_files), "kept_rate": totals["kept"] / max(totals["samples"], 1)}
    outputs = {"dataset": os.path.join(workdir, "dataset.jsonl"), "reasoning": os.path.join(workdir, "reasoning.jsonl"),
               "stats": os.path.join(workdir, "stats.json")}
    if is_primary():
        _write_jsonl(outputs["reasoning"], reasoning)
        _write_jsonl(outputs["dataset"], dataset)
        write_json(outputs["stats"], stats)
    metrics = {k: v for k, v in _flatten(stats).items() if isinstance(v, (int, float))}
    return StageResult(stage="rejection_sampling", workdir=workdir, status="done", outputs=outputs, metrics=metrics)


# ------------------------------------------------------------------------------------------ filtering


def check_of(record: dict) -> str:
    """How a prompt's responses are checked: code (tests), math (answer) or judge (neither)."""
    if record.get("tests"):
        return "code"
    if record.get("answer") not in (None, ""):
        return "math"
    return "judge"


def select(records: list[dict], texts: list[list[str]], truncated: list[list[bool]], *, prompt_field: str,
           readability: filters.Readability = filters.Readability(), judge=None, min_score: float = 0.0,
           per_prompt: int = 1, pick: str = "shortest", seed: int = 0,
           sandbox_limits: sandbox.SandboxLimits = sandbox.SandboxLimits()) -> tuple[list[dict], dict]:
    """Filter the k responses of every prompt and pick up to `per_prompt` of the survivors.

    Returns (kept SFT records, stats): stats counts samples, kept, rejected[reason] (filters.REASONS + duplicate),
    not_selected (correct but beyond per_prompt), prompts_with_kept, and per check (math | code | judge) the
    samples and kept. `judge(questions, references, responses) -> scores` is called only for judge-checked
    responses that passed the readability filters."""
    if pick not in ("shortest", "first", "random"):
        raise ValueError(f"select.pick={pick!r}: expected shortest, first or random")
    rejected = collections.Counter({reason: 0 for reason in filters.REASONS + ("duplicate",)})
    per_check = {c: collections.Counter(samples=0, kept=0) for c in CHECKS}
    verdict: dict[tuple[int, int], str | None] = {}  # (prompt, sample) -> reject reason or None
    for p, (record, row) in enumerate(zip(records, texts)):
        seen = set()
        for j, text in enumerate(row):
            reason = filters.reject_reason(text, truncated=truncated[p][j], language=record.get("language"),
                                           readability=readability)
            if reason is None and text.strip() in seen:
                reason = "duplicate"
            seen.add(text.strip())
            verdict[p, j] = reason
    correct = _check_correct(records, texts, [key for key, reason in verdict.items() if reason is None],
                             prompt_field=prompt_field, judge=judge, min_score=min_score, sandbox_limits=sandbox_limits)
    kept, rng = [], random.Random(seed)
    not_selected = prompts_with_kept = 0
    for p, (record, row) in enumerate(zip(records, texts)):
        check = check_of(record)
        per_check[check]["samples"] += len(row)
        good = []
        for j in range(len(row)):
            reason = verdict[p, j] or (None if correct[p, j] else "incorrect")
            if reason is None:
                good.append(j)
            else:
                rejected[reason] += 1
        if pick == "shortest":
            good.sort(key=lambda j: len(row[j]))
        elif pick == "random":
            rng.shuffle(good)
        not_selected += max(len(good) - per_prompt, 0)
        prompts_with_kept += bool(good)
        for j in good[:per_prompt]:
            kept.append(sft_record(record, row[j], check, prompt_field))
            per_check[check]["kept"] += 1
    samples = sum(len(row) for row in texts)
    stats = {"samples": samples, "kept": len(kept), "rejected": dict(rejected), "not_selected": not_selected,
             "prompts_with_kept": prompts_with_kept, "by_check": {c: dict(v) for c, v in per_check.items()}}
    return kept, stats


def _check_correct(records, texts, keys, *, prompt_field, judge, min_score, sandbox_limits) -> dict:
    """{(prompt, sample): correct} for the given keys; each check batched over its samples."""
    by_check = collections.defaultdict(list)
    for key in keys:
        by_check[check_of(records[key[0]])].append(key)
    out = {}
    for p, j in by_check["math"]:
        try:
            out[p, j] = filters.answer_correct(filters.extract_answer(texts[p][j]), records[p]["answer"])
        except Exception as e:  # noqa: BLE001 - one bad reference must not stop a 600k-prompt run
            log.warning("answer check failed on prompt %d: %r", p, e)
            out[p, j] = False
    code = by_check["code"]
    if code:
        shares = rewards.code([""] * len(code), [texts[p][j] for p, j in code],
                              tests=[records[p]["tests"] for p, _ in code], limits=vars(sandbox_limits))
        out.update({key: share == 1.0 for key, share in zip(code, shares)})
    judged = by_check["judge"]
    if judged:
        if judge is None:
            raise ValueError("responses need a judge (their prompts have no answer or tests) but none is configured")
        scores = judge([records[p][prompt_field] for p, _ in judged], [records[p].get("answer") for p, _ in judged],
                       [texts[p][j] for p, j in judged])
        out.update({key: float(score) >= min_score for key, score in zip(judged, scores)})
    return out


def sft_record(record: dict, response: str, check: str, prompt_field: str) -> dict:
    out = {"prompt": record[prompt_field], "response": response, "source": "reasoning", "check": check}
    for key in ("language", "task", "answer", "kind"):
        if record.get(key) is not None:
            out[key] = record[key]
    return out


def make_judge(judge, mesh, rules):
    """The configured judge: a reward model or a generative judge model (r1jax/rl/judge.py)."""
    from r1jax.rl import judge as judge_lib
    from r1jax.rl import reward_model as rm_lib

    if not judge.checkpoint:
        raise ValueError(f"config.judge.kind={judge.kind!r} needs config.judge.checkpoint")
    if judge.kind == "reward_model":
        return judge_lib.RewardModelJudge(rm_lib.load(os.path.abspath(judge.checkpoint)), judge.aspect or None)
    if judge.kind == "generative":
        policy = load_policy(judge.checkpoint, mesh, rules)
        return judge_lib.GenerativeJudge(policy.cfg, policy.params, policy.tokenizer,
                                         prompt_template=judge.prompt_template,
                                         yes=judge.yes, no=judge.no, template=judge.get("template", ""))
    raise ValueError(f"config.judge.kind={judge.kind!r}: expected reward_model or generative")


# ------------------------------------------------------------------------------------------ data


def load_prompt_records(files: list[str], data, seed: int) -> list[dict]:
    """The first data.max_prompts_per_file records (0 = all) of every file, shuffled (seeded)."""
    records = []
    for path in files:
        these = list(iterate_records([path], schema={data.prompt_field: "str"}))
        records += these[:int(data.max_prompts_per_file)] if data.max_prompts_per_file else these
    if not records:
        raise ValueError(f"no prompt records in {files}")
    random.Random(seed).shuffle(records)
    return records


def load_others(files: list[str], n_reasoning: int, share: float, seed: int) -> list[dict]:
    """Non-reasoning SFT records making `share` of the mixed dataset: n = n_reasoning * share / (1 - share),
    drawn without repeats while the pool lasts, then cycled (each pass reshuffled)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"mix.non_reasoning_share={share} must be in [0, 1)")
    n = round(n_reasoning * share / (1.0 - share))
    if n == 0:
        return []
    if not files:
        raise ValueError(f"mix.non_reasoning_share={share} but config.data.non_reasoning_files is empty")
    pool = [{"prompt": r["prompt"], "response": r["response"], "source": "non_reasoning",
             **{k: r[k] for k in ("kind", "language") if r.get(k) is not None}}
            for r in iterate_records(files, schema={"prompt": "str", "response": "str"})]
    rng, out = random.Random(seed), []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out += order[:n - len(out)]
    return out


def count_records(files: list[str]) -> int:
    return sum(1 for _ in iterate_records(files)) if files else 0


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(path + ".tmp", path)


def _flatten(stats: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def smoke_step(config) -> dict:
    """The stage's sampler on a fresh model of config.smoke_model (no checkpoint)."""
    return sampler_smoke_step(config)
