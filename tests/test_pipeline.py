"""The pipeline: wiring checks, reference resolution, and the smoke preset of configs/r1.py end to end (the CI smoke
test: every stage with a few steps, summary.json and report.md written); then the same command killed in
the middle of three stages (GRPO, reward model, rejection sampling) and rerun each time finishes with the same
summary as the uninterrupted run, without rerunning the stages finished before each kill. The uninterrupted run goes
one stage after another in one process, the interrupted ones two stages at a time in child processes
(config.parallel=2); the second stop is a SIGTERM, which the pipeline forwards to the running stages."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections as mlc
import pytest

from configs import r1
from r1jax.stages import pipeline

from helpers import REPO, subprocess_env
TIMING_KEYS = ("seconds", "cpu_seconds", "tokens_per_s", "sample_s", "update_s", "rollout_s", "sample_tokens_per_s",
               "heldout_eval_s", "eval_s")


# ------------------------------------------------------------------------------------------ wiring


def _toy(order, stages, mixes=None, world=True):
    return mlc.ConfigDict(dict(stage="pipeline", order=order, stages=stages, jax_cache=False,
                               world=dict(enabled=world, seed=0, vocab_size=1024), mixes=mixes or {}))


def test_presets_wire_up():
    for preset in (None, "tiny", "smoke"):
        config = r1.get_config(preset)
        pipeline.check_wiring(config)
        assert config.order[-2:] == ("eval", "report")
    tiny = r1.get_config("tiny")
    assert tiny.stages.r1_zero.init_from == "@pretrain:checkpoint"  # R1-Zero: its own branch from the base
    assert tiny.stages.sft.init_from == "@pretrain:checkpoint"  # the 800k SFT starts from the base too
    assert tiny.stages.distill.data.train_files == ("@rejection_sampling:dataset",)


def test_wiring_errors_name_the_stage_and_the_reference():
    a = mlc.ConfigDict(dict(stage="report", pipeline_dir="@pipeline:dir", table_benchmark="x"))
    b = mlc.ConfigDict(dict(stage="report", pipeline_dir="@a:workdir", table_benchmark="x"))
    pipeline.check_wiring(_toy(("a", "b"), {"a": a, "b": b}))
    with pytest.raises(ValueError, match=r"stage 'b'.*'@a:workdir'.*not a stage before it"):
        pipeline.check_wiring(_toy(("b", "a"), {"a": a, "b": b}))
    with pytest.raises(ValueError, match="names no mix"):
        pipeline.check_wiring(_toy(("a",), {"a": mlc.ConfigDict(dict(stage="report", pipeline_dir="@mix:m",
                                                                    table_benchmark="x"))}))
    with pytest.raises(ValueError, match="world.enabled"):
        pipeline.check_wiring(_toy(("a",), {"a": mlc.ConfigDict(dict(stage="report", pipeline_dir="@world:x",
                                                                    table_benchmark="x"))}, world=False))
    nested = _toy(("a",), {"a": mlc.ConfigDict(dict(stage="report", pipeline_dir="@mix:m", table_benchmark="x"))},
                  mixes={"m": dict(files=("@mix:m",), max_per_file=())})
    with pytest.raises(ValueError, match=r"config.mixes.m: file '@mix:m' names a mix"):
        pipeline.check_wiring(nested)
    with pytest.raises(KeyError, match="not a known stage"):
        pipeline.check_wiring(_toy(("a",), {"a": mlc.ConfigDict(dict(stage="nope"))}))


def test_dependencies_are_the_stages_a_stage_reads():
    config = r1.get_config("tiny")
    deps = pipeline.check_wiring(config)
    assert deps["pretrain"] == deps["student_base"] == set()  # the world only: both start at once
    assert deps["r1_zero"] == deps["cold_start"] == deps["rm_helpful"] == {"pretrain"}
    assert deps["all_scenario_rl"] == {"sft", "rm_helpful", "rm_harmless"}  # its mix reads only world files
    assert deps["distill"] == {"student_base", "rejection_sampling"} and deps["distill_baseline"] == {"student_base"}
    assert deps["report"] == set(config.order[:-1])  # @pipeline:dir
    config.parallel = 0
    with pytest.raises(ValueError, match="config.parallel=0"):
        pipeline.check_parallel(config)


@pytest.mark.parametrize("parallel", [1, 2])
def test_finished_stages_are_skipped_in_process_and_in_children(tmp_path, parallel):
    report = mlc.ConfigDict(dict(stage="report", pipeline_dir="@pipeline:dir", table_benchmark="x"))
    config = _toy(("a", "b"), {"a": report, "b": report.copy_and_resolve_references()}, world=False)
    config.parallel = parallel
    assert pipeline.run(config, str(tmp_path)).status == "done"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary.values()] == ["done", "done"] and "cpu_seconds" in summary["b"]
    assert (tmp_path / "01_b" / "stage.log").is_file() == (parallel > 1)
    stamp = os.path.getmtime(tmp_path / "00_a" / "result.json")
    (tmp_path / "01_b" / "result.json").unlink()
    assert pipeline.run(config, str(tmp_path)).status == "done"
    assert os.path.getmtime(tmp_path / "00_a" / "result.json") == stamp and (tmp_path / "01_b" / "result.json").is_file()


def test_a_stage_that_fails_in_its_child_process_is_named_with_its_log(tmp_path):
    ok = mlc.ConfigDict(dict(stage="report", pipeline_dir="@pipeline:dir", table_benchmark="x"))
    broken = mlc.ConfigDict(dict(stage="report", pipeline_dir="@pipeline:dir"))  # no table_benchmark
    config = _toy(("a", "b"), {"a": ok, "b": broken}, world=False)
    config.parallel = 2
    with pytest.raises(RuntimeError, match=r"stage b exited with code 1 \(log: .*01_b/stage.log\)"):
        pipeline.run(config, str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["a"]["status"] == "done" and summary["b"]["status"] == "failed (exit code 1)"
    assert (tmp_path / "report.md").is_file() and "table_benchmark" in (tmp_path / "01_b" / "stage.log").read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_stage_dies_with_the_pipeline_process(tmp_path):
    stage = ("import os, sys, time; from r1jax.stages import child; child._die_with_parent(os.getppid()); "
             "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)")
    pipeline_process = ("import subprocess, sys, time; "
                        f"subprocess.Popen([sys.executable, '-c', {stage!r}, sys.argv[1]]); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", pipeline_process, str(tmp_path / "pid")], cwd=REPO)
    deadline = time.time() + 60
    while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text():
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.05)
    pid = int((tmp_path / "pid").read_text())
    assert _alive(pid)
    parent.kill()
    parent.wait()
    while _alive(pid):
        assert time.time() < deadline, "the stage outlived the pipeline process"
        time.sleep(0.05)


def test_stopping_child_stages_lets_them_checkpoint_then_kills_the_stubborn(tmp_path):
    from r1jax.stages import child

    graceful = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: "
                "(pathlib.Path(sys.argv[1]).write_text('saved'), sys.exit(0))); print('ready', flush=True); time.sleep(60)")
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    procs = {name: subprocess.Popen([sys.executable, "-c", code, str(tmp_path / name)], stdout=subprocess.PIPE, text=True)
             for name, code in (("graceful", graceful), ("stubborn", stubborn))}
    for proc in procs.values():
        assert proc.stdout.readline().strip() == "ready"
        proc.stdout.close()
    t0 = time.time()
    child.stop_all({name: child.Child(name, str(tmp_path), proc, t0) for name, proc in procs.items()}, timeout_s=2)
    assert (tmp_path / "graceful").read_text() == "saved" and procs["graceful"].returncode == 0
    assert procs["stubborn"].returncode == -signal.SIGKILL and time.time() - t0 < 20


def test_report_trends_show_what_the_stage_logs(tmp_path):
    from r1jax.stages import report

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "reward_mean": float(i), "reward/answer_accuracy": 0.0,
                                           "reward/language_consistency": 0.9 + 0.01 * i}) + "\n" for i in range(8)))
    summary = {"reasoning_rl": {"stage": "grpo", "outputs": {"metrics": str(metrics)}},
               "sft": {"stage": "sft", "outputs": {"metrics": str(metrics)}}}
    trend = report.trends(summary)
    assert trend["reasoning_rl/reward_mean/first"] == 0.5 and trend["reasoning_rl/reward_mean/last"] == 6.5
    language = "reasoning_rl/reward/language_consistency"
    assert trend[f"{language}/last"] > trend[f"{language}/first"]
    assert trend["reasoning_rl/reward/answer_accuracy/last"] == 0.0  # a flat zero curve is a result: shown
    assert not any(k.startswith("reasoning_rl/accuracy/") for k in trend)  # not logged (readable format): left out
    assert not any(k.startswith("sft/") for k in trend)


def test_references_resolve_anywhere_in_a_stage_config(tmp_path):
    config = r1.get_config("tiny")
    results = {name: {"stage": "x", "workdir": f"/runs/{name}", "outputs": {"checkpoint": f"/runs/{name}/ckpt/7"}}
               for name in config.order}
    resolved = pipeline.resolve(config.stages.all_scenario_rl,
                                lambda ref: pipeline.resolve_reference(ref, config, str(tmp_path), results))
    assert resolved.init_from == "/runs/sft/ckpt/7"
    routes = dict(resolved.rl.rewards[0][2]["routes"])
    assert [spec[2]["checkpoint"] for spec in routes["reward_model"]] == ["/runs/rm_helpful/ckpt/7",
                                                                          "/runs/rm_harmless/ckpt/7"]
    mix = resolved.data.train_files[0]
    assert mix == str(tmp_path / "mixes" / "all_scenario_prompts.jsonl")  # written on demand, uniform columns
    with open(mix) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 700 + 232 and len({tuple(r) for r in rows}) == 1
    assert {r["reward_source"] for r in rows} == {"rule", "reward_model"}
    assert os.path.isfile(tmp_path / "world" / "tokenizer.model")
    with pytest.raises(KeyError, match="has no output 'dataset'"):
        pipeline.resolve_reference("@sft:dataset", config, str(tmp_path), results)


# ------------------------------------------------------------------------------------------ end to end


def _command(workdir, parallel):
    return [sys.executable, "-m", "r1jax.main", "--config", "configs/r1.py:smoke", "--workdir", str(workdir),
            f"--config.parallel={parallel}"]


def _finish(workdir, env, parallel):
    out = subprocess.run(_command(workdir, parallel), env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]


def _kill_when(workdir, env, predicate, sig):
    proc = subprocess.Popen(_command(workdir, 2), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 1800
    while not predicate():
        assert proc.poll() is None, f"the pipeline ended before the kill point:\n{proc.stderr.read()[-4000:]}"
        assert time.time() < deadline, "no kill point after 30 minutes"
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=600)[1]
    if sig == signal.SIGTERM:  # forwarded to the running stages, which checkpoint (or finish) and end
        assert proc.returncode == 0 and '"status": "preempted"' in err, err[-4000:]
        statuses = {s["status"] for s in json.loads((workdir / "summary.json").read_text()).values()}
        assert "running" not in statuses, statuses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    env = subprocess_env(root / "jax_cache")
    _finish(root / "full", env, parallel=1)  # one stage after another, in the pipeline's process
    killed = root / "killed"
    order = list(r1.ORDER)
    d = {name: killed / f"{i:02d}_{name}" for i, name in enumerate(order)}  # DIR/<nn>_<stage>
    stamps = []
    for predicate, sig in ((lambda: (d["reasoning_rl"] / "checkpoints" / "2" / "meta").is_dir(), signal.SIGKILL),
                           (lambda: (d["rm_harmless"] / "checkpoints" / "2" / "meta").is_dir(), signal.SIGTERM),
                           (lambda: (d["rejection_sampling"] / "shards" / "00000.stats.json").is_file(),
                            signal.SIGKILL)):
        _kill_when(killed, env, predicate, sig)
        stamps.append({n: os.path.getmtime(p / "result.json") for n, p in d.items()
                       if pipeline.finished_result(str(p)) is not None})  # a preempted stage has a result.json too
    _finish(killed, env, parallel=2)
    full = {name: root / "full" / p.name for name, p in d.items()}
    return {"full": root / "full", "killed": killed, "stamps": stamps, "dirs": d, "full_dirs": full}


def _strip(summary):
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in TIMING_KEYS}
        if isinstance(value, str):
            return value.replace("/killed/", "/RUN/").replace("/full/", "/RUN/")
        return value

    return clean(summary)


def test_smoke_pipeline_runs_every_stage(runs):
    summary = json.loads((runs["full"] / "summary.json").read_text())
    assert list(summary) == list(r1.ORDER)
    assert all(s["status"] == "done" for s in summary.values()), {n: s["status"] for n, s in summary.items()}
    for name in ("pretrain", "r1_zero", "cold_start", "reasoning_rl", "sft", "all_scenario_rl", "distill",
                 "distill_baseline"):
        assert {"rl_heldout/pass@1", "rl_heldout/cons@k", "code_heldout/pass@1"} <= set(summary[name]["eval"]), name
    assert summary["rm_helpful"]["metrics"]["step"] == 3 and "heldout_pair_accuracy" in summary["rm_helpful"]["metrics"]
    stats = json.loads((runs["full_dirs"]["rejection_sampling"] / "stats.json").read_text())
    assert stats["samples"] == 12 * 2 and stats["kept"] + sum(stats["rejected"].values()) + stats["not_selected"] == 24
    report = (runs["full"] / "report.md").read_text()
    assert "Held-out accuracy after each stage" in report and "R1-Zero" in report
    assert (runs["full_dirs"]["report"] / "reasoning_rl.png").is_file()
    assert (runs["full_dirs"]["report"] / "sft.png").is_file()


def test_killed_and_rerun_pipeline_ends_with_the_same_summary(runs):
    full = json.loads((runs["full"] / "summary.json").read_text())
    resumed = json.loads((runs["killed"] / "summary.json").read_text())
    assert _strip(resumed) == _strip(full)


def test_finished_stages_are_not_rerun(runs):
    final = {n: os.path.getmtime(p / "result.json") for n, p in runs["dirs"].items()}
    for stamp in runs["stamps"]:
        for name, mtime in stamp.items():
            assert final[name] == mtime, f"stage {name} was rerun after it had finished"
    # killed inside reasoning_rl; stages off the main line may have finished beside it (config.parallel)
    assert {"pretrain", "cold_start"} <= set(runs["stamps"][0]) and "reasoning_rl" not in runs["stamps"][0]
    assert "rm_helpful" in runs["stamps"][1]  # the SIGTERM inside rm_harmless lets it finish its last step or not
