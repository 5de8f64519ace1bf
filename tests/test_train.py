"""The SFT trainer: loss (packing, MTP targets), accumulation, router bias, optimizer masks, NaN guard,
the sharded step on 8 fake devices, and the tiny SFT run from the command line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from r1jax import models
from r1jax.data.packing import pack_rows
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib
from r1jax.train import optimizer as opt_lib
from r1jax.train import state as state_lib
from r1jax.train import step as step_lib
from r1jax.train.metrics import MetricsLogger, read_metrics

from helpers import REPO, subprocess_env
CFG = models.get_preset("tiny_moe")  # MTP on, MoE with the tiled CPU dispatch, aux loss off


# The CLI runs of this file and of test_resume.py share these settings, so one compiled step serves all
# of them through the persistent compilation cache.
CLI_ARGS = ["--config", "configs/sft.py:tiny", "--config.train.steps=30", "--config.data.seq_len=128"]


# A fork of configs/sft.py outside the repository (the CLI run below uses it): `configs` must be importable.
FORKED_CONFIG = """
from configs import sft


def get_config(arg=None):
    config = sft.get_config(arg)
    config.train.log_every = 5
    config.train.checkpoint_every = 15
    return config
"""


# ------------------------------------------------------------------------------- background subprocesses

class Background:
    """A subprocess started when the module starts, so it runs while the in-process tests compile. Its
    output goes to files (a full pipe would stall it while nobody reads)."""

    def __init__(self, cmd, env, log_dir, cwd=REPO):
        self.stdout_path, self.stderr_path = log_dir / "stdout", log_dir / "stderr"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True)

    def result(self, timeout=900):
        self.proc.wait(timeout=timeout)
        stderr = self.stderr_path.read_text()
        assert self.proc.returncode == 0, stderr[-4000:]
        return self.stdout_path.read_text(), stderr


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory):
    """The module's subprocesses, started at once: the packing check, the 8-device step runs and the tiny
    CLI run (compiles dominate these tests; in subprocesses they get XLA's fast-compile setting)."""
    cache = tmp_path_factory.getbasetemp() / "jax_cache"
    workdir = tmp_path_factory.mktemp("sft_tiny")
    # The CLI run is a researcher's fork: a config file outside the repository that builds on configs/sft.py, run
    # from another directory, with only r1jax importable (a link to the package, as an installed r1jax would be).
    fork, elsewhere, path = (tmp_path_factory.mktemp(name) for name in ("fork", "elsewhere", "pythonpath"))
    (fork / "my_sft.py").write_text(FORKED_CONFIG)
    os.symlink(os.path.join(REPO, "r1jax"), path / "r1jax")
    runs = {
        "packing": Background([sys.executable, "-c", PACKING_WORKER], subprocess_env(cache),
                              tmp_path_factory.mktemp("packing_log")),
        "steps": Background([sys.executable, "-c", STEP_WORKER],
                            subprocess_env(cache, xla_flags="--xla_force_host_platform_device_count=8"),
                            tmp_path_factory.mktemp("steps_log")),
        "cli": Background([sys.executable, "-m", "r1jax.main", "--workdir", str(workdir),
                           "--config", f"{fork}/my_sft.py:tiny", *CLI_ARGS[2:], "--config.train.eval_every=15"],
                          dict(subprocess_env(cache), PYTHONPATH=str(path)), tmp_path_factory.mktemp("cli_log"),
                          cwd=elsewhere),
    }
    runs["cli"].workdir = workdir
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


# ------------------------------------------------------------------------------------- loss and packing

PACKING_WORKER = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from r1jax import models
from r1jax.data.packing import pack_rows
from r1jax.train import step as step_lib
cfg = models.get_preset("tiny_moe")  # MTP on, MoE (tiled CPU dispatch), aux loss off
rng = np.random.default_rng(0)
docs = []
for n in (9, 14, 6, 11):
    mask = np.ones(n, np.int32)
    mask[: n // 3] = 0  # a prompt: not trained
    docs.append({"tokens": rng.integers(4, cfg.vocab_size, n).astype(np.int32), "loss_mask": mask})
packed = pack_rows([docs, [], [], []], 48, pad_id=0)  # all four documents (40 tokens) in one row
unpacked = pack_rows([[d] for d in docs], 48, pad_id=0)  # one document per row: same shape, one compile
fill = {"ones": np.ones, "zeros": np.zeros}  # params from the declaration, drawn with numpy: no init compile
params = jax.tree.map(lambda s: jnp.asarray(fill[s.init](s.shape) if s.init in fill else
                                            rng.normal(0.0, cfg.init_std, s.shape), jnp.float32),
                      models.param_specs(cfg), is_leaf=lambda x: isinstance(x, models.ParamSpec))

def total(params, batch):  # summed, not averaged: both layouts are compared term by term
    sums = step_lib.loss_sums(params, batch, cfg)
    return sums["ce_sum"] + sums["mtp_sum"], sums

grad_fn = jax.jit(jax.value_and_grad(total, has_aux=True))
(loss_p, sums_p), grads_p = grad_fn(params, packed)
(loss_u, sums_u), grads_u = grad_fn(params, unpacked)
worst = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
            for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)))
