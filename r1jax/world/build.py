"""Writes the tiny world (`python -m r1jax.world.build --out DIR`): a seeded synthetic universe in which every stage
of the R1 recipe has something real to learn on a 2-core CPU.

    python -m r1jax.world.build --out DIR [--seed 0] [--scale tiny]

writes JSONL files and DIR/manifest.json (files, record counts, the measured pre-training mix, the
CJK characters the tokenizer must cover). Same seed -> byte-identical files.

Files and their records (JSONL, one object a line):

- pretrain: text, kind (arith | countdown | drill | code | facts | dialogue | translation) -- the base model's corpus
- rl_train, rl_heldout: question, prompt, answer, language, task (arith | countdown), expression,
  numbers, targets, reward_source="rule" -- R1-Zero, reasoning RL, evaluation
- code_train, code_heldout: question, prompt, tests, entry_point, solution, language, task="code",
  reward_source="rule" -- code rewards
- cold_start: question, prompt, response (`<|reasoning|>…<|summary|>…`), task, answer, language
- non_reasoning: question, prompt, response, kind (writing | fact_qa | self_cognition | translation), language
- preferences_train, preferences_heldout: question, prompt, chosen, rejected, kind (helpful | harmless),
  subkind, language -- reward models
- general_prompts: question, prompt, kind (helpful | harmless), language, reward_source="reward_model"
  -- all-scenario RL

Splits: every arith/countdown question (a language-independent key) belongs to exactly one of
rl_heldout, rl_train, cold_start, the two preference pools and the pre-training pool, and every code
task to one of code_heldout, code_train and the pre-training pool (which also feeds cold start), so
held-out accuracy measures generalisation, not recall. World facts appear in pre-training on purpose;
preference pairs about them are split by fact.

`prompt` means what its consumer expects. RL files (rl_*, code_*) hold the full R1-Zero prompt,
rendered by `r1jax.world.text.local_r1_zero_prompt` (same text as templates.r1_zero_prompt), ready to
sample from. SFT, preference and general-prompt files hold the user message only (= `question`):
the SFT pipeline renders it with its configured template (`chat` by default), so a pre-rendered
prompt would be wrapped twice. `question` is kept everywhere so any stage can re-render.
"""

import argparse
import dataclasses
import json
import os
import random
import time

from r1jax.world import code
from r1jax.world import corpus
from r1jax.world import lexicon as lex
from r1jax.world import preferences as prefs
from r1jax.world import tasks
from r1jax.world import text
from r1jax.world import facts as world

COUNTDOWN_SHARE = 0.30  # of the rule-rewarded reasoning problems in every split


@dataclasses.dataclass(frozen=True)
class Scale:
    pretrain_docs: int
    rl_train: int
    rl_heldout: int
    code_train: int
    code_heldout: int
    cold_start: int
    preferences_train: int
    preferences_heldout: int
    general_prompts: int
    pretrain_pool: int  # distinct arith (2-3 ops) + countdown problems the corpus draws from
    pref_train_pool: int  # distinct problems the preference pairs draw their questions from (with replacement)
    pref_heldout_pool: int


SCALES = {
    # tiny: 1000 held-out pairs (671 helpfulness pairs) measure a reward model's accuracy to ~1.8 points
    "tiny": Scale(25_000, 2_000, 200, 200, 40, 1_500, 4_000, 1_000, 300, 6_000, 1_333, 100),
    "small": Scale(200_000, 20_000, 500, 300, 60, 4_000, 8_000, 500, 300, 30_000, 2_666, 250),
}


def check_answer(record: dict, answer_str: str) -> bool:
    """Ground truth for the tiny world's tasks: arith/countdown compare integers exactly (what
    math-verify does on plain integers); code runs the record's tests on `answer_str` *in-process*,
    so it is only for trusted reference code (model output goes through the r1jax.rl sandbox)."""
    if record["task"] == "code":
        return code.run_trusted_tests(answer_str, record["tests"], record["entry_point"])
    if record["task"] not in ("arith", "countdown"):
        raise ValueError(f"check_answer: unknown task {record['task']!r}; expected arith, countdown or code")
    value = tasks.parse_int_answer(answer_str)
    return value is not None and value == int(record["answer"])


def _rl_arith(rng: random.Random) -> tasks.Problem:
    return tasks.random_arith(rng, rng.choice((2, 3)))


def problem_splits(seed: int, scale: Scale) -> dict:
    """Disjoint problem sets {split: [Problem]}, each COUNTDOWN_SHARE countdown, drawn in a fixed order."""
    rng = random.Random(f"{seed}:problems")
    sizes = {"rl_heldout": scale.rl_heldout, "rl_train": scale.rl_train, "cold_start": scale.cold_start,
             "pref_heldout": scale.pref_heldout_pool, "pref_train": scale.pref_train_pool,
             "pretrain": scale.pretrain_pool}
    seen: set = set()
    splits = {}
    for name, size in sizes.items():
        n_countdown = round(size * COUNTDOWN_SHARE)
        drawn = (tasks.unique_problems(rng, tasks.random_countdown, n_countdown, seen)
                 + tasks.unique_problems(rng, _rl_arith, size - n_countdown, seen))
        seen.update(p.key for p in drawn)
        rng.shuffle(drawn)
        splits[name] = drawn
    return splits


def rl_record(problem: tasks.Problem, language: str, form: int) -> dict:
    question = text.question_text(problem, language, form)
    return {"question": question, "prompt": text.local_r1_zero_prompt(question), "answer": str(problem.answer),
            "language": language, "task": problem.task, "expression": problem.expression,
            "numbers": list(problem.numbers), "targets": list(problem.targets), "reward_source": "rule"}


