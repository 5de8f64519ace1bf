"""Training backbone shared by the stages.

  run.py         the run lifecycle: open_run, load_policy, data_files, Run.loop, Run.finish -> StageResult
  loop.py        the one loop: cadence of logs / evals / checkpoints, NaN guard, preemption, exact resume
  optimizer.py   AdamW + warmup/decay schedule, clipping; router bias excluded, decay only on matrices
  state.py       TrainState(step, params, opt_state, rng) and its shardings; sharded init
  step.py        masked next-token + MTP + aux loss over packed rows; the jitted, donated train/eval steps
  checkpoint.py  orbax CheckpointManager: async, keep-N, step-named, atomic; per-process data state; init_from
  metrics.py     metrics.jsonl, TensorBoard, tqdm (process 0 only); samples.jsonl records
"""
