"""The SFT stage: pretraining, cold start, the 800k SFT and distillation all run this code.

    python -m r1jax.main --config configs/sft.py:tiny --workdir /tmp/sft

The only differences between those uses are data in the config: the files, the prompt/response fields
(or `text_field` for pretraining, which trains every token), the model preset and where its weights come
from (`init_from`). One straight flow:

  1. run                WORKDIR, mesh, checkpoints, resume point (r1jax/train/run.py)
  2. data check         the mapped record fields of a sample of every file (fields.check_sample): a missing or
                        wrong-typed field fails here, with file:line and the config key, before any weight loads
  3. weights            resume WORKDIR/checkpoints, else config.init_from (r1jax run, HF dir or a Hub id in the
                        local HF cache: its architecture, tokenizer, EOS ids and chat template), else a fresh init
  4. data               tokenizer, train / eval datasets (files, or the tiny world; data.eval_holdout holds out
                        records of the same files, pipeline.holdout_split, so skips name the user's file:line)
  5. optimizer + step   AdamW (router bias excluded), sharded, donated, one jitted update per batch
  6. loop               r1jax/train/loop.py: metrics.jsonl, TensorBoard, eval, checkpoints, preemption (also while
                        the data layer searches past skipped records), NaN guard

Records (config.data): `text_field` (pretraining: every token trained); `messages_field` (conversations rendered
with the checkpoint's chat template, the loss on exactly the assistant turns: r1jax/data/chat.py); or
`prompt_field` + `response_field` (+ `system_field`), rendered with `data.template`: a plain template of
r1jax/data/templates.py, or "checkpoint" = the checkpoint's chat template (one user turn, one assistant turn).

Outputs (StageResult.outputs): checkpoint (the final step dir), tokenizer, metrics (metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from r1jax import models
from r1jax.data import chat, fields
from r1jax.train import optimizer as opt_lib
from r1jax.train import state as state_lib
from r1jax.train import step as step_lib
from r1jax.train.loop import StopFlag
from r1jax.train.run import StageResult, data_files, mesh_and_rules, model_config, open_run


def run(config, workdir: str) -> StageResult:
    # ---------------------------------------------------------------- 1-2. run, data check
    run = open_run(config, workdir)
    train_files = data_files(config.data, run.workdir, "train_files", "world_files")
    eval_files = data_files(config.data, run.workdir, "eval_files", required=False)
    fields.check_sample(train_files + eval_files, field_map(config.data), skip_malformed=config.data.skip_malformed)

    # ---------------------------------------------------------------- 3. weights
    cfg, init = run.initial_policy()

    # ---------------------------------------------------------------- 4. data
    tokenizer_path, tokenizer = run.tokenizer(cfg, init)
    if uses_chat_template(config.data) and tokenizer.chat_template is None:
        raise chat.ChatTemplateError(
            f"{tokenizer_path}: no chat template (a base model?), but data.messages_field or data.template="
            f"{chat.CHECKPOINT!r} renders records with it; use prompt/response records with data.template='r1_zero' "
            "(or 'raw'), or a checkpoint with a chat template")
    train_indices = eval_indices = None
    if not eval_files and config.data.eval_holdout > 0:
        from r1jax.data.pipeline import holdout_split  # noqa: PLC0415

        train_indices, eval_indices = holdout_split(train_files, int(config.data.eval_holdout), config.seed)
        eval_files = train_files
    stop = StopFlag()  # set by the loop's SIGTERM handler; the data layer polls it while skipping records
    train_iter = iter(make_dataset(config, tokenizer, train_files, train=True, indices=train_indices,
                                   should_stop=stop.requested))

    # ---------------------------------------------------------------- 5. optimizer, state, step
    tx, shardings, update = build_step(config, cfg, run.mesh, run.rules)
    if run.resumed:
        state, restored = run.restore(state_lib.abstract_state(cfg, tx, shardings))
        train_iter.set_state(restored["data"])  # this process's position in the data
    elif init is not None:
        state = state_lib.state_from_params(init.params, tx, config.seed, shardings)
    else:
        state = state_lib.init_state(cfg, tx, config.seed, shardings)

    def step_fn(state):
        host_batch = next(train_iter)  # StopIteration: the data has ended; StopRequested: SIGTERM while searching
        state, metrics = update(state, step_lib.put_batch(host_batch, update.batch_shardings))
        return state, metrics, int(np.count_nonzero(host_batch["segment_ids"]))

    eval_fn = make_eval(config, cfg, tokenizer, eval_files, run.mesh, run.rules, shardings, update,
                        indices=eval_indices) if eval_files else None

    # ---------------------------------------------------------------- 6. loop
    result = run.loop(state, step_fn, meta_fn=lambda: {"model": dataclasses.asdict(cfg), "tokenizer": tokenizer_path},
                      data_state_fn=train_iter.get_state, eval_fn=eval_fn, data_metrics=train_iter.metrics,
                      progress_keys=("loss", "tokens_per_s"), stop_flag=stop)
    return run.finish(result, tokenizer_path)


def field_map(data) -> fields.FieldMap:
    """The record fields the SFT stage reads (text, or messages, or prompt + response + an optional system prompt,
    read from the `system` field unless data.system_field names another)."""
    fmap = fields.FieldMap.from_config(data, "prompt", "response", "messages", "text", system="system")
    return dataclasses.replace(fmap, system=fmap.system or "system")


def uses_chat_template(data) -> bool:
    """Whether records are rendered with the checkpoint's chat template (conversations, or template "checkpoint")."""
    used = field_map(data).used()
    return "text" not in used and ("messages" in used or data.template == chat.CHECKPOINT)


