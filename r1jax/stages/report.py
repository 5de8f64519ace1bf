"""The report stage: plots of every stage's metrics.jsonl and the held-out accuracy table of a pipeline run.

    python -m r1jax.main --config configs/r1.py:tiny --workdir DIR     (the pipeline's last stage)

Reads DIR/summary.json (r1jax/stages/pipeline.py) and writes, into its own workdir, one PNG per stage (matplotlib,
Agg): RL stages (grpo) plot reward, accuracy, response length, KL and the language-consistency reward per step;
SFT stages the training (and eval) loss; reward models the loss and held-out pairwise accuracy. DIR/report.md
holds the table of held-out accuracy after each stage (the eval stage's pass@1 and cons@k on
config.table_benchmark), the stages' status and wall time, and the images.
"""

from __future__ import annotations

import json
import os

import numpy as np

from r1jax.stages.common import StageResult, is_primary

LABELS = {"pretrain": "base", "r1_zero": "R1-Zero", "cold_start": "cold start", "reasoning_rl": "reasoning RL",
          "sft": "SFT (800k recipe)", "all_scenario_rl": "all-scenario RL (R1)", "student_base": "student base",
          "distill": "distilled student", "distill_baseline": "student without distilled data"}
# per stage kind: panels of (title, metric keys tried in order); the first key present is plotted
PANELS = {
    "grpo": (("reward", ("reward_mean",)), ("accuracy", ("reward/answer_accuracy", "accuracy")),
             ("response length", ("response_length_mean",)), ("KL", ("kl",)),
             ("language consistency", ("reward/language_consistency",))),
    "sft": (("loss", ("ce_loss", "loss")), ("eval loss", ("eval_loss",))),
    "reward_model": (("Bradley-Terry loss", ("bt_loss", "loss")),
                     ("held-out pair accuracy", ("heldout_pair_accuracy",))),
}


def run(config, workdir: str) -> StageResult:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    pipeline_dir = os.path.abspath(config.pipeline_dir)
    with open(os.path.join(pipeline_dir, "summary.json")) as f:
        summary = json.load(f)
    images = {}
    for name, entry in summary.items():
        metrics_path = (entry.get("outputs") or {}).get("metrics")
        if entry.get("stage") in PANELS and metrics_path and os.path.isfile(metrics_path):
            path = os.path.join(workdir, f"{name}.png")
            if is_primary() and plot_stage(name, entry["stage"], read_records(metrics_path), path):
                images[name] = path
    text = render(summary, images, pipeline_dir, config.table_benchmark)
    report = os.path.join(pipeline_dir, "report.md")
    if is_primary():
        with open(report + ".tmp", "w") as f:
            f.write(text)
        os.replace(report + ".tmp", report)
    return StageResult(stage="report", workdir=workdir, status="done", outputs={"report": report, **images},
                       metrics=trends(summary))


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict], keys) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(key, steps, values) of the first key with finite numeric values in the records."""
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            return key, np.asarray(steps), np.asarray(values, float)
    return None


def plot_stage(name: str, kind: str, records: list[dict], path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, series(records, keys)) for title, keys in PANELS[kind]]
    panels = [(title, s) for title, s in panels if s is not None]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, (key, steps, values)) in zip(axes[0], panels):
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(LABELS.get(name, name))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def trends(summary: dict) -> dict[str, float]:
    """First and last values of the RL curves (mean of the first / last quarter of the logged rollouts)."""
    out = {}
    for name, entry in summary.items():
        path = (entry.get("outputs") or {}).get("metrics")
        if entry.get("stage") != "grpo" or not path or not os.path.isfile(path):
            continue
        records = [r for r in read_records(path) if "reward_mean" in r]
        for key in ("reward_mean", "reward/language_consistency", "reward/answer_accuracy", "accuracy",
                    "response_length_mean"):
            values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
            if len(values) >= 4:  # a metric the stage does not log is left out
                q = max(len(values) // 4, 1)
                out[f"{name}/{key}/first"] = float(np.mean(values[:q]))
                out[f"{name}/{key}/last"] = float(np.mean(values[-q:]))
    return out


def render(summary: dict, images: dict[str, str], pipeline_dir: str, bench: str) -> str:
    lines = ["# R1 pipeline report", "", f"Run: `{pipeline_dir}`", "",
             f"## Held-out accuracy after each stage ({bench})", "",
             "| stage | model | pass@1 | cons@k | other benchmarks (pass@1) |", "|---|---|---|---|---|"]
    for name, entry in summary.items():
        scores = entry.get("eval") or {}
        if not scores:
            continue
        others = ", ".join(f"{k.split('/')[0]} {100 * v:.1f}" for k, v in scores.items()
                           if k.endswith("/pass@1") and not k.startswith(f"{bench}/"))
        cell = lambda key: f"{100 * scores[key]:.1f}" if key in scores else "-"  # noqa: E731
        lines.append(f"| {name} | {LABELS.get(name, name)} | {cell(f'{bench}/pass@1')} | {cell(f'{bench}/cons@k')} "
                     f"| {others or '-'} |")
    lines += ["", "pass@1: mean correctness over k samples per question (temperature 0.6, top-p 0.95), in %; "
              "cons@k: majority vote over the k answers.", "", "## Stages", "",
              "| # | stage | kind | status | wall time (s) | CPU time (s) | final metrics |",
              "|---|---|---|---|---|---|---|"]
    for i, (name, entry) in enumerate(summary.items()):
        if "stage" not in entry:  # running now: the report itself
            continue
        lines.append(f"| {i} | {name} | {entry.get('stage', '-')} | {entry.get('status', '-')} | "
                     f"{entry.get('seconds', '-')} | {entry.get('cpu_seconds', '-')} | {key_metrics(entry)} |")
    trend = trends(summary)
    if trend:
        lines += ["", "## RL curves (mean of the first and the last quarter of the logged rollouts)", "",
                  "| stage | metric | first | last |", "|---|---|---|---|"]
        for key in sorted(k for k in trend if k.endswith("/first")):
            stage, metric = key.split("/", 1)[0], key[len(key.split("/", 1)[0]) + 1:-len("/first")]
            lines.append(f"| {stage} | {metric} | {trend[key]:.3f} | {trend[key[:-5] + 'last']:.3f} |")
    if images:
        lines += ["", "## Curves", ""]
        for name, path in images.items():
            lines += [f"![{name}]({os.path.relpath(path, pipeline_dir)})", ""]
    return "\n".join(lines) + "\n"


def key_metrics(entry: dict) -> str:
    m = entry.get("metrics") or {}
    keys = {"grpo": ("step", "reward_mean", "response_length_mean"), "sft": ("step", "loss", "eval_loss"),
            "reward_model": ("step", "heldout_pair_accuracy"),
            "rejection_sampling": ("reasoning_samples", "non_reasoning_samples", "kept_rate")}
    keys = keys.get(entry.get("stage"), ())
    return ", ".join(f"{k} {m[k]:.4g}" if isinstance(m[k], float) else f"{k} {m[k]}" for k in keys if k in m) or "-"
