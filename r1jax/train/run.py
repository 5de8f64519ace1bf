"""One run's lifecycle, below every stage: open it, load the policy it starts from, find its files, loop, finish.

    run = open_run(config, workdir)                 # WORKDIR, mesh, checkpoints, the resume point
    cfg, init = run.initial_policy()                # resume: the saved architecture; else config.init_from's
    tokenizer_path, tokenizer = run.tokenizer(cfg, init)
    files = data_files(config.data, workdir, "train_files", "world_files")
    ...the stage builds its state and its step function...
    return run.finish(run.loop(state, step_fn, meta_fn=...), tokenizer_path)

Config conventions (configs/common.py builds these blocks):
  config.seed            model init and data order
  config.model           {preset, overrides}: a ModelConfig preset plus field overrides (None = preset's)
  config.mesh            {ici, dcn, rules}: mesh axis sizes (-1 = fill) and logical -> mesh axis rules
  config.init_from       where the weights come from when the workdir has no checkpoint yet: an r1jax run
                         directory (or its checkpoints/ or a step dir) or a Hugging Face directory
  config.data            the stage's input files (paths, globs, directories; r1jax/data/files.py); empty files
                         with data.tiny_world = the tiny world's files (r1jax/world), written into WORKDIR/world
  config.train           steps, log_every, eval_every, checkpoint_every, keep_checkpoints, async_checkpoints,
                         progress: the loop's cadence (r1jax/train/loop.py)
Outputs of a stage live in its workdir and are listed in StageResult.outputs (checkpoint, tokenizer, ...), so a
later stage's inputs can name an earlier stage's outputs (the pipeline's @stage:output references).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, NamedTuple

import jax

from r1jax import models
from r1jax.data import files as files_lib
from r1jax.sharding import make_mesh
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train.loop import LoopResult, train_loop
from r1jax.train.metrics import MetricsLogger, forget_after, read_metrics

log = logging.getLogger(__name__)

# ModelConfig fields that describe training numerics, not the architecture: a checkpoint brings its architecture,
# the config brings these.
# attn_block / logits_chunk / decode_block / moe_gmm_tiling too: an HF config.json has none, and without them a
# 32k-token run would materialise whole attention scores and logits.
TRAINING_FIELDS = ("dtype", "param_dtype", "remat", "bias_update_rate", "aux_loss_alpha", "mtp_loss_weight",
                   "moe_impl", "moe_tile", "moe_gmm_tiling", "init_std", "attn_block", "logits_chunk", "decode_block")


class ConfigError(ValueError):
    """A config names something that is not there or cannot work (empty file list, no tokenizer, ...); main prints
    it as one line, without a traceback."""


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


def is_primary() -> bool:
    return jax.process_index() == 0


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


# ------------------------------------------------------------------------------------------ policies


class Policy(NamedTuple):
    cfg: models.ModelConfig
    params: Any
    tokenizer_path: str | None  # None: an HF directory without tokenizer files

    @property
    def tokenizer(self):
        from r1jax.data.tokenizer import load_tokenizer  # noqa: PLC0415

        if self.tokenizer_path is None:
            raise FileNotFoundError("the policy's checkpoint has no tokenizer; set config.data.tokenizer")
        return load_tokenizer(self.tokenizer_path)


def resolve_policy_path(path: str) -> str:
    """`path` itself when it holds an r1jax checkpoint (run dir, checkpoints/ or step dir); else the absolute
    directory of the Hugging Face checkpoint it names: a directory, or a Hub id (`org/name[@rev]`) found in the
    local Hugging Face cache (r1jax.hf.resolve_checkpoint: never a download; a clear error saying what to fetch)."""
    if ckpt_lib.find_checkpoint(path) is not None:
        return path
    from r1jax import hf  # noqa: PLC0415

    return hf.resolve_checkpoint(path)


def with_numerics(cfg: models.ModelConfig, numerics: models.ModelConfig | None) -> models.ModelConfig:
    """`cfg` (a checkpoint's architecture) with the TRAINING_FIELDS of `numerics` (a stage's configured model)."""
    if numerics is None:
        return cfg
    return cfg.replace(**{name: getattr(numerics, name) for name in TRAINING_FIELDS})


def policy_config(path: str, numerics: models.ModelConfig | None = None) -> models.ModelConfig:
    """The model config of the checkpoint `path` names (see load_policy), read without loading a weight: an r1jax
    checkpoint's saved ModelConfig, or a Hugging Face checkpoint's config.json (only that file is read: the AOT
    fit check needs no weights), with `numerics`' TRAINING_FIELDS."""
    found = ckpt_lib.find_checkpoint(path)
    if found is not None:
        return with_numerics(_saved_config(path, found), numerics)
    directory = os.path.expanduser(path)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        directory = resolve_policy_path(path)
    from r1jax import hf  # noqa: PLC0415

    with open(os.path.join(directory, "config.json")) as f:
        return with_numerics(hf.config_from_hf(json.load(f)), numerics)


