"""The one training loop: SFT, GRPO and the reward model each hand it their step as a function.

    result = train_loop(state, step_fn, steps=..., checkpointer=..., logger=..., meta_fn=..., ...)

`step_fn(state) -> (state, metrics, tokens)` does one iteration of the stage (SFT and the reward model: one
optimizer update on the next batch; GRPO: one rollout, `step_size` = rl.mu x rl.mini_batches updates) and raises
StopIteration when its data has ended. `metrics` may stay on device: the loop fetches the pending steps' metrics
together at log / eval / checkpoint points, so the host does not wait on the device between them. `tokens` (the
tokens the iteration trained on) gives tokens_per_s, the first iteration (compilation) left out.

The loop owns, for every stage alike:
  steps          state.step counts optimizer updates; the run ends at `steps` (total, a resumed state's included)
  cadence        a record every `log_every` iterations, eval every `eval_every` steps and at the end (0: never),
                 a checkpoint every `checkpoint_every` steps and at the end ("every N steps" = the iteration
                 crossed a multiple of N, so GRPO's multi-update iterations keep the cadence in steps)
  NaN guard      every fetched step is checked for a non-finite loss or gradient norm *before* anything is saved:
                 a NaN state is never checkpointed, and the error names the steps and the last good checkpoint
  preemption     `Preemption.check(iteration)` after every iteration. Several processes (jax.distributed):
                 orbax's `reached_preemption(iteration)`, i.e. JAX's preemption sync manager, which receives the
                 SIGTERM and makes every process answer True at the same iteration. One process: a SIGTERM handler
                 sets a flag. When True: save the checkpoint of that step, wait for it, return "preempted".
  exact resume   the stage restores its state (and data position, `data_state_fn` / meta) from the checkpoint;
                 metrics.jsonl and TensorBoard forget what was logged after the restored step
                 A SIGTERM that arrives while step_fn waits for data (the data layer searching past skipped
                 records) ends that search: the stage's data iterator polls `Preemption.requested` (its
                 should_stop) and raises sources.StopRequested, which the loop treats as preemption (save the
                 last step if unsaved, return "preempted"; nothing to save at step 0).
  data end       StopIteration from step_fn: save the last step, return "data_exhausted"; at step 0 (every
                 record skipped) an AllSkippedError with the skip counts per reason: the command exits non-zero
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from typing import Any, Callable

import jax

from r1jax.data.sources import AllSkippedError, StopRequested
from r1jax.train.checkpoint import Checkpointer
from r1jax.train.metrics import MetricsLogger

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    pass


@dataclasses.dataclass
class LoopResult:
    status: str  # "done" | "preempted" | "data_exhausted"
    step: int
    metrics: dict[str, Any]  # the last logged record
    checkpoint_step: int | None


class Preemption:
    """Context manager; `check(iteration)` says whether to save and stop after this iteration (the same answer
    on every process). See the module docstring."""

    def __init__(self, checkpointer: Checkpointer, flag: "StopFlag | None" = None):
        self._flag = flag if flag is not None else StopFlag()
        self._previous = None
        self._checkpointer = checkpointer
        self._distributed = jax.process_count() > 1  # JAX's preemption sync manager owns SIGTERM then

    def __enter__(self) -> "Preemption":
        if not self._distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self._flag.set = True

    def check(self, iteration: int) -> bool:
        # The iteration, not the step: the sync manager agrees on max(ids) + 1 and answers True only at that exact
        # id, which a step that advances by step_size > 1 (GRPO) would skip -- the run would never stop.
        if self._distributed:
            return bool(self._checkpointer.manager.reached_preemption(iteration))
        return self._flag.set

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class StopFlag:
    """Set by the loop's SIGTERM handler (one process). A stage creates it before its data iterator and hands
    `requested` to the data layer as should_stop, so a SIGTERM also ends a search for a usable record."""

    set: bool = False

    def requested(self) -> bool:
        return self.set


def check_finite(fetched: list[tuple[int, dict]], checkpointer: Checkpointer) -> None:
    """NonFiniteError when a fetched step's loss or grad_norm is not finite, naming the last good checkpoint."""
    for step, metrics in fetched:
        bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(float(metrics[k]))]
        if bad:
            first, last = fetched[0][0], fetched[-1][0]
            good = checkpointer.latest_step()
            raise NonFiniteError(
                f"non-finite {' and '.join(bad)} at step {step} (steps {first}..{last} were checked together); "
                f"nothing after it was saved. Last good checkpoint: "
                f"{checkpointer.step_dir(good) if good is not None else 'none'}. Lower optimizer.lr, raise "
                f"warmup_steps or set optimizer.clip_norm (GRPO: or lower rl.beta), then rerun the same command to "
                f"resume from it.")


