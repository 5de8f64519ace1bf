"""The code reward's sandbox cost per run: this tree's sandbox versus another implementation (e.g. main's
before a change), side by side in one run.

    python -m r1jax.bench.sandbox [--programs 24] [--runs 3] [--workers 1,2] [--baseline PATH] \
        [--out bench_results.jsonl]

The workload is the code reward's: the tiny world's code tasks (r1jax.world.code), half with
the right solution and half with the wrong one, each with its three `assert` tests, scored through
`run_many` (one sandboxed run per distinct program and test). A row is one implementation at one
worker count: the median over --runs of the batch's wall time divided by its number of runs (the
per-run cost the trainer pays, interpreter start included), and the shares it computed, which must
agree between the two sides. `--baseline` names a sandbox module file to load beside this one, e.g.
the one before issue 20: `git show 64bdd9b:r1jax/rl/sandbox.py > /tmp/sandbox_main.py`. Implementations
alternate within each repetition so both see the same machine load.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

from r1jax.bench import common
from r1jax.world import code as synthetic_code
from r1jax.rl import sandbox


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("r1jax_sandbox_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def workload(n_programs: int) -> list[tuple[str, list[str]]]:
    tasks = synthetic_code.all_code_tasks()[:: max(1, len(synthetic_code.all_code_tasks()) // n_programs)]
    tasks = tasks[:n_programs]
    return [(t.solution if i % 2 == 0 else t.wrong_solution, list(t.tests)) for i, t in enumerate(tasks)]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", type=int, default=24)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--baseline", default=None, help="a sandbox module file to compare against")
    p.add_argument("--out", default="bench_results.jsonl")
    args = p.parse_args(argv)
    items = workload(args.programs)
    n_runs = len({(prog, test) for prog, tests in items for test in tests})
    sides = {"this tree": sandbox}
    if args.baseline:
        sides["baseline"] = load_baseline(args.baseline)
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        times = {name: [] for name in sides}
        shares = {}
        for name, module in sides.items():  # warm-up: page cache, the seccomp filter's compile
            module.run_many(items[:2], max_workers=workers)
        for _ in range(args.runs):
            for name, module in sides.items():
                start = time.perf_counter()
                shares[name] = module.run_many(items, max_workers=workers)
                times[name].append(time.perf_counter() - start)
        for name in sides:
            per_run = statistics.median(times[name]) / n_runs
            rows.append({"sandbox": name, "workers": workers, "runs": n_runs,
                         "ms_per_run": 1000 * per_run, "runs_per_s": 1 / per_run,
                         "mean_share": sum(shares[name]) / len(shares[name]),
                         "same_shares": shares[name] == shares["this tree"]})
    common.print_table(rows, ["sandbox", "workers", "runs", "ms_per_run", "runs_per_s", "mean_share",
                              "same_shares"])
    isolation = sandbox.run_program("pass").isolation
    print(f"isolation of this tree's runs: {isolation}")
    common.append_result(args.out, "sandbox", rows, isolation=isolation)
    return rows


if __name__ == "__main__":
    main()