def _saved_config(path: str, found: tuple[str, int]) -> models.ModelConfig:
    reader = ckpt_lib.Checkpointer(found[0], read_only=True)
    meta = reader.restore_meta(found[1])
    reader.close()
    if "model" not in meta:
        raise ValueError(f"{path}: the checkpoint's meta has no model config (written by an old r1jax?)")
    return models.ModelConfig(**meta["model"])


def load_policy(path: str, mesh, rules, numerics: models.ModelConfig | None = None) -> Policy:
    """(model config, params laid out on `mesh`, tokenizer path) of an r1jax run (its directory, checkpoints/ or a
    step dir: the saved ModelConfig and tokenizer) or a Hugging Face checkpoint (a directory or a Hub id in the
    local cache, resolve_policy_path: config.json, *.safetensors and its tokenizer files; the tokenizer path is
    the checkpoint's absolute directory, which the run records so that `python -m r1jax.hf` can export it with
    the source's tokenizer, chat template and EOS ids). The architecture always comes from the checkpoint;
    `numerics` (a stage's configured model), when given, sets the TRAINING_FIELDS (dtype, remat, attention and
    logits chunks, ...)."""
    found = ckpt_lib.find_checkpoint(path)
    if found is not None:
        cfg = with_numerics(_saved_config(path, found), numerics)
        params, meta = ckpt_lib.load_params(path, cfg, models.param_shardings(cfg, mesh, rules))
        return Policy(cfg, params, meta.get("tokenizer"))
    directory = resolve_policy_path(path)
    from r1jax import hf  # noqa: PLC0415

    dtype = numerics.param_dtype if numerics is not None else "float32"
    cfg, params = hf.load_hf_checkpoint(directory, dtype=dtype, mesh=mesh, rules=rules)
    has_tokenizer = os.path.isfile(os.path.join(directory, "tokenizer.json"))
    return Policy(with_numerics(cfg, numerics), params, directory if has_tokenizer else None)


# ------------------------------------------------------------------------------------------ files


def data_files(data, workdir: str, field: str, world_field: str | None = None, *, required: bool = True) -> list[str]:
    """The files of `data.<field>` (paths, globs, directories: r1jax/data/files.py); when it is empty and
    data.tiny_world is set, the tiny world's `data.<world_field>` files (written into WORKDIR/world on demand).
    Empty and `required`: an error naming the field."""
    listed = list(data.get(field) or ())
    if listed:
        return files_lib.expand(listed, field=f"config.data.{field}")
    if data.get("tiny_world") and world_field and data.get(world_field):
        from r1jax import world  # noqa: PLC0415

        return world.world_files(workdir, int(data.world_seed), data[world_field])
    if required:
        raise ConfigError(f"config.data.{field} is empty (set it, or data.tiny_world=True at tiny scale)")
    return []