def train_loop(
    state,
    step_fn: Callable[[Any], tuple[Any, dict, int]],
    *,
    steps: int,
    checkpointer: Checkpointer,
    logger: MetricsLogger,
    meta_fn: Callable[[], dict[str, Any]],
    data_state_fn: Callable[[], Any] | None = None,
    step_size: int = 1,
    log_every: int = 10,
    checkpoint_every: int = 1000,
    eval_every: int = 0,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    start_fn: Callable[[Any], dict[str, float]] | None = None,
    data_metrics: Callable[[], dict[str, Any]] = dict,
    after_save: Callable[[], None] | None = None,
    after_log: Callable[[int], None] | None = None,
    progress_keys: tuple[str, ...] = ("loss",),
    stop_flag: StopFlag | None = None,
) -> LoopResult:
    """Runs `step_fn` until `steps`; see the module docstring. `meta_fn()` (JSON for the checkpoint's meta) and
    `data_state_fn()` (this process's data iterator state) are called right after the step whose checkpoint they
    go into; `start_fn(state)`, on a run that starts at step 0, gives a record logged at step 0 (e.g. an eval);
    `after_save()` runs after each checkpoint save, `after_log(step)` after each record; `stop_flag`: the flag the
    SIGTERM handler sets (the one the stage's data iterator polls), a new one if None."""
    step = int(jax.device_get(state.step))
    saved_step = checkpointer.latest_step()
    pending: list[tuple[int, dict]] = []
    last_record: dict[str, Any] = {}
    window_tokens, window_start, timing_started = 0, time.perf_counter(), False
    status, iteration = "done", step // step_size

    def crossed(every: int) -> bool:  # this iteration reached a multiple of `every` steps
        return every > 0 and step // every > (step - step_size) // every

    def save() -> None:
        nonlocal saved_step
        saved_step = checkpointer.save(state, meta_fn(), data_state_fn() if data_state_fn else None)
        if after_save is not None:
            after_save()

    if step == 0 and start_fn is not None and (record := start_fn(state)):
        logger.write(0, record)
        last_record = {"step": 0, **record}
    with Preemption(checkpointer, stop_flag) as preemption:
        try:
            while step < steps:
                try:
                    state, metrics, tokens = step_fn(state)
                except StopRequested as e:  # SIGTERM while the data layer searched for a batch
                    status = "preempted"
                    log.warning("SIGTERM (preemption) while waiting for data at step %d (%s)", step, e)
                    break
                except StopIteration:
                    if step == 0:  # not one batch: every record was skipped (or there were none)
                        raise AllSkippedError(f"the training data gave no batch at all; records skipped, by "
                                              f"reason: {data_metrics() or 'none counted'}", {}, {}, 0) from None
                    status = "data_exhausted"
                    log.warning("the data ended at step %d before train.steps=%d", step, steps)
                    break
                step += step_size
                iteration += 1
                pending.append((step, metrics))
                window_tokens += tokens
                if not timing_started:  # leave the first iteration's compilation out of tokens/s
                    jax.block_until_ready(metrics)
                    window_tokens, window_start, timing_started = 0, time.perf_counter(), True

                stop = preemption.check(iteration)  # once per iteration, the same one on every process
                final = step >= steps or stop
                eval_now = eval_fn is not None and eval_every > 0 and (crossed(eval_every) or step >= steps)
                log_now = iteration % max(log_every, 1) == 0 or final or eval_now
                save_now = crossed(checkpoint_every) or final
                if log_now or save_now:
                    fetched = [(s, jax.device_get(m)) for s, m in pending]
                    pending.clear()
                    check_finite(fetched, checkpointer)
                    last = fetched[-1][1]
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    record = {k: float(v) for k, v in last.items()}
                    record["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 and window_tokens else 0.0
                    record.update(data_metrics())
                    if eval_now:
                        record.update(eval_fn(state.params))
                    logger.write(step, record)
                    last_record = {"step": step, **record}
                    if after_log is not None:
                        after_log(step)
                    window_tokens, window_start = 0, time.perf_counter()
                if save_now:
                    save()
                logger.progress(step_size, **{k: last_record[k] for k in progress_keys if k in last_record})
                if stop and step < steps:
                    status = "preempted"
                    log.warning("SIGTERM (preemption): saved the checkpoint of step %d; rerun the same command to resume",
                                step)
                    break
            if status in ("data_exhausted", "preempted") and step != saved_step and step > 0:
                check_finite([(s, jax.device_get(m)) for s, m in pending], checkpointer)
                save()
        finally:
            checkpointer.wait()
            logger.close()
    return LoopResult(status=status, step=step, metrics=last_record, checkpoint_step=saved_step)
