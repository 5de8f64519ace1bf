"""The pipeline stage: the whole R1 recipe as an ordered list of stage configs (configs/r1.py).

    python -m r1jax.main --config configs/r1.py:tiny --workdir DIR

config.order names the stages in order; config.stages.<name> is a complete stage config. A stage names its inputs
with references, strings anywhere in its config (a field, an element of a tuple, a reward's kwargs):

    @<stage>:<output>[/sub/path]   an earlier stage's output: a key of its StageResult.outputs (checkpoint,
                                   tokenizer, dataset, ...), or `workdir`
    @world:<file>                  DIR/world/<file>: the tiny world, written once with its tokenizer (config.world)
    @mix:<name>                    DIR/mixes/<name>.jsonl: config.mixes.<name>, records of several files with the
                                   same columns (missing ones null), at most max_per_file[i] of file i
    @pipeline:dir                  DIR itself

Every reference is checked before anything runs (a stage may only name stages before it). Stage i runs in
DIR/<ii>_<name>/ through r1jax.stages.run (config.json, result.json). A stage whose result.json says finished
is not run again; an unfinished one is rerun and resumes from its own checkpoints. After every stage,
DIR/summary.json is rewritten: per stage its status, workdir, outputs, final metrics, wall time of the run that
finished it, and its eval scores (the results of eval stages whose model names equal stage names).

config.parallel > 1 runs up to that many stages at once: a stage starts, in a child process of its own
(r1jax/stages/child.py, output in DIR/<ii>_<name>/stage.log), as soon as every stage it reads from has finished
(`check_wiring`: the stages its references name), the first such stage in config.order first. Stage directories,
results, resuming and summary.json are the same as one after another; the pipeline process only schedules, and
passes a SIGTERM on to every running stage (each checkpoints, the pipeline ends as preempted). A child dies with the
pipeline process, so a killed pipeline leaves nothing running.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import threading
import time
from typing import Any

import ml_collections as mlc

from r1jax import stages
from r1jax.stages import child
from r1jax.train.run import StageResult, is_primary

log = logging.getLogger(__name__)
REFERENCE = re.compile(r"^@([A-Za-z_][\w-]*):([\w.@-]+)(/.*)?$")
FINISHED = ("done", "data_exhausted")


def run(config, workdir: str) -> StageResult:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    order = list(config.order)
    deps = check_wiring(config)
    parallel = check_parallel(config)
    use_compilation_cache(config, workdir)
    summary_path = os.path.join(workdir, "summary.json")
    summary = read_json(summary_path) or {}
    results: dict[str, dict] = {}
    status, failed = "done", []

    def stage_dir(name: str) -> str:
        return os.path.join(workdir, f"{order.index(name):02d}_{name}")

    def mark(name: str, **fields) -> None:  # the summary entry of a stage without a result.json (yet)
        summary[name] = {**summary.get(name, {}), **fields}
        write_summary(summary_path, summary, order)

    def record(name: str, result: dict, timing: dict | None = None) -> None:
        nonlocal status
        results[name] = result
        summary[name] = stage_summary(result, timing or summary.get(name, {}))
        add_eval_scores(summary, results)
        write_summary(summary_path, summary, order)
        if result["status"] not in FINISHED and status == "done":
            status = result["status"]
            log.warning("pipeline: stage %s ended with status %r; rerun the same command to resume", name, status)

    for name in order:  # finished before: not run again
        if (result := finished_result(stage_dir(name))) is not None:
            record(name, result)
    pending = [name for name in order if name not in results]
    running: dict[str, child.Child] = {}
    stopped: list[int] = []

    def on_sigterm(signum, frame):  # with parallel > 1: preemption reaches the stages, which checkpoint and end
        stopped.append(signum)
        child.terminate(running)

    def reap() -> None:  # waits for one child stage and records how it ended
        done, code, seconds, cpu = child.wait_any(running)
        del running[done.name]
        result = read_json(os.path.join(done.stage_dir, "result.json")) if code == 0 else None
        if result is None and stopped and code == -signal.SIGTERM:  # stopped before its stage set its handler
            mark(done.name, status="preempted")
        elif result is None:
            failed.append(f"stage {done.name} exited with code {code} (log: {done.log_path})")
            mark(done.name, status=f"failed (exit code {code})")
        else:
            record(done.name, result, {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)})

    previous = (signal.signal(signal.SIGTERM, on_sigterm)
                if parallel > 1 and threading.current_thread() is threading.main_thread() else None)
    try:
        while status == "done" and not failed and not stopped:
            ready = [name for name in pending if deps[name] <= results.keys()]
            if not ready or len(running) >= parallel:
                if not running:
                    break
                reap()
                continue
            name = ready[0]
            pending.remove(name)
            resolved = resolve(config.stages[name], lambda ref: resolve_reference(ref, config, workdir, results))
            log.info("pipeline: stage %d/%d %s -> %s", order.index(name) + 1, len(order), name, stage_dir(name))
            mark(name, status="running", workdir=stage_dir(name))
            if parallel == 1:
                t0, cpu0 = time.time(), _cpu_seconds()
                result = stages.run(resolved, stage_dir(name)).to_dict()
                record(name, result, {"seconds": round(time.time() - t0, 1),
                                      "cpu_seconds": round(_cpu_seconds() - cpu0, 1)})
            else:
                running[name] = child.start(name, resolved.to_dict(), stage_dir(name), child_env())
                log.info("pipeline: %s runs beside %s (log: %s)", name, sorted(set(running) - {name}) or "nothing",
                         running[name].log_path)
        while running:  # a stage or a SIGTERM stopped the pipeline: those running finish or checkpoint
            reap()
        if stopped and status == "done" and pending:
            status = "preempted"
            log.warning("pipeline: SIGTERM; rerun the same command to resume")
    finally:
        child.stop_all(running)  # after an exception: the children checkpoint and stop before the pipeline does
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failed:
        raise RuntimeError("pipeline: " + "; ".join(failed))
    metrics = {f"{name}/{k}": v for name, s in summary.items() if isinstance(s, dict)
               for k, v in (s.get("eval") or {}).items()}
    return StageResult(stage="pipeline", workdir=workdir, status=status,
                       outputs={"summary": summary_path, **({"report": os.path.join(workdir, "report.md")}
                                                            if os.path.isfile(os.path.join(workdir, "report.md"))
                                                            else {})},
                       metrics=metrics)


def check_parallel(config) -> int:
    """config.parallel: how many stages may run at once (1 = one after another, in this process). More runs each
    stage in a child process of its own (r1jax/stages/child.py), which only works where those processes can share
    the devices: the CPU of one host."""
    parallel = int(config.get("parallel", 1))
    if parallel < 1:
        raise ValueError(f"config.parallel={parallel}: expected >= 1")
    if parallel > 1:
        import jax

        if jax.default_backend() != "cpu" or jax.process_count() > 1:
            raise ValueError(f"config.parallel={parallel}: stages run side by side only on the CPU of one host "
                             f"(here: {jax.default_backend()}, {jax.process_count()} processes); set it to 1")
    return parallel


def child_env() -> dict[str, str]:
    """What a child stage inherits beyond os.environ: the pipeline's compilation cache."""
    import jax

    cache = jax.config.jax_compilation_cache_dir
    return {"JAX_COMPILATION_CACHE_DIR": cache} if cache else {}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system): with `seconds`, how many cores a stage
    kept busy."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def use_compilation_cache(config, workdir: str) -> None:
    """With config.jax_cache, compiled programs persist in DIR/jax_cache (unless JAX_COMPILATION_CACHE_DIR names
    another): stages with the same model and shapes (pretrain / cold start / SFT, the two reward models) and a
    resumed pipeline reuse them instead of compiling again."""
    import jax

    if config.jax_cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))


