"""Checkpoints with orbax: async, keep-N, step-named, atomic; resumable exactly.

Layout of a run's checkpoints, `WORKDIR/checkpoints/<step>/`:
    params/     the fp32 master weights (StandardSave: sharded, restored straight into the mesh)
    opt_state/  the optimizer state
    meta/       JSON (written by process 0): step, rng, model config, tokenizer path, anything a stage adds
    data/       the data iterator state of every process, `process_<i>-of-<n>.json` (grain's handler): each
                host reads a different share of the data, so each resumes from its own state

Orbax writes each step to a temporary directory and renames it when complete, so a checkpoint either
exists whole or not at all (a SIGKILL mid-save leaves a temporary directory that the next run removes).
The device-to-host copy happens inside `save`; the write to disk continues in the background, so the
next train step may donate the state right away.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from typing import Any

import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from r1jax import models
from r1jax.train.state import TrainState

ITEMS = ("params", "opt_state", "meta", "data")


class _DataState:
    """A JSON-able iterator state in the shape grain's per-process checkpoint handler expects. Saving a
    snapshot (not the live iterator) keeps the state of the checkpointed step even if the write is late."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw)

    def start_prefetch(self) -> None:
        pass


# The Checkpointers not yet closed: `close_open` closes them when a run ends on an error before its stage could.
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def close_open() -> None:
    """Close every Checkpointer still open (their orbax managers finish their background work). For an exit on
    an error: a manager left open has futures that may still run while the interpreter shuts down, and orbax
    then prints their failure as a traceback after the error message."""
    for ckpt in list(_OPEN):
        ckpt.close()


class Checkpointer:
    """One run's checkpoints under `directory` (usually WORKDIR/checkpoints)."""

    def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=not read_only,
            cleanup_tmp_directories=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
        _OPEN.add(self)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, meta: dict[str, Any], data: Any = None) -> int:
        """Starts saving `state` at its step (returns the step). `meta` (JSON) is written by process 0;
        `data` (JSON, this process's data iterator state) by every process."""
        step = int(jax.device_get(state.step))
        meta = {**meta, "step": step, "rng": np.asarray(jax.device_get(state.rng)).tolist()}
        items = dict(params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
                     meta=ocp.args.JsonSave(meta))
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_DataState(data))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        return step

    def restore(self, step: int, abstract: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state at `step`, laid out as `abstract` (ShapeDtypeStructs with shardings), and its meta
        (with this process's data iterator state under "data" when the checkpoint has one)."""
        items = dict(params=ocp.args.StandardRestore(abstract.params),
                     opt_state=ocp.args.StandardRestore(abstract.opt_state), meta=ocp.args.JsonRestore())
        has_data = os.path.isdir(os.path.join(self.step_dir(step), "data"))
        if has_data:
            items["data"] = grain.checkpoint.CheckpointRestore(_DataState())
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = dict(out["meta"])
        if has_data:
            meta["data"] = out["data"].state
        state = TrainState(
            step=jax.device_put(jnp.asarray(meta["step"], jnp.int32), abstract.step.sharding),
            params=out["params"], opt_state=out["opt_state"],
            rng=jax.device_put(np.asarray(meta["rng"], np.uint32), abstract.rng.sharding))
        return state, meta

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, abstract_params) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        _OPEN.discard(self)
        self.manager.close()


# --------------------------------------------------------------------------------- init_from other runs

def find_checkpoint(path: str) -> tuple[str, int] | None:
    """(checkpoints directory, step) for an r1jax run directory, its `checkpoints/` directory or one step
    directory inside it; None when `path` holds no r1jax checkpoint (e.g. a Hugging Face directory)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "meta")):
        parent, name = os.path.split(path)
        return (parent, int(name)) if name.isdigit() else None
    if os.path.isdir(path):
        steps = [int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n, "meta"))]
        if steps:
            return path, max(steps)
    return None


def load_params(path: str, cfg: models.ModelConfig, shardings) -> tuple[Any, dict[str, Any]]:
    """Params (laid out by `shardings`) and meta of the r1jax checkpoint at `path` (see find_checkpoint).
    Fails with the differing fields when the checkpoint was written for a different architecture."""
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no r1jax checkpoint (expected a run dir, its checkpoints/ or a step dir)")
    directory, step = found
    ckpt = Checkpointer(directory, read_only=True)
    meta = ckpt.restore_meta(step)
    if "model" in meta:
        saved = models.ModelConfig(**meta["model"])
        saved_shapes = jax.tree.map(lambda s: s.shape, models.abstract_params(saved))
        want_shapes = jax.tree.map(lambda s: s.shape, models.abstract_params(cfg))
        if saved_shapes != want_shapes:
            diff = {f.name: (getattr(saved, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                    if getattr(saved, f.name) != getattr(cfg, f.name)}
            raise ValueError(f"{directory}/{step}: checkpoint params do not match the configured model; "
                             f"differing ModelConfig fields (checkpoint, config): {diff}")
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            models.abstract_params(cfg), shardings)
    params = ckpt.restore_params(step, abstract)
    ckpt.close()
    return params, {**meta, "checkpoint": os.path.join(directory, str(step))}
