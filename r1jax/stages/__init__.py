"""Stages: one module per stage, each with `run(config, workdir) -> StageResult`.

`config.stage` names the stage; STAGES maps the name to its module (imported only when run, so a new
stage is one line here and costs nothing to the others). `run` is what `python -m r1jax.main` and the
pipeline call: it writes WORKDIR/config.json, runs the stage and writes WORKDIR/result.json. The pipeline stage is
the only way to chain stages (its @stage:output references); no stage module imports another (tests/test_layering.py).
Below the stages: r1jax/train/run.py (the run lifecycle and the one loop), r1jax/world (the tiny world).
"""

from __future__ import annotations

import importlib
import os

from r1jax.train.run import StageResult, write_json

STAGES: dict[str, str] = {
    "sft": "r1jax.stages.sft",  # pretrain, cold start, 800k SFT, distillation
    "grpo": "r1jax.stages.grpo",  # R1-Zero, reasoning RL, all-scenario RL
    "reward_model": "r1jax.stages.reward_model",  # helpfulness / harmlessness reward models
    "rejection_sampling": "r1jax.stages.rejection_sampling",  # RL samples -> the SFT dataset
    "eval": "r1jax.stages.eval",  # pass@1 over k samples, cons@k, per benchmark and model
    "report": "r1jax.stages.report",  # plots + held-out accuracy table of a pipeline run
    "pipeline": "r1jax.stages.pipeline",  # configs/r1.py: the whole recipe, stage after stage
}


def get_stage(name: str):
    """The module of stage `name` (it has `run(config, workdir) -> StageResult`)."""
    if name not in STAGES:
        raise KeyError(f"config.stage={name!r} is not a known stage; known: {sorted(STAGES)} "
                       "(register new stages in r1jax/stages/__init__.py)")
    return importlib.import_module(STAGES[name])


def run(config, workdir: str) -> StageResult:
    """Runs the stage `config.stage` in `workdir`: writes config.json first and result.json at the end."""
    import jax

    module = get_stage(config.stage)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "config.json"), config.to_dict())
    result = module.run(config, workdir)
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "result.json"), result.to_dict())
    return result


__all__ = ["STAGES", "StageResult", "get_stage", "run"]