# ------------------------------------------------------------------------------------------ references


def check_wiring(config) -> dict[str, set[str]]:
    """Every stage config has a known stage; every @reference names an earlier stage or a known source. Returns
    each stage's dependencies: the stages whose outputs it reads (those its references name, through a mix's files
    too; `@pipeline:dir` reads every stage before it)."""
    order = list(config.order)
    missing = [n for n in order if n not in config.stages]
    if missing or len(set(order)) != len(order):
        raise ValueError(f"config.order={order}: every name once, each in config.stages (missing: {missing})")
    deps: dict[str, set[str]] = {}
    for i, name in enumerate(order):
        stage_config = config.stages[name]
        stages.get_stage(stage_config.stage)
        found: set[str] = set()

        def check(ref: str, name=name, i=i, found=found):
            match = REFERENCE.match(ref)
            if match is None:
                raise ValueError(f"stage {name!r}: malformed reference {ref!r} (expected @source:name[/path])")
            source, item = match.group(1), match.group(2)
            if source == "world" and not config.world.enabled:
                raise ValueError(f"stage {name!r}: {ref!r} but config.world.enabled is False")
            if source == "mix" and item not in config.mixes:
                raise ValueError(f"stage {name!r}: {ref!r} names no mix of config.mixes ({sorted(config.mixes)})")
            if source == "pipeline" and item != "dir":
                raise ValueError(f"stage {name!r}: {ref!r}: the pipeline source has only `dir`")
            if source not in ("world", "mix", "pipeline") and source not in order[:i]:
                raise ValueError(f"stage {name!r}: {ref!r} names {source!r}, which is not a stage before it "
                                 f"(stages before it: {order[:i]})")
            if source == "pipeline":
                found.update(order[:i])
            elif source == "mix":
                for f in config.mixes[item].files:
                    if f.startswith("@mix:"):
                        raise ValueError(f"config.mixes.{item}: file {f!r} names a mix (expected files, @world: "
                                         "or earlier stages' outputs)")
                    if f.startswith("@"):
                        check(f)
            elif source != "world":
                found.add(source)
            return ref

        resolve(stage_config, check)
        deps[name] = found
    return deps


