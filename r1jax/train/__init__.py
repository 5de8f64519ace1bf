"""Training backbone shared by the stages.

  optimizer.py   AdamW + warmup/decay schedule, clipping; router bias excluded, decay only on matrices
  state.py       TrainState(step, params, opt_state, rng) and its shardings; sharded init
  step.py        masked next-token + MTP + aux loss over packed rows; the jitted, donated train/eval steps
  checkpoint.py  orbax CheckpointManager: async, keep-N, step-named, atomic; per-process data state; init_from
  metrics.py     metrics.jsonl, TensorBoard, tqdm (process 0 only)
  loop.py        the loop: log / eval / checkpoint points, NaN guard, SIGTERM preemption
"""
