"""Multi-host on one machine: a stage run as 2 processes x 4 CPU devices (`python -m r1jax.launch_local`, a real
`jax.distributed` job: coordinator on 127.0.0.1, gloo collectives, orbax's multi-process checkpoints, the
preemption sync manager) against the same stage as 1 process x 8 devices with the same mesh.

Three runs per stage (SFT, GRPO, the reward model; STAGES): the 1-process run, uninterrupted (the reference); the
2-process run, SIGTERMed mid-run through the launcher; the same 2-process command again, which resumes. They check
* per-step losses agree with the 1-process run (<= 1e-5 relative) before and after the preemption;
* only process 0 writes metrics.jsonl and TensorBoard (every step logged exactly once);
* the data each step trains on is the 1-process run's and the run reads all of it once (below, per stage);
* on SIGTERM both processes end as preempted with the same checkpoint step, and the rerun ends with the
  uninterrupted run's per-step losses.

How the data is split between processes differs by stage, as in the code:
* SFT reads per-process shards (grain): the two processes read disjoint halves that together cover the data --
  the data runs out exactly at the last step (num_epochs=1), each process's saved data state has consumed its
  half, and every step's loss equals the 1-process step's, whose batch is all of that step's records (a shard
  read twice or a record missed would change a step's rows and its loss). Records are neither shuffled nor
  packed here, so a step's global batch holds the same records whatever the process count; with shuffling or
  packing each process shuffles / packs its own shard (as in every per-host input pipeline).
* GRPO: every process draws the same global batches from the same seeded prompt stream (its position, saved in the
  checkpoint, is the same everywhere) and owns a contiguous block of each rollout's prompts (r1jax/rl/rollouts.py):
  the sampler's prompt batch is assembled from the blocks, the slot engine samples all rows as one program over
  the devices of both processes, each process scores only its own block's groups and the scores are exchanged.
  Checked: the reward plug-in records the prompts each process scored -- the two processes' sets are disjoint
  halves that together are the prompt file, each prompt's completions scored once (the 1-process run scored them
  all), the stream ends at exactly one epoch, as in the 1-process run, and the per-step rewards (the same samples)
  and losses agree. The held-out evaluation at the last step splits its batches the same way (8 prompts: blocks
  of 4 and 4; then 1 prompt: 1 and none) and gives the 1-process run's metrics.
* The reward model: a step's pairs are a pure function of the step (a seeded permutation per epoch) on every
  process, the rows sharded over all devices; one epoch of the pair file here.
"""

import collections
import dataclasses
import glob
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from typing import Callable

import pytest

from helpers import REPO, subprocess_env