print(json.dumps({
    "segments": [int(packed["segment_ids"][0].max()), int(unpacked["segment_ids"].max())],
    "loss": [float(loss_p), float(loss_u)], "worst_grad_rel_diff": worst,
    "ce_tokens": [float(sums_p["ce_tokens"]), float(sums_u["ce_tokens"]),
                  float(sum(d["loss_mask"][1:].sum() for d in docs))],
    "mtp_tokens": [float(sums_p["mtp_tokens"]), float(sums_u["mtp_tokens"])]}))
"""


def test_packed_rows_equal_unpacked(background):
    """Same summed loss (next-token + MTP) and gradients (the real model) whether documents share rows or not."""
    stdout, _ = background["packing"].result()
    r = json.loads(stdout.strip().splitlines()[-1])
    assert r["segments"] == [4, 1]
    assert r["ce_tokens"][0] == r["ce_tokens"][1] == r["ce_tokens"][2]
    assert r["mtp_tokens"][0] == r["mtp_tokens"][1] > 0
    np.testing.assert_allclose(r["loss"][0], r["loss"][1], rtol=1e-5)
    assert r["worst_grad_rel_diff"] < 1e-4, r


def test_mtp_targets_stay_inside_documents():
    # Row: doc 1 = tokens 10 11 12 13 (prompt 10, trained 11..13), doc 2 = 20 21 22, then padding.
    batch = pack_rows([[{"tokens": np.array([10, 11, 12, 13]), "loss_mask": np.array([0, 1, 1, 1])},
                        {"tokens": np.array([20, 21, 22]), "loss_mask": np.array([0, 1, 1])}]], 9, pad_id=0)
    np.testing.assert_array_equal(batch["targets"][0], [11, 12, 13, 0, 21, 22, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 1, 0, 1, 1, 0, 0, 0])
    targets, mask = step_lib.mtp_targets(jax.tree.map(jnp.asarray, batch))
    # MTP at t predicts token t+2: 10 -> 12, 11 -> 13; 12 would predict across the document end: masked.
    np.testing.assert_array_equal(np.asarray(targets[0, :2]), [12, 13])
    np.testing.assert_array_equal(np.asarray(mask[0]), [1, 1, 0, 0, 1, 0, 0, 0, 0])
    assert int(targets[0, 4]) == 22


# ------------------------------------------------------------------------ optimizer and the train step

def _opt(**kw):
    base = dict(lr=1e-2, warmup_steps=2, schedule="cosine", end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                weight_decay=0.1, clip_norm=1.0)
    return mlc.ConfigDict({**base, **kw})


def test_schedule_warmup_then_decay():
    sched = opt_lib.make_schedule(_opt(warmup_steps=4, schedule="linear"), 14)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 2, 4, 9, 14)], [0, 5e-3, 1e-2, 5.5e-3, 1e-3], rtol=1e-5)
    cosine = opt_lib.make_schedule(_opt(warmup_steps=0), 10)
    np.testing.assert_allclose([float(cosine(0)), float(cosine(10))], [1e-2, 1e-3], rtol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        opt_lib.make_schedule(_opt(schedule="step"), 10)


def test_optimizer_leaves_router_bias_and_norms_undecayed():
    cfg = CFG.replace(mtp_depth=0)  # fewer leaves: a faster compile, the same masks
    tx, _ = opt_lib.make_optimizer(_opt(lr=0.1, warmup_steps=0, clip_norm=0.0), cfg, 10)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), models.abstract_params(cfg))
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert float(jnp.abs(updates["moe"]["mlp"]["router_bias"]).max()) == 0.0  # not an optimizer leaf
    assert float(jnp.abs(updates["final_norm"]).max()) == 0.0  # norms: no weight decay
    np.testing.assert_allclose(np.asarray(updates["embed"]), -0.1 * 0.1 * 0.5, rtol=1e-6)  # matrices decay


def test_bfloat16_moments_are_stored_in_bfloat16_and_track_fp32_adamw():
    """optimizer.moment_dtype="bfloat16" (DeepSeek-V3's optimizer states): the stored moments are bf16, and three
    steps of it stay within bf16 rounding of fp32 AdamW (an independent reference: optax.adamw itself)."""
    import optax

    params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}
    opt = _opt(warmup_steps=0, clip_norm=0.0, weight_decay=0.0)
    ref_tx = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    tx = opt_lib.stored_in(ref_tx, jnp.bfloat16)
    state, ref_state = tx.init(params), ref_tx.init(params)
    p, ref_p = params, params
    for i in range(3):
        grads = {"w": jnp.sin(p["w"] * (i + 1))}
        updates, state = tx.update(grads, state, p)
        ref_updates, ref_state = ref_tx.update(grads, ref_state, ref_p)
        p, ref_p = optax.apply_updates(p, updates), optax.apply_updates(ref_p, ref_updates)
    moments = [x for x in jax.tree.leaves(state) if x.ndim]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    assert any(x.dtype == jnp.int32 for x in jax.tree.leaves(state))  # the step count is left alone
    np.testing.assert_allclose(np.asarray(p["w"]), np.asarray(ref_p["w"]), atol=3e-4)
    with pytest.raises(ValueError, match="moment_dtype"):
        opt_lib.make_optimizer(_opt(moment_dtype="float16"), CFG, 10)


# ------------------------------------------------------------------------------------------- NaN guard

def test_nan_stops_with_step_range_and_keeps_last_good_checkpoint(tmp_path):
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(4)},
                                 opt_state={"m": jnp.zeros(4)}, rng=jnp.zeros(2, jnp.uint32))

    def step_fn(state):
        step = state.step + 1
        loss = jnp.where(step == 5, jnp.nan, 1.0 / step)
        return state.replace(step=step, params={"w": state.params["w"] * loss}), {"loss": loss, "grad_norm": 1.0}, 4

    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    logger = MetricsLogger(str(tmp_path), total_steps=10, progress=False)
    with pytest.raises(loop_lib.NonFiniteError, match=r"non-finite loss at step 5 \(steps 5\.\.6.*checkpoints/4"):
        loop_lib.train_loop(state, step_fn, steps=10, checkpointer=ckpt, logger=logger, meta_fn=dict, log_every=2,
                            checkpoint_every=2)
    assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).manager.all_steps() == [2, 4]
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [2, 4]


def _counter_state():
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(4)},
                                opt_state={"m": jnp.zeros(4)}, rng=jnp.zeros(2, jnp.uint32))


def test_loop_saves_and_stops_on_sigterm_with_multi_update_iterations(tmp_path):
    """The one loop as GRPO drives it (2 updates per iteration): cadence in steps, and a SIGTERM during the
    iteration that ends at step 6 saves step 6 and ends as preempted (one process: the SIGTERM handler)."""
    import signal

    def step_fn(state):
        if int(state.step) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return state.replace(step=state.step + 2), {"loss": 1.0, "grad_norm": 1.0, "x": float(state.step)}, 8

    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    logger = MetricsLogger(str(tmp_path), total_steps=20, progress=False)
    saved, before = [], signal.getsignal(signal.SIGTERM)
    result = loop_lib.train_loop(_counter_state(), step_fn, steps=20, step_size=2, checkpointer=ckpt, logger=logger,
                                 meta_fn=dict, log_every=2, checkpoint_every=3, after_save=lambda: saved.append(1))
    assert result.status == "preempted" and result.step == 6 and result.checkpoint_step == 6
    assert ckpt.manager.all_steps() == [4, 6] and len(saved) == 2  # 4 crossed a multiple of 3; 6: the SIGTERM
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [4, 6]
    assert signal.getsignal(signal.SIGTERM) == before  # the loop's handler is gone after it


def test_loop_fails_when_the_data_gives_no_batch(tmp_path):
    def step_fn(state):
        raise StopIteration

    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    logger = MetricsLogger(str(tmp_path), total_steps=10, progress=False)
    with pytest.raises(ValueError, match=r"no batch at all; records skipped, by reason: \{'data/skipped_total': 5"):
        loop_lib.train_loop(_counter_state(), step_fn, steps=10, checkpointer=ckpt, logger=logger, meta_fn=dict,
                            data_metrics=lambda: {"data/skipped_total": 5, "data/skipped_missing_field": 5})


# ------------------------------------------------------------------------------- 8 fake devices, sharded

STEP_WORKER = r"""
import json
import jax
import numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from configs import sft
from r1jax.sharding import make_mesh
from r1jax.stages import sft as stage
from r1jax.train.run import mesh_and_rules, model_config
from r1jax.train import state as state_lib, step as step_lib
assert jax.device_count() == 8
config = sft.get_config("tiny")
config.data.batch_size, config.data.seq_len, config.train.steps = 8, 32, 10
config.optimizer.update(warmup_steps=0, eps=1e-3)  # eps: a smooth first Adam step, comparable across runs
_, rules = mesh_and_rules(config.mesh)
cfg = model_config(config.model).replace(bias_update_rate=1e-2)
batch = step_lib.random_batch(cfg.vocab_size, 8, 32, seed=3)
one_device = make_mesh({"data": 1}, devices=jax.devices()[:1])
out, initial = {}, None
for name, mesh, n_micro in (("one", one_device, 1), ("sharded_micro2", make_mesh({"fsdp": 4, "tensor": 2}), 2)):
    config.train.micro_batches = n_micro
    tx, shardings, step_fn = stage.build_step(config, cfg, mesh, rules)
    if initial is None:  # one compiled init; the other runs start from a copy laid out their way
        initial = jax.device_get(state_lib.init_state(cfg, tx, 0, shardings))
    state = jax.device_put(initial, shardings)
    bias0 = np.asarray(state.params["moe"]["mlp"]["router_bias"])
    metrics = []
    for _ in range(3):
        state, m = step_fn(state, step_lib.put_batch(batch, step_fn.batch_shardings))
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    out[name] = {"metrics": metrics, "n_shards": len({str(s.index) for s in state.params["embed"].addressable_shards}),
                 "params": [float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(state.params)],
                 "bias_delta": (np.asarray(state.params["moe"]["mlp"]["router_bias"]) - bias0).tolist()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def step_runs(background):
    """3 train steps on 8 fake CPU devices: on one device with the whole batch at once, and on a mesh
    fsdp=4 x tensor=2 accumulating 2 micro-batches per step (two compiles: the tests' budget)."""
    stdout, _ = background["steps"].result()
    return json.loads(stdout.strip().splitlines()[-1])


def _close(a, b, keys=("loss", "ce_loss", "mtp_loss", "grad_norm"), rtol=1e-4):
    for ma, mb in zip(a["metrics"], b["metrics"]):
        for key in keys:
            np.testing.assert_allclose(ma[key], mb[key], rtol=rtol, err_msg=key)
    np.testing.assert_allclose(a["params"], b["params"], rtol=1e-4)


def test_sharded_accumulated_step_matches_single_device_big_batch(step_runs):
    """Sharding (params, optimizer state, batch) and the micro-batch scan change nothing but rounding."""
    one, sharded = step_runs["one"], step_runs["sharded_micro2"]
    assert sharded["n_shards"] == 8 and one["n_shards"] == 1
    _close(sharded, one)
    losses = [m["loss"] for m in one["metrics"]]
    assert losses[-1] < losses[0] and 3.0 < one["metrics"][0]["ce_loss"] < 10.0


def test_router_bias_moves_by_sign_rule_not_gradient(step_runs):
    delta = np.asarray(step_runs["one"]["bias_delta"])  # [L_moe, E] after 3 steps of gamma = 0.01
    # b_i += gamma * sign(mean load - load_i) each step: multiples of gamma, at most 3 of them.
    np.testing.assert_allclose(delta / 0.01, np.round(delta / 0.01), atol=1e-3)
    assert np.abs(delta).max() <= 0.03 + 1e-6 and (delta > 0).any() and (delta < 0).any()


# ----------------------------------------------------------------- the tiny SFT run from the command line

@pytest.fixture(scope="module")
def sft_run(background):
    _, stderr = background["cli"].result()
    return background["cli"].workdir, stderr


def test_sft_tiny_trains_and_writes_everything(sft_run):
    workdir, out = sft_run
    records = read_metrics(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "data/skipped_total", "data/epoch", "mtp_loss"):
        assert key in records[-1], key
    assert all(r["tokens_per_s"] > 0 for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [15, 30]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, [r["loss"] for r in records]
    eval_losses = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert eval_losses[1] < eval_losses[0]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tb"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["15", "30"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["stage"] == "sft" and config["train"]["steps"] == 30 and config["data"]["seq_len"] == 128
    result = json.loads((workdir / "result.json").read_text())
    assert result["status"] == "done" and result["checkpoint"].endswith("checkpoints/30")
    assert os.path.isfile(result["outputs"]["tokenizer"])
    assert "step/s" in out or "s/step" in out  # the progress bar (stderr)


def test_finished_run_reruns_as_a_no_op(sft_run, tmp_path_factory):
    workdir, _ = sft_run
    before = (workdir / "metrics.jsonl").read_text()
    cmd = [sys.executable, "-m", "r1jax.main", "--workdir", str(workdir), *CLI_ARGS]
    out = subprocess.run(cmd, env=subprocess_env(tmp_path_factory.getbasetemp() / "jax_cache"), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (workdir / "metrics.jsonl").read_text() == before
    assert json.loads((workdir / "result.json").read_text())["metrics"]["step"] == 30


def test_config_typo_is_an_error(tmp_path):
    cmd = [sys.executable, "-m", "r1jax.main", "--config", "configs/sft.py:tiny", "--workdir", str(tmp_path),
           "--config.train.stepz=3"]
    out = subprocess.run(cmd, env=subprocess_env(tmp_path / "cache"), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("--config.train.stepz: config.train has no field 'stepz'; did you "
                                                   "mean config.train.steps?")
    assert not (tmp_path / "config.json").exists()