def make_eval(config, cfg, tokenizer, eval_files, mesh, rules, shardings, update, indices=None):
    """eval_fn(params) -> {eval_loss[, eval_mtp_loss]} over data.eval_batches batches of the eval files."""
    eval_step = step_lib.make_eval_step(cfg, mesh=mesh, rules=rules, param_shardings=shardings.params)

    def eval_fn(params):
        totals: dict[str, float] = {}
        batches = iter(make_dataset(config, tokenizer, eval_files, train=False, indices=indices))
        for _, host_batch in zip(range(config.data.eval_batches), batches):
            sums = eval_step(params, step_lib.put_batch(host_batch, update.batch_shardings))
            for k, v in jax.device_get(sums).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        if not totals:
            return {}
        out = {"eval_loss": totals["ce_sum"] / max(totals["ce_tokens"], 1.0)}
        if "mtp_sum" in totals:
            out["eval_mtp_loss"] = totals["mtp_sum"] / max(totals["mtp_tokens"], 1.0)
        return out

    return eval_fn


def build_step(config, cfg: models.ModelConfig, mesh, rules):
    """(optimizer, state shardings, jitted train step) for `config` and model `cfg`."""
    tx, schedule = opt_lib.make_optimizer(config.optimizer, cfg, int(config.train.steps))
    shardings = state_lib.state_shardings(cfg, tx, mesh, rules)
    batch_shape = (int(config.data.batch_size), int(config.data.seq_len))
    step_fn = step_lib.make_train_step(cfg, tx, schedule, micro_batches=config.train.micro_batches, mesh=mesh,
                                       rules=rules, shardings=shardings, batch_shape=batch_shape)
    return tx, shardings, step_fn


def make_dataset(config, tokenizer, files: list[str], *, train: bool, indices=None, should_stop=None):
    """The packed batch dataset of this host (its share of the global batch); `indices`: the records of `files`
    to use (a holdout_split part), default all."""
    from r1jax.data.pipeline import make_sft_dataset

    data = config.data
    n_proc = jax.process_count()
    if data.batch_size % n_proc:
        raise ValueError(f"data.batch_size={data.batch_size} is not divisible by the {n_proc} processes")
    fmap = field_map(data)
    encode_messages = functools.partial(chat.encode_chat_sft, tokenizer) if uses_chat_template(data) else None
    return make_sft_dataset(
        files, tokenizer, seq_len=data.seq_len, batch_size=data.batch_size // n_proc, seed=config.seed,
        shuffle=data.shuffle and train, num_epochs=data.num_epochs if train else 1,
        process_index=jax.process_index(), process_count=n_proc, prompt_field=fmap.prompt,
        response_field=fmap.response, system_field=fmap.system, text_field=fmap.text, messages_field=fmap.messages,
        encode_messages=encode_messages, template=data.template, skip_malformed=data.skip_malformed, pack=data.pack,
        indices=indices, should_stop=should_stop, max_skips_in_a_row=int(data.get("max_skips_in_a_row", 10_000)))


def smoke_step(config) -> dict:
    """Builds the config's model and runs one train step on a random batch of the config's shape (no files,
    no checkpoint): the check every stage offers to tests/test_configs.py. Returns the step's metrics."""
    mesh, rules = mesh_and_rules(config.mesh)
    cfg = model_config(config.model)
    tx, shardings, step_fn = build_step(config, cfg, mesh, rules)
    state = state_lib.init_state(cfg, tx, config.seed, shardings)
    batch = step_lib.random_batch(cfg.vocab_size, int(config.data.batch_size), int(config.data.seq_len), config.seed)
    _, metrics = step_fn(state, step_lib.put_batch(batch, step_fn.batch_shardings))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