# ------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Run:
    """An open run: see open_run."""

    config: Any
    stage: str
    workdir: str
    mesh: Any
    rules: tuple
    checkpointer: ckpt_lib.Checkpointer
    resume_step: int | None  # the run's latest checkpoint (None: it starts now)
    resume_meta: dict | None

    @property
    def resumed(self) -> bool:
        return self.resume_meta is not None

    def initial_policy(self) -> tuple[models.ModelConfig, Policy | None]:
        """(model config, initial policy or None). Resumed: the saved architecture, no params (they come with the
        run's own checkpoint). Else config.init_from's policy (its architecture, the config's numerics), else the
        configured model and None (a fresh init)."""
        cfg = model_config(self.config.model)
        if self.resumed:
            log.info("resuming %s from step %d", self.workdir, self.resume_step)
            return models.ModelConfig(**self.resume_meta["model"]), None
        if self.config.get("init_from"):
            policy = load_policy(self.config.init_from, self.mesh, self.rules, numerics=cfg)
            log.info("initial weights from %s (%s)", self.config.init_from,
                     resolve_policy_path(self.config.init_from))
            return policy.cfg, policy
        return cfg, None

    def tokenizer(self, cfg: models.ModelConfig, init: Policy | None = None):
        """(path, tokenizer): config.data.tokenizer, else the resumed run's, else the initial policy's, else (tiny
        world) the world's; checked to fit the model's vocabulary."""
        from r1jax.data.tokenizer import load_tokenizer  # noqa: PLC0415

        data = self.config.data
        path = next((p for p in (data.tokenizer, (self.resume_meta or {}).get("tokenizer"),
                                 init.tokenizer_path if init else None) if p), None)
        if path is None:
            if not data.get("tiny_world"):
                raise ConfigError("no tokenizer: set config.data.tokenizer (a SentencePiece .model or an HF "
                                  "tokenizer dir)")
            from r1jax import world  # noqa: PLC0415

            path = world.world_tokenizer(self.workdir, int(data.world_seed), model_config(self.config.model).vocab_size)
        if os.path.exists(path):  # recorded in the run's meta: absolute, so export finds it from anywhere
            path = os.path.abspath(path)
        tokenizer = load_tokenizer(path)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ConfigError(f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.vocab_size}; set config.model.overrides.vocab_size")
        return path, tokenizer

    def restore(self, abstract_state):
        """(state, meta) of the run's latest checkpoint, laid out as `abstract_state`."""
        return self.checkpointer.restore(self.resume_step, abstract_state)

    def loop(self, state, step_fn, *, meta_fn, steps: int | None = None, **kwargs) -> LoopResult:
        """r1jax/train/loop.py's train_loop with the config's cadence (config.train) and a MetricsLogger for
        WORKDIR (metrics.jsonl, TensorBoard, progress bar; process 0 only)."""
        train = self.config.train
        steps = int(train.steps) if steps is None else steps
        if not self.resumed and is_primary():  # a fresh start redoes what an attempt logged before its first save
            forget_after(os.path.join(self.workdir, "metrics.jsonl"), None)
        logger = MetricsLogger(self.workdir, total_steps=steps, start_step=int(jax.device_get(state.step)),
                               enabled=is_primary(), progress=train.progress,
                               desc=os.path.basename(self.workdir) or self.stage)
        kwargs.setdefault("eval_every", int(train.get("eval_every", 0)))
        return train_loop(state, step_fn, steps=steps, checkpointer=self.checkpointer, logger=logger,
                          meta_fn=lambda: {"stage": self.stage, **meta_fn()}, log_every=int(train.log_every),
                          checkpoint_every=int(train.checkpoint_every), **kwargs)

    def finish(self, result: LoopResult, tokenizer_path: str, **outputs: str) -> StageResult:
        """Closes the checkpointer; the StageResult (final checkpoint, tokenizer, metrics.jsonl, `outputs`).
        Nothing left to train (a rerun of a finished run): the final metrics are the last logged record."""
        self.checkpointer.close()
        metrics_path = os.path.join(self.workdir, "metrics.jsonl")
        metrics = result.metrics
        if not metrics and os.path.exists(metrics_path):
            records = read_metrics(metrics_path)
            metrics = records[-1] if records else {}
        step = result.checkpoint_step
        checkpoint = self.checkpointer.step_dir(step) if step is not None else None
        return StageResult(stage=self.stage, workdir=self.workdir, status=result.status, checkpoint=checkpoint,
                           outputs={"checkpoint": checkpoint, "tokenizer": tokenizer_path, "metrics": metrics_path,
                                    **outputs}, metrics=metrics)


def open_run(config, workdir: str, stage: str | None = None) -> Run:
    """WORKDIR (absolute, created), the mesh of config.mesh, the Checkpointer of WORKDIR/checkpoints and the run's
    resume point (its latest checkpoint and that step's meta, None before the first save)."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh, rules = mesh_and_rules(config.mesh)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.train.keep_checkpoints,
                                         async_save=config.train.async_checkpoints)
    resume_step = checkpointer.latest_step()
    resume_meta = checkpointer.restore_meta(resume_step) if resume_step is not None else None
    return Run(config=config, stage=stage or config.stage, workdir=workdir, mesh=mesh, rules=rules,
               checkpointer=checkpointer, resume_step=resume_step, resume_meta=resume_meta)
