"""Joining a multi-process JAX job, from the environment, before anything touches a device.

Two ways in, one call (`python -m r1jax.main` makes it first thing):

* Explicit: `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES=N` and `JAX_PROCESS_ID=i` (all three) are
  passed to `jax.distributed.initialize`. This is how `python -m r1jax.launch_local` rehearses a pod job on one
  machine: N processes, each with its own fake CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=D`), talking to a coordinator on 127.0.0.1 and exchanging
  collectives through gloo (`jax_cpu_collectives_implementation`). It works the same across real hosts.
* Detected: on a multi-host TPU slice (or under Slurm / Open MPI) the runtime's own variables say that this is
  one process of several, and `jax.distributed.initialize()` reads everything else from them. A single-host
  TPU VM or a laptop sets none of them and stays one process.

After it, `jax.process_index()` / `jax.process_count()` say which share of the data this process reads and
whether it writes the run's logs (process 0 only); orbax's checkpointing and JAX's preemption sync manager
(SIGTERM on any process -> every process stops at the same step) work across the processes.
"""

from __future__ import annotations

import os

import jax

EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Set by the TPU runtime on multi-host slices / multi-slice jobs, by Slurm and by Open MPI.
DETECTED = ("MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _explicit_args(env) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the three JAX_* variables; None when none is set."""
    present = [k for k in EXPLICIT if k in env]
    if not present:
        return None
    if "JAX_NUM_PROCESSES" not in env and "JAX_PROCESS_ID" not in env:
        return None  # JAX_COORDINATOR_ADDRESS alone: a runtime that detects the rest (jax reads it itself)
    missing = [k for k in EXPLICIT if k not in env]
    if missing:
        raise ValueError(f"multi-process run: {present} set but {missing} missing; set all of {list(EXPLICIT)}")
    try:
        n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                         f"{env['JAX_PROCESS_ID']!r} must be integers") from None
    if not 0 <= i < n:
        raise ValueError(f"JAX_PROCESS_ID={i}: expected 0 <= id < JAX_NUM_PROCESSES={n}")
    return env["JAX_COORDINATOR_ADDRESS"], n, i


def _detected(env) -> bool:
    """Whether the runtime's variables say this is one process of several."""
    if "TPU_WORKER_HOSTNAMES" in env and "," not in env["TPU_WORKER_HOSTNAMES"]:
        return "MEGASCALE_COORDINATOR_ADDRESS" in env  # one TPU VM: several only as a slice of a multi-slice job
    return any(k in env for k in DETECTED) or "JAX_COORDINATOR_ADDRESS" in env


def initialize_from_env(env=None) -> bool:
    """Call `jax.distributed.initialize` when this process is one of several; True when it did."""
    env = os.environ if env is None else env
    explicit = _explicit_args(env)
    if explicit is not None:
        coordinator, n, i = explicit
        if n == 1:
            return False
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; TPUs use ICI / DCN
        if env.get("JAX_PLATFORMS") == "cpu":
            # jax 0.10.2: a multi-process CPU job whose programs come from the persistent compilation cache (written
            # by an earlier such job) hangs in its first collective; compiling afresh works (tests/test_multihost.py).
            jax.config.update("jax_enable_compilation_cache", False)
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i,
                                   cluster_detection_method="deactivate")
        return True
    if not _detected(env):
        return False
    jax.distributed.initialize()
    return True
