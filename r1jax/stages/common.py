"""What every stage shares: StageResult, config -> model / mesh, JSON files, the tiny world on demand.

Config conventions (configs/common.py builds these blocks):
  config.stage           name in r1jax.stages.STAGES
  config.seed            model init and data order
  config.model           {preset, overrides}: a ModelConfig preset plus field overrides (None = preset's)
  config.mesh            {ici, dcn, rules}: mesh axis sizes (-1 = fill) and logical -> mesh axis rules
  config.init_from       where the weights come from when the workdir has no checkpoint yet: an r1jax run
                         directory (or its checkpoints/ or a step dir), a Hugging Face directory, or None
  config.data            the stage's input files (train_files, eval_files, tokenizer); empty train_files
                         at tiny scale = generate the tiny synthetic world into WORKDIR/world
Outputs of a stage live in its workdir and are listed in StageResult.outputs (checkpoint, tokenizer, ...),
so a later stage's inputs (init_from, data.tokenizer, data.train_files) can name an earlier stage's outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from r1jax import models
from r1jax.sharding import make_mesh


@dataclasses.dataclass
class StageResult:
    stage: str
    workdir: str
    status: str  # "done" | "preempted" | "data_exhausted" (finished early: the data ran out)
    checkpoint: str | None = None  # the final checkpoint's step directory
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)  # named artifacts (paths)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # final metrics

    @property
    def finished(self) -> bool:
        return self.status in ("done", "data_exhausted")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def model_overrides(model_block) -> dict[str, Any]:
    """The overrides a config sets (placeholders left at None mean "the preset's value")."""
    return {k: v for k, v in model_block.overrides.to_dict().items() if v is not None}


def model_config(model_block) -> models.ModelConfig:
    return models.get_preset(model_block.preset, **model_overrides(model_block))


def mesh_and_rules(mesh_block):
    """(jax Mesh, rules tuple) from config.mesh: ici/dcn axis sizes and rules {logical: (mesh axes)}."""
    mesh = make_mesh(dict(mesh_block.ici), dict(mesh_block.dcn))
    rules = tuple((name, tuple(axes) or None) for name, axes in mesh_block.rules.to_dict().items())
    return mesh, rules


def is_primary() -> bool:
    return jax.process_index() == 0
