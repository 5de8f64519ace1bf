"""The GRPO stage: R1-Zero, reasoning-oriented RL and all-scenario RL run this code with different configs.

    python -m r1jax.main --config configs/r1_zero.py:tiny --workdir /tmp/r1_zero

One rollout (an RL "iteration"; DeepSeekMath Algorithm 1, outer loop over batches):
  1. prompts      B = rl.prompts_per_rollout records from the shuffled prompt stream (BOS + prompt tokens)
  2. sample       G = rl.group_size completions per prompt (r1jax.rl.sampler: one prefill per prompt, one
                  jitted while_loop), temperature / top-k / top-p as configured, stop on EOS or rl.stop_strings
  3. score        rl.rewards, (name, weight[, kwargs]) summed by r1jax.rl.rewards.score; the dataset's
                  columns are the reward fields, plus `lengths` (completion tokens)
  4. dynamic      optional (rl.dynamic_sampling, DAPO): groups whose rewards are all equal carry no gradient;
                  drop them and sample more prompts, at most rl.dynamic_max_batches batches per rollout; if
                  the cap is hit the batch is topped up with dropped groups (zero advantage)
  5. advantages   r1jax.rl.grpo.group_advantages (rl.adv_scale, rl.adv_baseline); truncated completions are
                  left out of the loss with rl.mask_truncated
  6. log-probs    π_old = the current params, π_ref = the frozen reference (only when rl.beta > 0), both by
                  models.forward with the logits divided by the sampling temperature (r1jax.rl.trainer;
                  π_old inside the update's own forward when μ = mini_batches = 1)
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

Weights: resume WORKDIR/checkpoints, else config.init_from (an r1jax run or a Hugging Face directory), else
the stage config named by config.base (e.g. `configs/pretrain.py:tiny`) run first in WORKDIR/base (skipped
when finished), else a fresh init. The architecture comes with the initial weights (an r1jax checkpoint's
saved ModelConfig, an HF config.json); config.model then only sets the training numerics (dtype, remat, ...).

Departures from the papers, stated: old log-probs come from the trainer's forward before the first update,
not from the sampler (the two are logged against each other as `logprob_diff_max`); the reference is a full
frozen params copy (no LoRA-style sharing); rewards are computed on every host (rule rewards are cheap).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from r1jax import models
from r1jax.data import templates
from r1jax.data.sources import iterate_records
from r1jax.eval.metrics import pass_at_1_mean
from r1jax.rl import answers, grpo, rewards as rewards_lib
from r1jax.rl import engine as engine_lib
from r1jax.rl import sampler as sampler_lib
from r1jax.rl import trainer as trainer_lib
from r1jax.sharding import logical_to_spec
from r1jax.stages.common import StageResult, is_primary, mesh_and_rules, model_config
from r1jax.stages.sft import TRAINING_FIELDS, ensure_world, finish_run, load_init, stage_tokenizer, start_run
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import state as state_lib
from r1jax.train.loop import NonFiniteError, PreemptionFlag
from r1jax.train.metrics import MetricsLogger

log = logging.getLogger(__name__)

REFLECTION = re.compile(r"re-check|\bwait\b|\bverify\b|\bcheck\b|等等|检查", re.I)


def run(config, workdir: str) -> StageResult:
    rl = config.rl

    # ---------------------------------------------------------------- 1. mesh, model, checkpoints
    workdir, mesh, rules, cfg, checkpointer, resume_step, resume_meta = start_run(config, workdir)

    # ---------------------------------------------------------------- 2. weights
    init_from = config.init_from or (run_base(config.base, workdir) if config.base else None)
    init_params, init_meta = None, {}
    if resume_meta is not None:
        cfg = models.ModelConfig(**resume_meta["model"])
        log.info("resuming %s from step %d", workdir, resume_step)
    if init_from and (resume_meta is None or (rl.beta and not resume_meta.get("reference_step"))):
        cfg, init_params, init_meta = load_init(init_from, checkpoint_architecture(init_from, cfg), mesh, rules)
        log.info("initial weights from %s", init_from)

    # ---------------------------------------------------------------- 3. data
    tokenizer_path, tokenizer = stage_tokenizer(config, workdir, resume_meta, init_meta, cfg)
    train_files, eval_files = resolve_files(config, workdir)
    stream = PromptStream(load_prompts(config.data, train_files, tokenizer), seed=config.seed)
    if resume_meta is not None:
        stream.set_state(resume_meta["prompts"])
    heldout = load_prompts(config.data, eval_files, tokenizer)[:config.eval.num_prompts] if eval_files else []

    # ---------------------------------------------------------------- 4. optimizer, state, reference, steps
    steps = int(config.train.steps)
    loss = loss_spec(config)
    if int(config.train.micro_batches) != 1:
        raise ValueError(f"train.micro_batches={config.train.micro_batches}: the GRPO stage splits a rollout with "
                         "rl.mini_batches (one optimizer update each); leave train.micro_batches at 1")
    if steps % loss.updates_per_rollout:
        raise ValueError(f"train.steps={steps} (optimizer updates) must be a multiple of rl.mu x rl.mini_batches "
                         f"= {loss.updates_per_rollout}")
    update = trainer_lib.make_update(cfg, trainer_lib.optimizer_key(config.optimizer), steps, loss,
                                     mesh=mesh, rules=rules)
    shardings = update.shardings

    def initial_state():
        if init_params is not None:
            return state_lib.state_from_params(trainer_lib.copy_params(init_params, shardings.params), update.tx,
                                               config.seed, shardings)
        return state_lib.init_state(cfg, update.tx, config.seed, shardings)

    references = ReferenceStore(os.path.join(workdir, "reference"))
    ref_dtype = rl.get("ref_dtype", None)  # the frozen reference's dtype (bfloat16 halves it at scale)
    ref_step = 0
    if resume_meta is not None:
        state, _ = checkpointer.restore(resume_step, state_lib.abstract_state(cfg, update.tx, shardings))
        ref_step = int(resume_meta.get("reference_step", 0))
    else:
        state = initial_state()
    ref_params = None
    if loss.beta:
        if ref_step:
            ref_params = trainer_lib.copy_params(references.restore(ref_step, cfg, shardings.params),
                                                 shardings.params, ref_dtype)
        elif resume_meta is not None:
            ref_params = trainer_lib.copy_params(initial_state().params, shardings.params, ref_dtype)
        else:
            ref_params = trainer_lib.copy_params(state.params, shardings.params, ref_dtype)
    scorer = trainer_lib.make_scorer(cfg, loss.temperature, mesh=mesh, rules=rules,
                                     chunk_rows=int(rl.get("score_chunk_rows", 0)))
    train_spec = sampler_spec(rl, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                              stop_sequences=sampler_lib.stop_token_sequences(tokenizer, tuple(rl.stop_strings)))
    eval_spec = dataclasses.replace(
        train_spec, group_size=int(config.eval.samples),
        method=sampler_lib.method_from_config(config.eval.sampling, float(config.eval.temperature),
                                              config.eval.top_k, config.eval.top_p))
    reward_specs = tuple(tuple(s) for s in rl.rewards)
    sample_train = rollout_sampler(cfg, train_spec, rl, mesh=mesh, rules=rules)
    sample_eval = rollout_sampler(cfg, eval_spec, rl, mesh=mesh, rules=rules)
    rollout_kw = dict(tokenizer=tokenizer, reward_specs=reward_specs, prompt_buckets=tuple(rl.prompt_buckets))

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

    # ---------------------------------------------------------------- 5. loop
    start_step = int(jax.device_get(state.step))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if resume_meta is None and is_primary() and os.path.exists(metrics_path):
        os.remove(metrics_path)  # no checkpoint: whatever was logged (e.g. the step-0 eval) is redone
    logger = MetricsLogger(workdir, total_steps=steps, start_step=start_step, enabled=is_primary(),
                           progress=config.train.progress, desc=os.path.basename(workdir) or "grpo")
    per_rollout = loss.updates_per_rollout
    step, rollout = start_step, start_step // per_rollout
    saved_step, last_record, status = resume_step, {}, "done"

    def crossed(every: int) -> bool:
        return every > 0 and (step // every > (step - per_rollout) // every or step == steps)

    def meta():
        return {"stage": "grpo", "prompts": stream.get_state(), "model": dataclasses.asdict(cfg),
                "tokenizer": tokenizer_path, "reference_step": ref_step}

    if start_step == 0 and heldout and config.eval.at_start:
        logger.write(0, evaluate(state.params))
    with PreemptionFlag() as preempted:
        try:
            while step < steps:
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
                adv_n, adv_metrics = grpo.group_advantages(jax.numpy.asarray(rewards_n, np.float32),
                                                           train_spec.group_size, scale=rl.adv_scale,
                                                           baseline=rl.adv_baseline)
                truncated_n = np.concatenate([g.truncated for g in groups])
                completions_nt = np.concatenate([g.tokens for g in groups])
                lengths_n = np.concatenate([g.lengths for g in groups])
                host_batch = trainer_lib.build_batch(
                    [g.prompt for g in groups for _ in range(train_spec.group_size)], completions_nt, lengths_n,
                    prompt_buckets=tuple(rl.prompt_buckets), completion_buckets=tuple(rl.completion_buckets),
                    pad_id=tokenizer.pad_id, train_mask_n=~truncated_n if rl.mask_truncated else None)
                batch = put_rows(host_batch, mesh, rules)
                sampler_logp = trainer_lib.pad_columns(np.concatenate([g.logprobs for g in groups]),
                                                       host_batch["mask"].shape[1])
                old_logp, entropy = (None, None) if update.fused else scorer(state.params, batch)
                ref_logp = scorer(ref_params, batch)[0] if loss.beta else None

                # 7: μ x mini-batch updates (π_old inside the update when there is only one)
                t0 = time.perf_counter()
                state, update_metrics, logp_before = update(
                    state, batch, old_logp, ref_logp, put_rows({"a": np.asarray(adv_n)}, mesh, rules)["a"],
                    shuffle_key, put_rows({"s": sampler_logp}, mesh, rules)["s"])
                update_metrics = {k: float(v) for k, v in jax.device_get(update_metrics).items()}
                if entropy is not None:
                    update_metrics["entropy"] = float(entropy)
                update_s = time.perf_counter() - t0
                real = host_batch["segment_ids"][:, -host_batch["mask"].shape[1]:] > 0
                logp_diff = float(np.max(np.abs(to_host(logp_before) - sampler_logp) * real, initial=0.0))
                step += per_rollout
                rollout += 1
                bad = [k for k in ("loss", "grad_norm") if not math.isfinite(update_metrics[k])]
                if bad:
                    good = checkpointer.latest_step()
                    raise NonFiniteError(
                        f"non-finite {' and '.join(bad)} at step {step}; nothing after it was saved. Last good "
                        f"checkpoint: {checkpointer.step_dir(good) if good is not None else 'none'}. Lower "
                        "optimizer.lr or rl.beta, or set optimizer.clip_norm, then rerun to resume from it.")

                # 8: reference reset
                if loss.beta and rl.ref_reset_every and step % int(rl.ref_reset_every) == 0:
                    ref_params = trainer_lib.copy_params(state.params, shardings.params, ref_dtype)
                    ref_step = step
                    references.save(ref_step, ref_params)

                # metrics, eval, checkpoint
                record = {**behaviour_metrics(drawn), **update_metrics,
                          **{f"batch_{k}": float(v) for k, v in adv_metrics.items()},
                          "logprob_diff_max": logp_diff, "train_tokens": float(host_batch["mask"].sum()),
                          "dynamic_batches": len(drawn) // int(rl.prompts_per_rollout),
                          "kept_group_frac": float(np.mean([g.informative for g in groups])),
                          "epoch": stream.epoch, "rollout": rollout, "sample_s": sample_s, "update_s": update_s,
                          "sample_tokens_per_s": sampled_tokens / max(sample_s, 1e-9)}
                if heldout and crossed(int(config.train.eval_every)):
                    record.update(evaluate(state.params))
                record["rollout_s"] = time.perf_counter() - t_start
                final = step >= steps or preempted.set
                if rollout % max(int(config.train.log_every), 1) == 0 or final or "heldout_eval_s" in record:
                    logger.write(step, record)
                    last_record = {"step": step, **record}
                if crossed(int(config.train.checkpoint_every)) or final:
                    saved_step = checkpointer.save(state, meta())
                    references.prune(checkpointer)
                acc = record.get("accuracy", record.get("reward/answer_accuracy", 0.0))
                logger.progress(per_rollout, reward=record["reward_mean"], acc=acc, len=record["response_length_mean"])
                if preempted.set and step < steps:
                    status = "preempted"
                    log.warning("SIGTERM: saved the checkpoint of step %d; rerun the same command to resume", step)
                    break
        finally:
            checkpointer.wait()
            logger.close()
    return finish_run("grpo", workdir, checkpointer, logger, saved_step, status, last_record, tokenizer_path)


def loss_spec(config) -> trainer_lib.LossSpec:
    rl = config.rl
    return trainer_lib.LossSpec(temperature=float(rl.temperature), eps_low=float(rl.eps_low),
                                eps_high=float(rl.eps_high), beta=float(rl.beta), agg=rl.agg,
                                max_len=int(rl.max_new_tokens), mu=int(rl.mu), mini_batches=int(rl.mini_batches),
                                micro_batches=int(rl.get("micro_batches", 1)),
                                ratio_level=rl.get("ratio_level", "token"), tis_cap=float(rl.get("tis_cap", 0.0)),
                                is_mask_band=tuple(rl.get("is_mask_band", ())) or None)


def rollout_sampler(cfg, spec, rl, *, mesh, rules):
    """The slot engine (rl.engine = "slots", rl.slots slots, 0 = one per row) or the static sampler."""
    kind = rl.get("engine", "static")
    if kind == "static":
        return sampler_lib.make_sampler(cfg, spec, mesh=mesh, rules=rules)
    if kind != "slots":
        raise ValueError(f"rl.engine={kind!r}: expected 'slots' or 'static'")
    return engine_lib.make_engine(cfg, spec, engine_lib.EngineSpec(
        slots=int(rl.get("slots", 0)), chunk_steps=int(rl.get("chunk_steps", 256))), mesh=mesh, rules=rules)


def sampler_spec(rl, *, eos_id: int, pad_id: int, stop_sequences=(), max_new_tokens: int | None = None):
    return sampler_lib.SamplerSpec(
        method=sampler_lib.method_from_config(rl.sampling, float(rl.temperature), rl.top_k, rl.top_p),
        group_size=int(rl.group_size), max_new_tokens=int(max_new_tokens or rl.max_new_tokens), eos_id=eos_id,
        pad_id=pad_id, stop_sequences=stop_sequences)


def smoke_step(config) -> dict:
    """The check every stage offers to tests/test_configs.py (no files, no checkpoint): a fresh model of the
    config samples G completions of 8 tokens for 2 x rl.mini_batches random prompts with the config's sampler,
    and one rollout's GRPO update runs with advantages from a fixed reward pattern (odd rows 1, even rows 0).
    "loss" is the sampled tokens' mean negative log-likelihood; the update's metrics are under "update/"."""
    mesh, rules = mesh_and_rules(config.mesh)
    cfg = model_config(config.model)
    rl, loss = config.rl, loss_spec(config)
    update = trainer_lib.make_update(cfg, trainer_lib.optimizer_key(config.optimizer), int(config.train.steps),
                                     loss, mesh=mesh, rules=rules)
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
    batch = put_rows(host, mesh, rules)
    scorer = trainer_lib.make_scorer(cfg, loss.temperature, mesh=mesh, rules=rules,
                                     chunk_rows=int(rl.get("score_chunk_rows", 0)))
    old_logp = None if update.fused else scorer(state.params, batch)[0]
    ref_logp = scorer(state.params, batch)[0] if loss.beta else None
    _, metrics, _ = update(state, batch, old_logp, ref_logp, put_rows({"a": np.asarray(adv_n)}, mesh, rules)["a"],
                           jax.random.PRNGKey(0))
    nll = float(-out.logprobs.sum() / max(out.lengths.sum(), 1))
    return {"loss": nll, **{f"update/{k}": float(v) for k, v in jax.device_get(metrics).items()}}


# ------------------------------------------------------------------------------------------ rollouts


@dataclasses.dataclass
class Group:
    """One prompt and its G scored completions (host arrays)."""

    record: dict
    prompt: list[int]
    tokens: np.ndarray  # [G, T]
    logprobs: np.ndarray  # [G, T] sampler log-probs
    lengths: np.ndarray  # [G]
    truncated: np.ndarray  # [G] bool
    texts: list[str]
    rewards: np.ndarray  # [G] weighted sum
    per_reward: dict[str, np.ndarray]  # name -> [G]
    errors: dict[str, int]  # reward errors of the sampled batch, counted on its first group only

    @property
    def informative(self) -> bool:
        """Rewards not all equal: the group has a non-zero advantage."""
        return bool(np.any(self.rewards != self.rewards[0]))


def sample_groups(sample_fn, params, prompts: list[dict], rng, *, group_size: int, tokenizer, reward_specs,
                  prompt_buckets, batch_size: int | None = None) -> list[Group]:
    """Sample and score G completions for each prompt record (records carry `tokens`, see load_prompts)."""
    prompts_bp, lengths_b = sampler_lib.pad_prompts([r["tokens"] for r in prompts], prompt_buckets,
                                                    tokenizer.pad_id, batch_size)
    out = jax.device_get(jax.tree.map(to_host, sample_fn(params, prompts_bp, lengths_b, rng)))
    n = len(prompts) * group_size  # rows beyond are batch padding
    texts = [tokenizer.decode(out.tokens[i, :out.lengths[i]]) for i in range(n)]
    fields = {k: [r[k] for r in prompts for _ in range(group_size)] for k in prompts[0] if k not in ("tokens",)}
    fields["lengths"] = [int(x) for x in out.lengths[:n]]
    prompt_texts = fields.pop("prompt_text")
    total, per_reward, errors = rewards_lib.score(reward_specs, prompt_texts, texts, fields)
    # Accuracy and format are measured even when not rewarded (or rewarded inside by_source's routes). Accuracy is
    # read in the stage's answer format: answer_accuracy for a stage trained on it anywhere (the readable format,
    # where the R1-Zero-format `accuracy` reads 0), else the R1-Zero `accuracy`.
    # Measured accuracy is NaN on samples without an `answer` (all-scenario RL's general prompts): it is averaged
    # over the samples that have one.
    correct = "answer_accuracy" if "answer_accuracy" in rewards_lib.reward_names(reward_specs) else "accuracy"
    if "format" not in per_reward:
        per_reward["format"] = rewards_lib.score((("format", 1.0),), prompt_texts, texts, fields)[1]["format"]
    if correct not in per_reward and "answer" in fields:
        rows = [i for i, answer in enumerate(fields["answer"]) if answer is not None]
        per_reward[correct] = np.full(n, np.nan)
        if rows:
            per_reward[correct][rows] = rewards_lib.score(
                ((correct, 1.0),), [prompt_texts[i] for i in rows], [texts[i] for i in rows],
                {k: [v[i] for i in rows] for k, v in fields.items()})[1][correct]
    groups = []
    for b, record in enumerate(prompts):
        rows = slice(b * group_size, (b + 1) * group_size)
        groups.append(Group(record=record, prompt=list(record["tokens"]), tokens=out.tokens[rows],
                            logprobs=out.logprobs[rows], lengths=out.lengths[rows], truncated=out.truncated[rows],
                            texts=texts[rows], rewards=total[rows],
                            per_reward={k: v[rows] for k, v in per_reward.items()},
                            errors=errors if b == 0 else dict.fromkeys(errors, 0)))
    return groups


def behaviour_metrics(groups: list[Group], prefix: str = "") -> dict[str, float]:
    """Rewards, accuracy, format rate, lengths, truncation, reflection words over the samples of `groups`."""
    lengths = np.concatenate([g.lengths for g in groups])
    out = {"reward_mean": float(np.mean(np.concatenate([g.rewards for g in groups])))}
    for name in groups[0].per_reward:
        values = np.concatenate([g.per_reward[name] for g in groups])
        if np.isnan(values).all():  # measured accuracy on general prompts only
            continue
        value = float(np.nanmean(values))
        out["accuracy" if name == "accuracy" else f"reward/{name}"] = value
        if name == "format":
            out["format_rate"] = value
    for name in groups[0].errors:
        out[f"reward_errors/{name}"] = float(sum(g.errors[name] for g in groups))
    reflections = [len(REFLECTION.findall(answers.split_reasoning(t)[0] or t)) for g in groups for t in g.texts]
    out.update({"response_length_mean": float(lengths.mean()), "response_length_max": float(lengths.max()),
                "truncated_frac": float(np.mean(np.concatenate([g.truncated for g in groups]))),
                "zero_std_frac": float(np.mean([not g.informative for g in groups])),
                "reflection_rate": float(np.mean([r > 0 for r in reflections])),
                "reflection_words": float(np.mean(reflections))})
    return {prefix + k: v for k, v in out.items()} if prefix else out


# ----------------------------------------------------------------------------------------------- data


def resolve_files(config, workdir: str) -> tuple[list[str], list[str]]:
    """(train prompt files, held-out prompt files): the config's, or the tiny world's."""
    data = config.data
    train_files, eval_files = list(data.train_files), list(data.eval_files)
    if (not train_files or not eval_files) and data.tiny_world:
        world = ensure_world(workdir, data.world_seed)
        train_files = train_files or [os.path.join(world, f"{n}.jsonl") for n in data.world_files]
        eval_files = eval_files or [os.path.join(world, f"{n}.jsonl") for n in data.eval_world_files]
    if not train_files:
        raise ValueError("config.data.train_files is empty (set it, or data.tiny_world=True at tiny scale)")
    return train_files, eval_files


def load_prompts(data, files: list[str], tokenizer) -> list[dict]:
    """Every record of `files` with `prompt_text` (data.template applied to data.prompt_field, or the field
    verbatim when the template is empty) and `tokens` (BOS + its encoding)."""
    records = []
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    for record in iterate_records(files, schema={data.prompt_field: "str"}):
        text = record[data.prompt_field]
        if data.template:
            text = templates.render_prompt(data.template, text)
        records.append({**record, "prompt_text": text, "tokens": bos + tokenizer.encode(text)})
    if not records:
        raise ValueError(f"no prompt records in {files}")
    return records


class PromptStream:
    """Prompt records in a seeded shuffle per epoch; its state ({epoch, index}) is saved with checkpoints."""

    def __init__(self, records: list[dict], seed: int):
        self.records, self.seed = records, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.index == len(self.records):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            out.append(self.records[self._order[self.index]])
            self.index += 1
        return out

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle(self.epoch)


def run_base(spec: str, workdir: str) -> str:
    """Run the stage config `spec` ("path/to/config.py[:preset]") in WORKDIR/base unless it finished there;
    returns that run directory (its final checkpoint is the initial policy)."""
    from r1jax import stages

    base_dir = os.path.join(workdir, "base")
    result_path = os.path.join(base_dir, "result.json")
    if os.path.isfile(result_path):
        import json

        with open(result_path) as f:
            if json.load(f).get("status") in ("done", "data_exhausted"):
                return base_dir
    log.info("config.init_from is unset: running the base stage %s in %s first", spec, base_dir)
    result = stages.run(load_config(spec), base_dir)
    if not result.finished:
        raise RuntimeError(f"the base stage {spec} in {base_dir} ended with status {result.status!r}; rerun to "
                           "resume it")
    return base_dir


def checkpoint_architecture(path: str, cfg: models.ModelConfig) -> models.ModelConfig:
    """The architecture of the r1jax checkpoint at `path` with cfg's training numerics (TRAINING_FIELDS: dtype,
    remat, bias rate, ...), so an RL config need not repeat its base model's sizes; cfg itself otherwise
    (a Hugging Face directory brings its own config.json)."""
    found = ckpt_lib.find_checkpoint(path)
    if found is None:
        return cfg
    reader = ckpt_lib.Checkpointer(found[0], read_only=True)
    meta = reader.restore_meta(found[1])
    reader.close()
    if "model" not in meta:
        return cfg
    return models.ModelConfig(**meta["model"]).replace(**{name: getattr(cfg, name) for name in TRAINING_FIELDS})


def load_config(spec: str):
    """get_config(preset) of a config file given as "path.py[:preset]" (relative to the cwd or the repo root)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), path)
    module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    if module_spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file {spec!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


# ------------------------------------------------------------------------------------- arrays and references


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def put_rows(host: dict[str, np.ndarray], mesh, rules) -> dict[str, Any]:
    """Host arrays (the same on every host) as global arrays sharded over rows."""
    out = {}
    for k, v in host.items():
        spec = logical_to_spec(("act_batch",) + (None,) * (v.ndim - 1), rules, mesh, v.shape, f"GRPO batch {k!r}")
        out[k] = jax.device_put(v, NamedSharding(mesh, spec))
    return out


class ReferenceStore:
    """Reference params saved at reset steps (WORKDIR/reference/<step>), so a resume restores the right one."""

    def __init__(self, directory: str):
        self.directory = directory

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, params) -> None:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(self._path(step), params, force=True)

    def restore(self, step: int, cfg: models.ModelConfig, shardings):
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                models.abstract_params(cfg), shardings)
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(self._path(step), abstract)

    def prune(self, checkpointer: ckpt_lib.Checkpointer) -> None:
        """Delete references that no remaining checkpoint can need (older than the oldest one's)."""
        if not is_primary() or not os.path.isdir(self.directory):
            return
        checkpointer.wait()
        kept = checkpointer.manager.all_steps()
        if not kept:
            return
        saved = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
        needed = max([s for s in saved if s <= min(kept)], default=None)
        import shutil

        for s in saved:
            if needed is not None and s < needed:
                shutil.rmtree(self._path(s), ignore_errors=True)