def code_record(task: code.CodeTask, language: str) -> dict:
    question = task.question[language]
    return {"question": question, "prompt": text.local_r1_zero_prompt(question), "tests": list(task.tests),
            "entry_point": task.entry_point, "solution": task.solution, "language": language, "task": "code",
            "reward_source": "rule"}


def cold_start_records(rng: random.Random, problems: list, code_tasks: list, n_code: int) -> list:
    """Readable-format SFT samples (correct answers only) for the math problems plus `n_code` code tasks."""
    records = []
    for problem in problems:
        language = rng.choice(lex.LANGUAGES)
        question = text.question_text(problem, language, rng.randrange(text.n_question_forms(problem.task, language)))
        records.append({"question": question, "prompt": question,
                        "response": text.cold_start_response(problem, language, rng, detour=rng.random() < 0.25),
                        "task": problem.task,
                        "answer": str(problem.answer), "language": language})
    for task in rng.sample(code_tasks, min(n_code, len(code_tasks))):
        language = rng.choice(lex.LANGUAGES)
        records.append({"question": task.question[language], "prompt": task.question[language],
                        "response": f"{text.REASONING_TOKEN}{task.plan[language]}{text.SUMMARY_TOKEN}{task.solution}",
                        "task": "code", "answer": task.solution, "language": language})
    rng.shuffle(records)
    return records


def _write_jsonl(path: str, records: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def build_world(seed: int = 0, scale: str = "tiny", mix: corpus.CorpusMix = corpus.CorpusMix()) -> tuple:
    """({file name: records}, pre-training mix report): the whole tiny world in memory."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    size = SCALES[scale]
    rng = lambda name: random.Random(f"{seed}:{name}")  # noqa: E731 - one independent stream per file
    splits = problem_splits(seed, size)
    code_heldout, code_train, code_pretrain = code.split_code_tasks(seed, size.code_heldout, size.code_train)
    facts = list(world.fact_items())
    random.Random(f"{seed}:facts").shuffle(facts)
    n_fact_heldout = max(len(facts) // 5, 1)
    harm_train, harm_heldout = world.harm_combos()

    pool = splits["pretrain"]
    arith_pool = {n: [p for p in pool if p.task == "arith" and len(tasks.steps_of(p.expression)) == n] for n in (2, 3)}
    countdown_pool = [p for p in pool if p.task == "countdown"]
    pretrain, counts = corpus.pretrain_documents(rng("pretrain"), size.pretrain_docs, arith_pool, countdown_pool,
                                                 code_pretrain, mix)

    def rl_split(name):
        r = rng(name)
        out = []
        for p in splits[name]:
            language = r.choice(lex.LANGUAGES)
            out.append(rl_record(p, language, r.randrange(text.n_question_forms(p.task, language))))
        return out

    def code_split(name, tasks_):
        r = rng(name)
        return [code_record(t, r.choice(lex.LANGUAGES)) for t in tasks_]

    n_code_cold = size.cold_start // 10
    files = {
        "pretrain": pretrain,
        "rl_train": rl_split("rl_train"),
        "rl_heldout": rl_split("rl_heldout"),
        "code_train": code_split("code_train", code_train),
        "code_heldout": code_split("code_heldout", code_heldout),
        "cold_start": cold_start_records(rng("cold_start"), splits["cold_start"][:size.cold_start - n_code_cold],
                                         code_pretrain, n_code_cold),
        "non_reasoning": [dict(item, prompt=item["question"])
                          for item in world.non_reasoning_items()],
        "preferences_train": prefs.preference_pairs(rng("preferences_train"), size.preferences_train,
                                                    splits["pref_train"], facts[n_fact_heldout:], harm_train),
        "preferences_heldout": prefs.preference_pairs(rng("preferences_heldout"), size.preferences_heldout,
                                                      splits["pref_heldout"], facts[:n_fact_heldout], harm_heldout),
        "general_prompts": prefs.general_prompts(rng("general_prompts"), size.general_prompts, harm_train),
    }
    return files, corpus.mix_report(counts, size.pretrain_docs)


def write_world(out_dir: str, seed: int = 0, scale: str = "tiny", mix: corpus.CorpusMix = corpus.CorpusMix()) -> dict:
    """Write the tiny world's JSONL files and manifest.json into `out_dir`; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    files, mix_report = build_world(seed, scale, mix)
    paths, cjk = {}, set()
    for name, records in files.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        _write_jsonl(paths[name], records)
        for record in records:
            cjk |= lex.cjk_characters(json.dumps(record, ensure_ascii=False))
    manifest = {
        "seed": seed,
        "scale": scale,
        "files": {name: {"path": os.path.basename(p), "count": len(files[name])} for name, p in paths.items()},
        "pretrain_mix": mix_report,
        "special_tokens": [text.REASONING_TOKEN, text.SUMMARY_TOKEN, "<think>", "</think>", "<answer>", "</answer>"],
        "cjk_characters": "".join(sorted(cjk)),
    }
    paths["manifest"] = os.path.join(out_dir, "manifest.json")
    with open(paths["manifest"], "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", default="tiny", choices=sorted(SCALES))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_world(args.out, args.seed, args.scale)
    with open(paths["manifest"], encoding="utf-8") as f:
        manifest = json.load(f)
    for name, entry in manifest["files"].items():
        print(f"{name:20s} {entry['count']:7d}  {os.path.getsize(paths[name]) / 1e6:6.2f} MB  {paths[name]}")
    print(f"wrote the tiny world (seed {args.seed}, scale {args.scale}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
