"""The GRPO stage: R1-Zero, reasoning-oriented RL and all-scenario RL run this code with different configs.

    python -m r1jax.main --config configs/r1_zero.py:tiny --workdir /tmp/r1_zero --config.init_from=/tmp/base

Before the model is loaded (seconds): every prompt record is read and its mapped fields checked (data.prompt_field
or data.messages_field, data.answer_field, data.system_field: a missing or wrong-typed field fails naming
file:line, the field and its config key), the reference answer is put where the rewards read it (`answer`), and
rl.rewards are resolved against the records' fields (plug-ins imported, required fields present). Prompts are
rendered with data.template ("checkpoint": the checkpoint's own chat template, as transformers'
apply_chat_template(..., add_generation_prompt=True); "r1_zero" for base models), a system turn when the data
(data.system_field) or the config (data.system) gives one.

One rollout (an RL "iteration"; DeepSeekMath Algorithm 1, outer loop over batches):
  1. prompts      B = rl.prompts_per_rollout records from the shuffled prompt stream (rendered prompt tokens)
  2. sample       G = rl.group_size completions per prompt (r1jax.rl.sampler: one prefill per prompt, one
                  jitted while_loop), temperature / top-k / top-p as configured, stop on any of the tokenizer's
                  EOS ids (an HF checkpoint's generation_config.json may name several) or rl.stop_strings (on
                  text, however tokenised); ids beyond the tokenizer's vocabulary (embedding padding) never drawn
  3. score        rl.rewards, (name, weight[, kwargs]) summed by r1jax.rl.rewards.score; the dataset's
                  columns are the reward fields, plus `lengths` (completion tokens)
  4. dynamic      optional (rl.dynamic_sampling, DAPO): groups whose rewards are all equal carry no gradient;
                  drop them and sample more prompts, at most rl.dynamic_max_batches batches per rollout; if
                  the cap is hit the batch is topped up with dropped groups (zero advantage)
  5. advantages   r1jax.rl.grpo.group_advantages (rl.adv_scale, rl.adv_baseline); truncated completions are
                  left out of the loss with rl.mask_truncated
  6. log-probs    π_old = the current params, π_ref = the frozen reference (only when rl.beta > 0), both by
                  models.forward with the logits divided by the sampling temperature (r1jax.rl.trainer;
                  π_old inside the update's own forward when μ = mini_batches = 1); with rl.pack the rows are
                  packed first-fit into sequences of the prompt + completion bucket (trainer.pack_batch: the
                  same loss, a fraction of the padded tokens at long-tailed lengths; mini-batches are then
                  sets of whole packed sequences)
  7. update       rl.mu passes x rl.mini_batches optimizer updates (one jitted scan); state.step counts
                  optimizer updates, so train.steps and the LR schedule are in updates
  8. reference    with rl.ref_reset_every = R > 0, the reference becomes a copy of the policy every R updates
                  (R1: every 400 steps) and is saved to WORKDIR/reference/<step> for exact resumes

Memory at long completions (docs/sharding.md): rl.micro_batches accumulates gradients inside each mini-batch,
rl.score_chunk_rows runs the π_old / π_ref log-prob pass that many rows at a time, rl.ref_dtype stores the
frozen reference in that dtype (bfloat16 at scale; its forward computes in the model's dtype either way).

Everything random comes from the TrainState's rng (split per rollout: sampling key, mini-batch shuffle key),
and the prompt stream's position is saved in the checkpoint's meta, so a resumed run continues exactly as an
uninterrupted one would (same prompts, same samples, same updates).

Weights: resume WORKDIR/checkpoints, else config.init_from (an r1jax run or a Hugging Face directory), else a
fresh init (to start from an earlier stage's result, chain the two in a pipeline: configs/r1.py). The architecture
comes with the initial weights (an r1jax checkpoint's saved ModelConfig, an HF config.json); config.model then only
sets the training numerics (dtype, remat, ...). The loop (steps, logging, checkpoints, preemption, NaN guard) is
r1jax/train/loop.py's, one rollout per iteration; a few rollouts of every logged step go to WORKDIR/samples.jsonl
(prompt, completion, rewards, length, truncated). Prompts longer than the largest rl.prompt_buckets are dropped and
counted (`prompts_dropped/too_long`). When rewards ran programs, the sandbox's counts are logged (sandbox/runs,
sandbox/unsafe_runs: runs without namespaces, sandbox/memcg_runs).

Departures from the papers, stated: old log-probs come from the trainer's forward before the first update,
not from the sampler (the two are logged against each other as `logprob_diff_max`); the reference is a full
frozen params copy (no LoRA-style sharing).

Several processes (jax.distributed, r1jax/rl/rollouts.py `sample_groups`): the prompt stream's order and position
are the same on every process; each process owns a contiguous block of each batch's prompts (training rollouts,
dynamic sampling's extra batches and held-out evaluation alike), the prompt batch is assembled from the blocks,
the sampler decodes all rows as one program over every device, each process scores only its own block's groups
and the scores are exchanged, so every process holds the same rollout and steps 4-5 decide the same everywhere.
samples.jsonl is written by process 0 from that gathered rollout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import numpy as np

from r1jax.eval.metrics import pass_at_1_mean
from r1jax.rl import engine as engine_lib
from r1jax.rl import grpo, sandbox, stops
from r1jax.rl import rewards as rewards_lib
from r1jax.rl import sampler as sampler_lib
from r1jax.rl import trainer as trainer_lib
from r1jax.rl.rollouts import (Group, PromptStream, ReferenceStore, behaviour_metrics, encode_prompt_records,
                               put_rows, read_prompt_records, sample_groups, to_host, write_samples)
from r1jax.train import state as state_lib
from r1jax.train.metrics import forget_after
from r1jax.train.run import StageResult, data_files, is_primary, load_policy, mesh_and_rules, model_config, open_run

log = logging.getLogger(__name__)

def run(config, workdir: str) -> StageResult:
    rl = config.rl

    # ---------------------------------------------------------------- 1. run, data and rewards checked (seconds)
    run = open_run(config, workdir)
    reward_specs = tuple(tuple(s) for s in rl.rewards)
    records = read_prompt_records(config.data, data_files(config.data, run.workdir, "train_files", "world_files"))
    eval_files = data_files(config.data, run.workdir, "eval_files", "eval_world_files", required=False)
    eval_records = read_prompt_records(config.data, eval_files) if eval_files else []
    rewards_lib.check_specs(reward_specs, set.intersection(*(set(r) for r in records)) | {"lengths"})

    # ---------------------------------------------------------------- 2. weights
    cfg, init = run.initial_policy()
    if run.resumed and rl.beta and not run.resume_meta.get("reference_step") and config.init_from:
        init = load_policy(config.init_from, run.mesh, run.rules, numerics=cfg)  # the reference = the initial policy

    # ---------------------------------------------------------------- 3. prompts
    tokenizer_path, tokenizer = run.tokenizer(cfg, init)
    buckets = tuple(rl.prompt_buckets)
    prompts, dropped = encode_prompt_records(config.data, records, tokenizer, max(buckets))
    stream = PromptStream(prompts, seed=config.seed)
    if run.resumed:
        stream.set_state(run.resume_meta["prompts"])
    heldout = encode_prompt_records(config.data, eval_records, tokenizer, max(buckets))[0][:config.eval.num_prompts] \
        if eval_records else []

    # ---------------------------------------------------------------- 4. optimizer, state, reference, sampler
    steps = int(config.train.steps)
    loss = loss_spec(config)
    if int(config.train.micro_batches) != 1:
        raise ValueError(f"train.micro_batches={config.train.micro_batches}: the GRPO stage splits a rollout with "
                         "rl.mini_batches (one optimizer update each); leave train.micro_batches at 1")
    if steps % loss.updates_per_rollout:
        raise ValueError(f"train.steps={steps} (optimizer updates) must be a multiple of rl.mu x rl.mini_batches "
                         f"= {loss.updates_per_rollout}")
    mesh, rules = run.mesh, run.rules
    pack = bool(rl.get("pack", False))
    update = trainer_lib.make_update(cfg, trainer_lib.optimizer_key(config.optimizer), steps, loss,
                                     mesh=mesh, rules=rules, pack=pack)
    shardings = update.shardings

    def initial_state():
        if init is not None:
            return state_lib.state_from_params(trainer_lib.copy_params(init.params, shardings.params), update.tx,
                                               config.seed, shardings)
        return state_lib.init_state(cfg, update.tx, config.seed, shardings)

    references = ReferenceStore(os.path.join(run.workdir, "reference"))
    ref_dtype = rl.get("ref_dtype", None)  # the frozen reference's dtype (bfloat16 halves it at scale)
    ref_step = int(run.resume_meta.get("reference_step", 0)) if run.resumed else 0
    state = run.restore(state_lib.abstract_state(cfg, update.tx, shardings))[0] if run.resumed else initial_state()
    ref_params = None
    if loss.beta:
        if ref_step:
            ref_params = references.restore(ref_step, cfg, shardings.params)
        ref_params = trainer_lib.copy_params(ref_params if ref_step else
                                             (initial_state() if run.resumed else state).params,
                                             shardings.params, ref_dtype)
    chunk_rows = int(rl.get("score_chunk_rows", 0))
    scorer = trainer_lib.make_scorer(cfg, loss.temperature, mesh=mesh, rules=rules, chunk_rows=chunk_rows, pack=pack)
    multiple = trainer_lib.row_multiple(mesh, rules, loss, chunk_rows)
    train_spec = sampler_spec(rl, eos_id=tuple(tokenizer.eos_ids), pad_id=tokenizer.pad_id,
                              stop_sequences=stops.stop_strings(tokenizer, tuple(rl.stop_strings)),
                              vocab_size=tokenizer.vocab_size)
    eval_spec = dataclasses.replace(
        train_spec, group_size=int(config.eval.samples),
        method=sampler_lib.method_from_config(config.eval.sampling, float(config.eval.temperature),
                                              config.eval.top_k, config.eval.top_p))
    sample_train = rollout_sampler(cfg, train_spec, rl, mesh=mesh, rules=rules)
    sample_eval = rollout_sampler(cfg, eval_spec, rl, mesh=mesh, rules=rules)
    rollout_kw = dict(tokenizer=tokenizer, reward_specs=reward_specs, prompt_buckets=buckets)

    def evaluate(params) -> dict[str, float]:
        t0 = time.perf_counter()
        per_batch = int(config.eval.batch_prompts)
        groups = []
        for i in range(0, len(heldout), per_batch):
            groups += sample_groups(sample_eval, params, heldout[i:i + per_batch], jax.random.PRNGKey(i),
                                    group_size=eval_spec.group_size, batch_size=per_batch, **rollout_kw)
        out = behaviour_metrics(groups, prefix="heldout_")
        correct = next((k for k in ("accuracy", "answer_accuracy") if k in groups[0].per_reward), None)
        if correct:  # k samples per question: mean over k, then over questions
            out["heldout_pass_at_1"] = pass_at_1_mean([g.per_reward[correct] for g in groups])
        out["heldout_eval_s"] = time.perf_counter() - t0
        return out

    # ---------------------------------------------------------------- 5. one rollout: the loop's step
    per_rollout = loss.updates_per_rollout
    step = int(jax.device_get(state.step))
    last_groups: list[Group] = []

    def step_fn(state):
        nonlocal step, ref_params, ref_step, last_groups
        t_start = time.perf_counter()
        rng, sample_key, shuffle_key = jax.random.split(state.rng, 3)
        state = state.replace(rng=rng)

        # 1-4: prompts, samples, rewards, dynamic sampling
        groups, drawn, sample_s, sampled_tokens = [], [], 0.0, 0
        for attempt in range(max(int(rl.dynamic_max_batches), 1) if rl.dynamic_sampling else 1):
            t0 = time.perf_counter()
            new = sample_groups(sample_train, state.params, stream.take(int(rl.prompts_per_rollout)),
                                jax.random.fold_in(sample_key, attempt), group_size=train_spec.group_size,
                                **rollout_kw)
            sample_s += time.perf_counter() - t0
            sampled_tokens += sum(int(g.lengths.sum()) for g in new)
            drawn += new
            groups += [g for g in new if not rl.dynamic_sampling or g.informative]
            if len(groups) >= rl.prompts_per_rollout:
                break
        if rl.dynamic_sampling:
            fill = [g for g in drawn if not g.informative]
            groups = (groups + fill)[:int(rl.prompts_per_rollout)]

        # 5-6: advantages, trainer batch, π_old and π_ref log-probs
        rewards_n = np.concatenate([g.rewards for g in groups])
        adv_n, adv_metrics = grpo.group_advantages(jax.numpy.asarray(rewards_n, np.float32), train_spec.group_size,
                                                   scale=rl.adv_scale, baseline=rl.adv_baseline)
        truncated_n = np.concatenate([g.truncated for g in groups])
        host_batch = trainer_lib.build_batch(
            [g.prompt for g in groups for _ in range(train_spec.group_size)],
            np.concatenate([g.tokens for g in groups]), np.concatenate([g.lengths for g in groups]), prompt_buckets=buckets,
            completion_buckets=tuple(rl.completion_buckets), pad_id=tokenizer.pad_id,
            train_mask_n=~truncated_n if rl.mask_truncated else None)
        train_batch, layout = trainer_lib.trainer_batch(host_batch, pack, multiple)  # rl.pack: rows packed
        batch = put_rows(train_batch, mesh, rules)
        sampler_logp = trainer_lib.pad_columns(np.concatenate([g.logprobs for g in groups]),
                                               host_batch["mask"].shape[1])
        old_logp, entropy = (None, None) if update.fused else scorer(state.params, batch)
        ref_logp = scorer(ref_params, batch)[0] if loss.beta else None

        # 7: μ x mini-batch updates (π_old inside the update when there is only one)
        t0 = time.perf_counter()
        rows = put_rows({"a": layout.rows(np.asarray(adv_n)), "s": layout.rows(sampler_logp)}, mesh, rules)
        state, update_metrics, logp_before = update(state, batch, old_logp, ref_logp, rows["a"], shuffle_key,
                                                    rows["s"])
        update_metrics = {k: float(v) for k, v in jax.device_get(update_metrics).items()}
        if entropy is not None:
            update_metrics["entropy"] = float(entropy)
        update_s = time.perf_counter() - t0
        real = host_batch["segment_ids"][:, -host_batch["mask"].shape[1]:] > 0
        step += per_rollout

        # 8: reference reset (the loop checks the loss before this step's checkpoint)
        if loss.beta and rl.ref_reset_every and step % int(rl.ref_reset_every) == 0:
            ref_params = trainer_lib.copy_params(state.params, shardings.params, ref_dtype)
            ref_step = step
            references.save(ref_step, ref_params)

        last_groups = drawn
        record = {**behaviour_metrics(drawn), **update_metrics,
                  **{f"batch_{k}": float(v) for k, v in adv_metrics.items()},
                  "logprob_diff_max": float(np.max(np.abs(layout.unrows(to_host(logp_before)) - sampler_logp) * real,
                                                   initial=0.0)),
                  "train_tokens": float(host_batch["mask"].sum()),
                  "batch_fill": float((train_batch["segment_ids"] > 0).mean()),  # real share of the forward's tokens
                  "dynamic_batches": len(drawn) // int(rl.prompts_per_rollout),
                  "kept_group_frac": float(np.mean([g.informative for g in groups])),
                  "epoch": stream.epoch, "rollout": step // per_rollout, "sample_s": sample_s, "update_s": update_s,
                  "sample_tokens_per_s": sampled_tokens / max(sample_s, 1e-9),
                  "rollout_s": time.perf_counter() - t_start, **dropped}
        runs = sandbox.metrics()
        if runs["sandbox/runs"]:  # rewards ran programs: how many, and how many without namespaces (unsafe)
            record.update(runs)
        return state, record, int(host_batch["mask"].sum())

    def meta():
        return {"prompts": stream.get_state(), "model": dataclasses.asdict(cfg), "tokenizer": tokenizer_path,
                "reference_step": ref_step}

    samples_path = os.path.join(run.workdir, "samples.jsonl")
    if is_primary():
        forget_after(samples_path, run.resume_step)
    result = run.loop(
        state, step_fn, meta_fn=meta, step_size=per_rollout, eval_fn=evaluate if heldout else None,
        start_fn=(lambda s: evaluate(s.params)) if heldout and config.eval.at_start else None,
        after_save=lambda: references.prune(run.checkpointer),
        after_log=lambda step: write_samples(samples_path, step, last_groups, int(rl.get("samples_per_log", 4))),
        progress_keys=("reward_mean", "accuracy", "response_length_mean"))
    return run.finish(result, tokenizer_path, samples=samples_path)


def loss_spec(config) -> trainer_lib.LossSpec:
    rl = config.rl
    return trainer_lib.LossSpec(temperature=float(rl.temperature), eps_low=float(rl.eps_low),
                                eps_high=float(rl.eps_high), beta=float(rl.beta), agg=rl.agg,
                                max_len=int(rl.max_new_tokens), mu=int(rl.mu), mini_batches=int(rl.mini_batches),
                                micro_batches=int(rl.get("micro_batches", 1)),
                                ratio_level=rl.get("ratio_level", "token"), tis_cap=float(rl.get("tis_cap", 0.0)),
                                is_mask_band=tuple(rl.get("is_mask_band", ())) or None)


def rollout_sampler(cfg, spec, rl, *, mesh, rules):
    """The slot engine (rl.engine = "slots", rl.slots slots, 0 = one per row; rl.page > 0: a paged cache of
    rl.pages pages) or the static sampler."""
    kind = rl.get("engine", "static")
    if kind == "static":
        return sampler_lib.make_sampler(cfg, spec, mesh=mesh, rules=rules)
    if kind != "slots":
        raise ValueError(f"rl.engine={kind!r}: expected 'slots' or 'static'")
    return engine_lib.make_engine(cfg, spec, engine_lib.spec_from_config(rl), mesh=mesh, rules=rules)


def sampler_spec(rl, *, eos_id: int | tuple[int, ...], pad_id: int, stop_sequences=(),
                 max_new_tokens: int | None = None, vocab_size: int | None = None):
    return sampler_lib.SamplerSpec(
        method=sampler_lib.method_from_config(rl.sampling, float(rl.temperature), rl.top_k, rl.top_p),
        group_size=int(rl.group_size), max_new_tokens=int(max_new_tokens or rl.max_new_tokens), eos_id=eos_id,
        pad_id=pad_id, stop_sequences=stop_sequences, vocab_size=vocab_size)


def smoke_step(config) -> dict:
    """The check every stage offers to tests/test_configs.py (no files, no checkpoint): a fresh model of the
    config samples G completions of 8 tokens for 2 x rl.mini_batches random prompts with the config's sampler,
    and one rollout's GRPO update runs with advantages from a fixed reward pattern (odd rows 1, even rows 0).
    "loss" is the sampled tokens' mean negative log-likelihood; the update's metrics are under "update/"."""
    mesh, rules = mesh_and_rules(config.mesh)
    cfg = model_config(config.model)
    rl, loss = config.rl, loss_spec(config)
    pack, chunk_rows = bool(rl.get("pack", False)), int(rl.get("score_chunk_rows", 0))
    update = trainer_lib.make_update(cfg, trainer_lib.optimizer_key(config.optimizer), int(config.train.steps),
                                     loss, mesh=mesh, rules=rules, pack=pack)
    state = state_lib.init_state(cfg, update.tx, config.seed, update.shardings)
    spec = sampler_spec(rl, eos_id=cfg.vocab_size, pad_id=0, max_new_tokens=8)  # no EOS: 8 tokens per row
    rng = np.random.default_rng(config.seed)
    prompts = [list(rng.integers(4, cfg.vocab_size, 5 + i)) for i in range(2 * loss.mini_batches)]
    prompts_bp, lengths_b = sampler_lib.pad_prompts(prompts, tuple(rl.prompt_buckets), 0)
    out = jax.device_get(jax.tree.map(to_host, sampler_lib.make_sampler(cfg, spec, mesh=mesh, rules=rules)(
        state.params, prompts_bp, lengths_b, jax.random.PRNGKey(config.seed))))
    rewards_n = np.arange(out.lengths.shape[0]) % 2
    adv_n, _ = grpo.group_advantages(jax.numpy.asarray(rewards_n, np.float32), spec.group_size, scale=rl.adv_scale,
                                     baseline=rl.adv_baseline)
    host = trainer_lib.build_batch([p for p in prompts for _ in range(spec.group_size)], out.tokens, out.lengths,
                                   prompt_buckets=tuple(rl.prompt_buckets),
                                   completion_buckets=tuple(rl.completion_buckets), pad_id=0)
    train_batch, layout = trainer_lib.trainer_batch(host, pack, trainer_lib.row_multiple(mesh, rules, loss, chunk_rows))
    batch = put_rows(train_batch, mesh, rules)
    scorer = trainer_lib.make_scorer(cfg, loss.temperature, mesh=mesh, rules=rules, chunk_rows=chunk_rows, pack=pack)
    old_logp = None if update.fused else scorer(state.params, batch)[0]
    ref_logp = scorer(state.params, batch)[0] if loss.beta else None
    _, metrics, _ = update(state, batch, old_logp, ref_logp,
                           put_rows({"a": layout.rows(np.asarray(adv_n))}, mesh, rules)["a"], jax.random.PRNGKey(0))
    nll = float(-out.logprobs.sum() / max(out.lengths.sum(), 1))
    return {"loss": nll, **{f"update/{k}": float(v) for k, v in jax.device_get(metrics).items()}}