def resolve(stage_config, fn) -> mlc.ConfigDict:
    """A copy of `stage_config` with every string that starts with '@' replaced by fn(string)."""

    def walk(value):
        if isinstance(value, str) and value.startswith("@"):
            return fn(value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v) for v in value)
        return value

    return mlc.ConfigDict(walk(copy.deepcopy(stage_config.to_dict())))


def resolve_reference(ref: str, config, workdir: str, results: dict[str, dict]) -> str:
    source, item, rest = REFERENCE.match(ref).groups()
    if source == "world":
        base = os.path.join(prepare_world(config.world, workdir), item)
    elif source == "mix":
        base = prepare_mix(item, config, workdir, results)
    elif source == "pipeline":
        base = workdir
    else:
        result = results[source]
        outputs = {"workdir": result["workdir"], **{k: v for k, v in result["outputs"].items() if v}}
        if item not in outputs:
            raise KeyError(f"{ref}: stage {source!r} has no output {item!r}; it has {sorted(outputs)}")
        base = outputs[item]
    return base + (rest or "")


def prepare_world(world_config, workdir: str) -> str:
    """DIR/world: the tiny world (r1jax/world) and its SentencePiece tokenizer (tokenizer.model), written once."""
    from r1jax import world

    return os.path.dirname(world.world_tokenizer(workdir, int(world_config.seed), int(world_config.vocab_size)))


def prepare_mix(name: str, config, workdir: str, results: dict[str, dict]) -> str:
    """DIR/mixes/<name>.jsonl: the records of the mix's files (references resolved), uniform columns."""
    from r1jax.data.sources import iterate_records

    path = os.path.join(workdir, "mixes", f"{name}.jsonl")
    if os.path.isfile(path):
        return path
    spec = config.mixes[name]
    files = [resolve_reference(f, config, workdir, results) if f.startswith("@") else f for f in spec.files]
    limits = list(spec.max_per_file) or [0] * len(files)
    if len(limits) != len(files):
        raise ValueError(f"config.mixes.{name}: {len(files)} files but {len(limits)} max_per_file values")
    records = []
    for path_i, limit in zip(files, limits):
        these = list(iterate_records([path_i]))
        records += these[:limit] if limit else these
    columns = list(dict.fromkeys(k for r in records for k in r))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: r.get(k) for k in columns}, ensure_ascii=False) + "\n" for r in records)
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------------ results and summary


def read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished_result(stage_dir: str) -> dict | None:
    """The stage's result.json when it says finished, else None."""
    result = read_json(os.path.join(stage_dir, "result.json"))
    return result if result and result.get("status") in FINISHED else None


def stage_summary(result: dict, previous: dict) -> dict:
    return {"stage": result["stage"], "status": result["status"], "workdir": result["workdir"],
            "checkpoint": result.get("checkpoint"), "outputs": result["outputs"], "metrics": result["metrics"],
            **{k: previous[k] for k in ("seconds", "cpu_seconds") if k in previous}}


def add_eval_scores(summary: dict, results: dict[str, dict]) -> None:
    """summary[model]["eval"] = {benchmark/metric: value} from every finished eval stage's results.json."""
    for result in results.values():
        if result["stage"] != "eval" or "results" not in result["outputs"]:
            continue
        for model, per_bench in (read_json(result["outputs"]["results"]) or {}).items():
            if model in summary:
                summary[model]["eval"] = {f"{bench}/{k}": v for bench, r in per_bench.items()
                                          for k, v in r.items() if k in ("pass@1", "cons@k", f"pass@{r.get('k')}")}


def write_summary(path: str, summary: dict, order: list[str]) -> None:
    """summary.json in stage order (atomically: a reader never sees half a file)."""
    if not is_primary():
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({name: summary[name] for name in order if name in summary}, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def smoke_step(config) -> dict:
    """The wiring resolves (every reference names an earlier stage or a known source) and the first stage's
    config steps (its own smoke_step)."""
    check_wiring(config)
    first = config.stages[config.order[0]]
    placeholder = resolve(first, lambda ref: "/nonexistent" + ref[1:].replace(":", "/"))
    return stages.get_stage(first.stage).smoke_step(placeholder)
