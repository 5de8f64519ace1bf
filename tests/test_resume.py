"""Exact resume after SIGKILL (same per-step losses and data order as an uninterrupted run, bit for bit on
CPU) and a clean, restorable checkpoint on SIGTERM (TPU preemption)."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import sft as sft_config
from configs.common import TINY_VOCAB
from r1jax import world as world_lib
from r1jax.data.sources import iterate_records
from r1jax.stages import sft as stage
from r1jax.train.run import mesh_and_rules, model_config
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import state as state_lib
from r1jax.train.metrics import read_metrics

from helpers import REPO, subprocess_env
STEPS = 30  # the settings of test_train's CLI run: one compiled step serves both (persistent cache)
EXACT_KEYS = ("loss", "ce_loss", "mtp_loss", "grad_norm", "lr", "trained_tokens", "data/epoch", "data/fill")


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Starts `python -m r1jax.main` on the tiny SFT config with shared, pre-built data files."""
    data_dir = tmp_path_factory.mktemp("resume_data")
    world = world_lib.ensure_world(str(data_dir), seed=0)
    tokenizer = world_lib.train_world_tokenizer(world, os.path.join(world, "tokenizer"), TINY_VOCAB)
    records = list(iterate_records([os.path.join(world, f) for f in ("cold_start.jsonl", "non_reasoning.jsonl")]))
    random.Random(0).shuffle(records)
    train, evals = [str(data_dir / "train.jsonl")], [str(data_dir / "eval.jsonl")]
    for path, part in ((evals[0], records[:48]), (train[0], records[48:])):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    env = subprocess_env(tmp_path_factory.getbasetemp() / "jax_cache")

    def start(workdir, *extra):
        cmd = [sys.executable, "-m", "r1jax.main", "--config", "configs/sft.py:tiny", "--workdir", str(workdir),
               f"--config.train.steps={STEPS}", "--config.data.seq_len=128", "--config.train.log_every=1",
               "--config.train.eval_every=15",
               "--config.train.progress=False", f"--config.data.train_files={train[0]}",
               f"--config.data.eval_files={evals[0]}", f"--config.data.tokenizer={tokenizer}", *extra]
        with open(f"{workdir}.stderr", "a") as err:  # a file: a full pipe would stall the run
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, text=True)
        proc.stderr_path = f"{workdir}.stderr"
        return proc

    return start


def _stderr(proc) -> str:
    with open(proc.stderr_path) as f:
        return f.read()


def _finish(proc, timeout=900):
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, _stderr(proc)[-4000:]
    return _stderr(proc)


def _signal_when(predicate, proc, signum) -> threading.Thread:
    """A watcher thread that sends `signum` to `proc` as soon as `predicate()` holds (the runs go on while
    the tests wait for other processes)."""

    def watch():
        while proc.poll() is None:
            if predicate():
                proc.send_signal(signum)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _records(workdir):
    return {r["step"]: r for r in read_metrics(str(workdir / "metrics.jsonl"))}


@pytest.fixture(scope="module")
def runs(launch, tmp_path_factory):
    """Three runs start together (one compiled step serves all through the persistent cache): one runs
    uninterrupted, one is SIGKILLed once its step-8 checkpoint exists, one is SIGTERMed after 3 steps."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("uninterrupted", "killed", "preempted")}
    procs = {
        "uninterrupted": launch(dirs["uninterrupted"], "--config.train.checkpoint_every=8"),
        "killed": launch(dirs["killed"], "--config.train.checkpoint_every=8"),
        "preempted": launch(dirs["preempted"], "--config.train.checkpoint_every=1000"),
    }
    watchers = [
        _signal_when(lambda: os.path.isdir(dirs["killed"] / "checkpoints" / "8" / "meta"), procs["killed"],
                     signal.SIGKILL),
        _signal_when(lambda: os.path.exists(dirs["preempted"] / "metrics.jsonl")
                     and len(_records(dirs["preempted"])) >= 3, procs["preempted"], signal.SIGTERM),
    ]
    yield dirs, procs, watchers
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(runs):
    dirs, procs, _ = runs
    _finish(procs["uninterrupted"])
    return _records(dirs["uninterrupted"])


def test_sigkill_then_rerun_matches_uninterrupted_run_exactly(launch, runs, reference):
    dirs, procs, watchers = runs
    workdir, proc = dirs["killed"], procs["killed"]
    proc.wait(timeout=900)
    watchers[0].join()
    assert proc.returncode == -signal.SIGKILL, _stderr(proc)[-4000:]
    logged = sorted(_records(workdir))
    assert not (workdir / "result.json").exists() and 8 <= logged[-1] < STEPS, logged  # killed mid-way

    _finish(launch(workdir, "--config.train.checkpoint_every=8"))
    resumed = _records(workdir)
    assert sorted(resumed) == sorted(reference) == list(range(1, STEPS + 1))
    for step in reference:
        for key in EXACT_KEYS + (("eval_loss",) if "eval_loss" in reference[step] else ()):
            assert resumed[step][key] == reference[step][key], (step, key, resumed[step][key], reference[step][key])
    assert json.loads((workdir / "result.json").read_text())["status"] == "done"


def test_sigterm_saves_a_restorable_checkpoint_of_the_current_step(runs, reference):
    dirs, procs, watchers = runs
    workdir, proc = dirs["preempted"], procs["preempted"]
    err = _finish(proc)
    watchers[1].join()
    assert "SIGTERM" in err
    result = json.loads((workdir / "result.json").read_text())
    step = result["metrics"]["step"]
    assert result["status"] == "preempted" and 3 <= step < STEPS
    assert max(_records(workdir)) == step
    assert result["checkpoint"] == str(workdir / "checkpoints" / str(step))
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]  # only the preemption checkpoint

    config = sft_config.get_config("tiny")
    config.train.steps = STEPS
    mesh, rules = mesh_and_rules(config.mesh)
    cfg = model_config(config.model)
    tx, shardings, _ = stage.build_step(config, cfg, mesh, rules)
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), read_only=True)
    state, meta = ckpt.restore(step, state_lib.abstract_state(cfg, tx, shardings))
    assert int(state.step) == step and meta["step"] == step and meta["data"]["parent"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    for s in range(1, step + 1):  # the run up to the preemption is the uninterrupted run
        assert _records(workdir)[s]["loss"] == reference[s]["loss"]
