"""The training loop shared by the stages: steps, logging, eval, checkpoints, NaN guard, preemption.

    result = train_loop(state, step_fn, batches, put_batch, steps=..., checkpointer=..., logger=..., ...)

Per step: next host batch -> global arrays -> jitted step (state donated). Metrics stay on device and are
fetched together at log / eval / checkpoint points, so the host never waits on the device between them.
Every fetched step is checked for a non-finite loss or gradient norm *before* anything is saved: a NaN
state is never checkpointed, and the error names the step range and the last good checkpoint.

SIGTERM (TPU preemption, `kill`) sets a flag; after the current step the loop saves a checkpoint of that
step, waits for it to be written and returns with status "preempted". Rerunning the same command
resumes from it. On multi-host jobs the hosts agree on the step through JAX's preemption sync manager.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from r1jax.train.checkpoint import Checkpointer
from r1jax.train.metrics import MetricsLogger
from r1jax.train.state import TrainState

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    pass


@dataclasses.dataclass
class LoopResult:
    status: str  # "done" | "preempted" | "data_exhausted"
    step: int
    metrics: dict[str, Any]  # the last logged record
    checkpoint_step: int | None


class PreemptionFlag:
    """Context manager: `.set` becomes True once the job is being preempted.

    One process: SIGTERM sets it (the handler replaces the default one while the loop runs). Several
    processes: every host must stop at the same step, so the flag asks JAX's preemption sync manager
    (which owns SIGTERM after jax.distributed.initialize) through orbax's `reached_preemption(step)`."""

    def __init__(self, checkpointer: Checkpointer | None = None):
        self._set = False
        self._previous = None
        self._checkpointer = checkpointer
        self._multi = jax.process_count() > 1

    def __enter__(self) -> "PreemptionFlag":
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self._set = True

    def check(self, step: int) -> bool:
        """Whether to save and stop after `step` (the same answer on every host)."""
        if self._multi and self._checkpointer is not None:
            return bool(self._checkpointer.manager.reached_preemption(step))
        return self._set

    @property
    def set(self) -> bool:
        return self._set

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(fetched: list[tuple[int, dict]], checkpointer: Checkpointer) -> None:
    for step, metrics in fetched:
        bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(float(metrics[k]))]
        if bad:
            first, last = fetched[0][0], fetched[-1][0]
            good = checkpointer.latest_step()
            raise NonFiniteError(
                f"non-finite {' and '.join(bad)} at step {step} (steps {first}..{last} were checked together); "
                f"nothing after it was saved. Last good checkpoint: "
                f"{checkpointer.step_dir(good) if good is not None else 'none'}. Lower optimizer.lr, raise "
                f"warmup_steps or set optimizer.clip_norm, then rerun the same command to resume from it.")


def train_loop(
    state: TrainState,
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    batches: Iterator[dict[str, np.ndarray]],
    put_batch: Callable[[dict[str, np.ndarray]], Any],
    *,
    steps: int,
    checkpointer: Checkpointer,
    logger: MetricsLogger,
    meta_fn: Callable[[], dict[str, Any]],
    data_state_fn: Callable[[], Any] | None = None,
    log_every: int = 10,
    checkpoint_every: int = 1000,
    eval_every: int = 0,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    data_metrics: Callable[[], dict[str, Any]] = dict,
) -> LoopResult:
    """Runs `step_fn` until `steps` (total, counting the restored state's steps). See the module docstring.
    `meta_fn()` (JSON for the checkpoint's meta) and `data_state_fn()` (this process's data iterator state)
    are called right after the step whose checkpoint they go into."""
    step = int(jax.device_get(state.step))
    pending: list[tuple[int, dict]] = []
    last_record: dict[str, Any] = {}
    saved_step = checkpointer.latest_step()
    window_tokens, window_start, timing_started = 0, time.perf_counter(), False
    status = "done"
    with PreemptionFlag(checkpointer) as preempted:
        try:
            while step < steps:
                try:
                    host_batch = next(batches)
                except StopIteration:
                    status = "data_exhausted"
                    log.warning("the data ended at step %d before train.steps=%d", step, steps)
                    break
                state, metrics = step_fn(state, put_batch(host_batch))
                step += 1
                pending.append((step, metrics))
                window_tokens += int(np.count_nonzero(host_batch["segment_ids"]))
                if not timing_started:  # leave the first step's compilation out of tokens/s
                    jax.block_until_ready(metrics)
                    window_tokens, window_start, timing_started = 0, time.perf_counter(), True

                stop = preempted.check(step)  # read once: a SIGTERM arriving later is handled after the next step
                final = step == steps or stop
                log_now = step % log_every == 0 or final
                eval_now = eval_fn is not None and eval_every > 0 and (step % eval_every == 0 or step == steps)
                save_now = step % checkpoint_every == 0 or final
                if log_now or eval_now or save_now:
                    fetched = [(s, jax.device_get(m)) for s, m in pending]
                    pending.clear()
                    _check_finite(fetched, checkpointer)
                    last = fetched[-1][1]
                if log_now or eval_now:
                    elapsed = time.perf_counter() - window_start
                    record = {k: float(v) for k, v in last.items()}
                    record["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 and window_tokens else 0.0
                    record.update(data_metrics())
                    if eval_now:
                        record.update(eval_fn(state.params))
                    logger.write(step, record)
                    last_record = {"step": step, **record}
                    window_tokens, window_start = 0, time.perf_counter()
                if save_now:
                    saved_step = checkpointer.save(state, meta_fn(), data_state_fn() if data_state_fn else None)
                logger.progress(1, **({"loss": last_record["loss"], "tok/s": int(last_record["tokens_per_s"])}
                                      if last_record else {}))
                if stop:
                    status = "preempted"
                    log.warning("SIGTERM: saved the checkpoint of step %d; rerun the same command to resume", step)
                    break
            if status == "data_exhausted" and step != saved_step and step > 0:
                fetched = [(s, jax.device_get(m)) for s, m in pending]
                _check_finite(fetched, checkpointer)
                saved_step = checkpointer.save(state, meta_fn(), data_state_fn() if data_state_fn else None)
        finally:
            checkpointer.wait()
            logger.close()
    return LoopResult(status=status, step=step, metrics=last_record, checkpoint_step=saved_step)