DEVICES = 8
TINY = ["--config.model.overrides.n_layers=2", "--config.model.overrides.mtp_depth=0",  # 1 dense + 1 MoE layer
        "--config.model.overrides.vocab_size=300", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.checkpoint_every=1000", "--config.train.progress=False", "--config.data.tiny_world=False"]


@dataclasses.dataclass(frozen=True)
class Stage:
    args: Callable[[dict], list[str]]
    steps: int  # optimizer updates of the whole run
    step_size: int = 1  # updates per iteration (GRPO: rl.mu x rl.mini_batches per rollout)
    sigterm_after: int = 3  # logged records before the SIGTERM
    # a 1-process loss below loss_zero is 0 in exact arithmetic (GRPO's first rollout: the warm-up's lr 0 keeps the
    # ratio at 1, and group-centred advantages of equal-length completions sum to 0); the 2-process loss must be
    # below it too (float32 noise: no relative test)
    loss_zero: float = 0.0

    @property
    def logged(self) -> list[int]:
        return list(range(self.step_size, self.steps + 1, self.step_size))


SFT_RECORDS, SFT_BATCH = 128, 8
GRPO_PROMPTS, GRPO_B, GRPO_MU = 48, 8, 2  # 6 rollouts of 8 prompts x 2 samples = one epoch; 2 updates each
# held-out evaluation at the last step: 9 prompts (ids from 1000) in batches of 8, so the processes own blocks of
# 4 and 4 prompts, then 1 and none; sampled as in training (the same compiled programs)
HELDOUT, HELDOUT_ID = 9, 1000
RM_PAIRS, RM_BATCH = 96, 8


def _sft_args(data: dict) -> list[str]:
    return ["--config", "configs/sft.py:tiny", *TINY, f"--config.train.steps={SFT_RECORDS // SFT_BATCH}",
            "--config.optimizer.warmup_steps=2", "--config.data.seq_len=64", f"--config.data.batch_size={SFT_BATCH}",
            "--config.data.num_epochs=1", "--config.data.shuffle=False", "--config.data.pack=False",
            f"--config.data.train_files={data['train']}", f"--config.data.eval_files={data['eval']}",
            f"--config.data.tokenizer={data['tokenizer']}"]


def _grpo_args(data: dict) -> list[str]:
    # A reward that differs between samples (the characters of the completion): the accuracy of a fresh tiny
    # model is 0 everywhere, which gives zero advantages and a zero loss. rl.mu=2: two updates per iteration, so
    # the step advances by 2 (the preemption sync must count iterations, not steps). The preset's slot engine.
    steps = GRPO_PROMPTS // GRPO_B * GRPO_MU
    return ["--config", "configs/r1_zero.py:tiny", *[a for a in TINY if "eval_every" not in a],
            f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
            f"--config.data.train_files={data['prompts']}", f"--config.data.eval_files={data['heldout']}",
            f"--config.eval.num_prompts={HELDOUT}", f"--config.eval.batch_prompts={GRPO_B}", "--config.eval.samples=2",
            "--config.eval.sampling=temperature", "--config.eval.temperature=1.0",
            f"--config.data.tokenizer={data['tokenizer']}",
            f"--config.rl.rewards=(('{data['reward']}', 1.0),)", f"--config.rl.prompts_per_rollout={GRPO_B}",
            "--config.rl.group_size=2", f"--config.rl.mu={GRPO_MU}", "--config.rl.max_new_tokens=8",
            "--config.rl.completion_buckets=(8,)", "--config.rl.prompt_buckets=(32,)",
            "--config.rl.dynamic_sampling=False", "--config.eval.at_start=False"]


def _rm_args(data: dict) -> list[str]:
    return ["--config", "configs/reward_model.py:tiny", *TINY, f"--config.train.steps={RM_PAIRS // RM_BATCH}",
            "--config.optimizer.warmup_steps=2", f"--config.data.train_files={data['pairs']}",
            f"--config.data.tokenizer={data['tokenizer']}", "--config.data.seq_len=32",
            f"--config.data.batch_size={RM_BATCH}"]


STAGES = {
    "sft": Stage(_sft_args, steps=SFT_RECORDS // SFT_BATCH),
    "grpo": Stage(_grpo_args, steps=GRPO_PROMPTS // GRPO_B * GRPO_MU, step_size=GRPO_MU, sigterm_after=2,
                  loss_zero=1e-6),
    "reward_model": Stage(_rm_args, steps=RM_PAIRS // RM_BATCH),
}

REWARD_PLUGIN = """
import os


def completion_chars(prompts, completions, *, id, **_):
    # which prompts (record ids) each process scored: scored_<processes>_<process>.txt next to this file
    name = f"scored_{os.environ['JAX_NUM_PROCESSES']}_{os.environ['JAX_PROCESS_ID']}.txt"
    with open(os.path.join(os.path.dirname(__file__), name), "a") as f:
        f.writelines(f"{i}\\n" for i in id)
    return [len(c) / 10 for c in completions]
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Arithmetic records (each distinct) as SFT prompt / response pairs, GRPO prompts with answers (training and
    held-out) and preference pairs, a SentencePiece tokenizer trained on them and a GRPO reward plug-in."""
    root = tmp_path_factory.mktemp("multihost_data")
    rng = random.Random(0)
    files = {}
    for split, n in (("train", SFT_RECORDS), ("eval", 16)):
        files[split] = str(root / f"{split}.jsonl")
        with open(files[split], "w") as f:
            for i in range(n):
                a, b = rng.randint(0, 999), rng.randint(0, 999)
                f.write(json.dumps({"id": i, "prompt": f"What is {a} plus {b}?", "response": f"{a}+{b}={a + b}.",
                                    "answer": str(a + b)}) + "\n")
    records = [json.loads(line) for line in open(files["train"])]
    files["prompts"] = str(root / "prompts.jsonl")
    with open(files["prompts"], "w") as f:
        f.writelines(json.dumps({k: r[k] for k in ("id", "prompt", "answer")}) + "\n" for r in records[:GRPO_PROMPTS])
    files["heldout"] = str(root / "heldout.jsonl")
    with open(files["heldout"], "w") as f:
        f.writelines(json.dumps({"id": HELDOUT_ID + i, "prompt": r["prompt"], "answer": r["answer"]}) + "\n"
                     for i, r in enumerate(records[GRPO_PROMPTS:GRPO_PROMPTS + HELDOUT]))
    files["pairs"] = str(root / "pairs.jsonl")
    with open(files["pairs"], "w") as f:
        f.writelines(json.dumps({"question": r["prompt"], "chosen": r["response"],
                                 "rejected": r["response"].replace("=", "=1")}) + "\n" for r in records[:RM_PAIRS])
    files["reward"] = str(root / "reward.py") + ":completion_chars"
    (root / "reward.py").write_text(REWARD_PLUGIN)
    prefix = str(root / "tok")
    subprocess.run([sys.executable, "-m", "r1jax.data.tokenizer", "--input", files["train"], "--field",
                    "prompt,response", "--vocab_size", "300", "--output", prefix], check=True, cwd=REPO,
                   env=subprocess_env(), capture_output=True, timeout=120)
    return {**files, "tokenizer": prefix + ".model"}


def _launch(args, workdir, processes, env, log_path):
    cmd = [sys.executable, "-m", "r1jax.launch_local", "--processes", str(processes), "--devices-per-process",
           str(DEVICES // processes), "--timeout", "400", "--grace", "30", "--", *args, "--workdir", str(workdir)]
    log = open(log_path, "w")  # a file: a full pipe would stall the run
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def _finish(proc, timeout=450) -> str:
    proc.wait(timeout=timeout)
    text = open(proc.log_path).read()
    assert proc.returncode == 0, text[-4000:]
    return text


def _steps(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r]


def _results(output: str) -> dict[int, dict]:
    """Each process's printed StageResult (JSON on stderr, lines prefixed `[i] ` by the launcher)."""
    lines: dict[int, list[str]] = {}
    for line in output.splitlines():
        if line.startswith("[") and "] " in line:
            i, text = line[1:].split("] ", 1)
            if i.isdigit():
                lines.setdefault(int(i), []).append(text)
    results = {}
    for i, text in lines.items():
        start = max(k for k, t in enumerate(text) if t == "{")
        results[i] = json.loads("\n".join(text[start:]))
    return results


def _tb_loss_steps(workdir) -> list[int]:
    """Steps of every `loss` scalar in WORKDIR/tb's event files (TFRecord framing, tensorboardX's Event proto)."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")):
        with open(path, "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                steps += [event.step for v in event.summary.value if v.tag == "loss"]
    return sorted(steps)


@pytest.fixture(scope="module", params=list(STAGES))
def runs(request, data, tmp_path_factory):
    stage = STAGES[request.param]
    root = tmp_path_factory.mktemp(f"multihost_{request.param}")
    env = subprocess_env(tmp_path_factory.getbasetemp() / "jax_cache")
    args = stage.args(data)
    single = _launch(args, root / "single", 1, env, root / "single.log")
    first = _launch(args, root / "multi", 2, env, root / "multi_first.log")
    metrics, deadline = root / "multi" / "metrics.jsonl", time.time() + 400
    while not (metrics.exists() and len(_steps(root / "multi")) >= stage.sigterm_after):
        assert first.poll() is None, open(first.log_path).read()[-4000:]
        assert time.time() < deadline, f"the 2-process run logged no {stage.sigterm_after} steps in 400 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both processes
    first_out = _finish(first)
    preempted_steps = _steps(root / "multi")
    resumed_out = _finish(_launch(args, root / "multi", 2, env, root / "multi_resumed.log"))
    _finish(single)
    return dict(name=request.param, stage=stage, root=root, single=_steps(root / "single"),
                preempted=preempted_steps, multi=_steps(root / "multi"), first=_results(first_out),
                resumed=_results(resumed_out))


def _meta(workdir, step: int) -> dict:
    return json.load(open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")))


def test_preemption_saves_the_same_step_on_both_processes(runs):
    first, stage = runs["first"], runs["stage"]
    assert sorted(first) == [0, 1]
    assert {r["status"] for r in first.values()} == {"preempted"}, first
    steps = {r["checkpoint"] for r in first.values()}
    assert len(steps) == 1, steps
    saved = int(os.path.basename(steps.pop()))
    assert stage.sigterm_after * stage.step_size <= saved < stage.steps
    assert [r["step"] for r in runs["preempted"]] == [s for s in stage.logged if s <= saved]
    if runs["name"] == "sft":  # each process's data iterator state
        step_dir = runs["root"] / "multi" / "checkpoints" / str(saved) / "data"
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir))
    if runs["name"] == "grpo":  # the prompt stream's position at the saved step
        assert _meta(runs["root"] / "multi", saved)["prompts"] == {"epoch": 0, "index": saved // GRPO_MU * GRPO_B}


def test_losses_agree_with_one_process_and_resume_ends_the_same(runs):
    single, multi, stage = runs["single"], runs["multi"], runs["stage"]
    assert [r["step"] for r in single] == stage.logged
    assert [r["step"] for r in multi] == stage.logged  # once each: resumed after the saved step
    for a, b in zip(single, multi):
        if abs(a["loss"]) < stage.loss_zero:
            assert abs(b["loss"]) < stage.loss_zero, (a["step"], a["loss"], b["loss"])
        else:
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], a["step"]
        for key in ("trained_tokens", "train_tokens", "reward_mean", "heldout_reward_mean", "heldout_pass_at_1"):
            assert a.get(key) == b.get(key), (a["step"], key)  # the same rows; GRPO: the same samples
    if runs["name"] == "grpo":  # the held-out evaluation at the last step, split over the processes
        assert "heldout_reward_mean" in multi[-1] and "heldout_pass_at_1" in multi[-1], multi[-1]
    assert {r["status"] for r in runs["resumed"].values()} == {"done"}


def test_only_process_0_logs(runs):
    assert _tb_loss_steps(runs["root"] / "multi") == runs["stage"].logged
    assert _tb_loss_steps(runs["root"] / "single") == runs["stage"].logged


def _scored(data, processes: int, process: int) -> dict[str, collections.Counter]:
    """{"train" / "heldout": {record id: completions scored}} by one process of the runs with `processes` processes
    (REWARD_PLUGIN)."""
    path = os.path.join(os.path.dirname(data["reward"]), f"scored_{processes}_{process}.txt")
    ids = [int(line) for line in open(path)]
    return {"train": collections.Counter(i for i in ids if i < HELDOUT_ID),
            "heldout": collections.Counter(i for i in ids if i >= HELDOUT_ID)}


def test_the_data_is_read_once_and_as_with_one_process(runs, data):
    root, steps = runs["root"], runs["stage"].steps
    if runs["name"] == "sft":  # disjoint halves that together cover the data
        final = root / "multi" / "checkpoints" / str(steps) / "data"
        states = [json.load(open(final / f"process_{i}-of-2.json")) for i in range(2)]
        consumed = [s["parent"]["parent"]["next_index"] for s in states]
        assert consumed == [SFT_RECORDS // 2, SFT_RECORDS // 2], states
        single_state = json.load(open(root / "single" / "checkpoints" / str(steps) / "data" / "process_0-of-1.json"))
        assert single_state["parent"]["parent"]["next_index"] == SFT_RECORDS
    elif runs["name"] == "grpo":  # one epoch of the prompts, each drawn once (a permutation), as with one process
        for run in ("single", "multi"):
            assert _meta(root / run, steps)["prompts"] == {"epoch": 0, "index": GRPO_PROMPTS}, run
        # each process scored its own blocks: disjoint halves (4 of each rollout's 8 prompts), together every
        # prompt, each prompt's G = 2 completions scored once; the 1-process run scored them all
        every = collections.Counter({i: 2 for i in range(GRPO_PROMPTS)})
        single, scored = _scored(data, 1, 0), [_scored(data, 2, i) for i in range(2)]
        assert single["train"] == every
        assert not set(scored[0]["train"]) & set(scored[1]["train"]), scored
        assert [len(c["train"]) for c in scored] == [GRPO_PROMPTS // 2] * 2, scored
        assert scored[0]["train"] + scored[1]["train"] == every, scored
        # held-out batches of 8 then 1 prompts: blocks of 4 and 4, then 1 and none (process 1 scores nothing)
        assert single["heldout"] == collections.Counter({HELDOUT_ID + i: 2 for i in range(HELDOUT)})
        assert [sorted(c["heldout"]) for c in scored] == [
            [HELDOUT_ID + i for i in (0, 1, 2, 3, 8)], [HELDOUT_ID + i for i in (4, 5, 6, 7)]], scored
        assert all(set(c["heldout"].values()) == {2} for c in scored), scored
    else:  # the reward model: one epoch of the pairs
        for run in ("single", "multi"):
            assert [r["epoch"] for r in runs[run]] == [0] * steps, run


# ------------------------------------------------------------------------------- the launcher's watch (no JAX)

CHILD = r"""
import os, signal, sys, time
i = int(os.environ["JAX_PROCESS_ID"])
print("devices", os.environ["XLA_FLAGS"], os.environ["JAX_NUM_PROCESSES"], os.environ["JAX_COORDINATOR_ADDRESS"],
      flush=True)
signal.signal(signal.SIGTERM, lambda *_: (print("saved", flush=True), sys.exit(0)))
if i == int(sys.argv[1]):
    time.sleep(0.3)
    sys.exit(3)
time.sleep(60)
"""


def _group(fail: int, tmp_path):
    from r1jax.launch_local import Group

    out = open(tmp_path / "out.txt", "w+")
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    group = Group([sys.executable, "-c", CHILD, str(fail)], processes=2, devices=4, out=out, env=env)
    time.sleep(0.5)  # both children have set their SIGTERM handler
    return group, out


def _lines(out) -> list[str]:
    out.flush()
    out.seek(0)
    return out.read().splitlines()


def test_launcher_stops_the_group_when_one_fails(tmp_path):
    group, out = _group(fail=1, tmp_path=tmp_path)
    start = time.monotonic()
    assert group.wait(grace_s=10) == 3  # process 1's code; process 0 was stopped, not waited for
    assert time.monotonic() - start < 10
    lines = _lines(out)
    assert "[0] saved" in lines and "[1] saved" not in lines
    for i in range(2):  # each process's own environment, its output prefixed
        line = next(l for l in lines if l.startswith(f"[{i}] devices"))
        other_flag, device_flag, count, address = line.split()[2:]
        assert other_flag == "--xla_cpu_foo=1" and device_flag == "--xla_force_host_platform_device_count=4", line
        assert count == "2" and address.startswith("127.0.0.1:"), line


def test_launcher_forwards_sigterm_and_times_out(tmp_path):
    group, out = _group(fail=-1, tmp_path=tmp_path)
    group.signal(signal.SIGTERM)
    assert group.wait(grace_s=10) == 0
    assert sorted(l for l in _lines(out) if l.endswith("saved")) == ["[0] saved", "[1] saved"]
    group, out = _group(fail=-1, tmp_path=tmp_path)
    start = time.monotonic()
    for p in group.procs:  # children that ignore SIGTERM: the grace period ends in SIGKILL
        p.send_signal(signal.SIGSTOP)
    assert group.wait(timeout_s=0.5, grace_s=1) == 124
    assert time.monotonic() - start < 10 and all(p.returncode == -signal.SIGKILL for p in group.procs)


def test_which_environments_join_a_job():
    from r1jax import distributed

    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed._explicit_args(env) == ("127.0.0.1:1234", 2, 1)
    for bad, message in (({**env, "JAX_PROCESS_ID": "2"}, "expected 0 <= id"),
                         ({**env, "JAX_NUM_PROCESSES": "two"}, "must be integers"),
                         ({k: v for k, v in env.items() if k != "JAX_COORDINATOR_ADDRESS"}, "missing")):
        with pytest.raises(ValueError, match=message):
            distributed._explicit_args(bad)
    assert distributed._explicit_args({}) is None
    assert not distributed._detected({})  # a laptop
    assert not distributed._detected({"TPU_WORKER_HOSTNAMES": "localhost"})  # one TPU VM
    assert distributed._detected({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})  # a multi-host slice
    assert distributed._detected({"TPU_WORKER_HOSTNAMES": "localhost", "MEGASCALE_COORDINATOR_ADDRESS": "h:8080"})
    assert distributed.initialize_from_env({**env, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is False


def test_process_blocks_split_any_batch():
    from r1jax.rl.rollouts import process_blocks

    assert process_blocks(8, 2) == [slice(0, 4), slice(4, 8)]
    assert process_blocks(5, 2) == [slice(0, 3), slice(3, 5)]  # B need not divide: the first blocks are longer
    assert process_blocks(1, 2) == [slice(0, 1), slice(1, 1)]  # a process may own none (a short held-out batch)
    assert process_blocks(7, 1) == [slice(0, 7)]
