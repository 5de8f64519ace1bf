"""The SFT stage: pretraining, cold start, the 800k SFT and distillation all run this code.

    python -m r1jax.main --config configs/sft.py:tiny --workdir /tmp/sft

The only differences between those uses are data in the config: the files, the prompt/response fields
(or `text_field` for pretraining, which trains every token), the model preset and where its weights come
from (`init_from`). One straight flow:

  1. mesh + model config        config.mesh, config.model (the resumed checkpoint's model wins on resume)
  2. weights                    resume WORKDIR/checkpoints, else config.init_from (r1jax run or HF dir),
                                else a fresh init
  3. data                       tokenizer, train / eval datasets (tiny world generated on demand)
  4. optimizer + state + step   AdamW (router bias excluded), sharded, donated, one jitted update per step
  5. loop                       metrics.jsonl, TensorBoard, progress bar, eval, checkpoints, SIGTERM, NaN guard

Outputs (StageResult.outputs): checkpoint (the final step dir), tokenizer, metrics (metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil

import jax

from r1jax import models
from r1jax.stages.common import StageResult, is_primary, mesh_and_rules, model_config, write_json
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import optimizer as opt_lib
from r1jax.train import state as state_lib
from r1jax.train import step as step_lib
from r1jax.train.loop import train_loop
from r1jax.train.metrics import MetricsLogger, read_metrics

log = logging.getLogger(__name__)

# ModelConfig fields that describe training numerics, not the architecture: an HF checkpoint brings its
# architecture, the config brings these.
TRAINING_FIELDS = ("dtype", "param_dtype", "remat", "bias_update_rate", "aux_loss_alpha", "mtp_loss_weight",
                   "moe_impl", "moe_tile", "init_std")


def run(config, workdir: str) -> StageResult:
    # ---------------------------------------------------------------- 1. mesh, model, checkpoints
    workdir, mesh, rules, cfg, checkpointer, resume_step, resume_meta = start_run(config, workdir)

    # ---------------------------------------------------------------- 2. weights (params only; state below)
    cfg, init_params, init_meta = initial_weights(config, cfg, resume_meta, mesh, rules)

    # ---------------------------------------------------------------- 3. data
    tokenizer_path, tokenizer = stage_tokenizer(config, workdir, resume_meta, init_meta, cfg)
    train_files, eval_files = resolve_files(config, workdir)
    train_iter = iter(make_dataset(config, tokenizer, train_files, train=True))

    # ---------------------------------------------------------------- 4. optimizer, state, step
    steps = int(config.train.steps)
    tx, shardings, step_fn = build_step(config, cfg, mesh, rules)
    if resume_meta is not None:
        state, restored = checkpointer.restore(resume_step, state_lib.abstract_state(cfg, tx, shardings))
        train_iter.set_state(restored["data"])  # this process's position in the data
    elif init_params is not None:
        state = state_lib.state_from_params(init_params, tx, config.seed, shardings)
    else:
        state = state_lib.init_state(cfg, tx, config.seed, shardings)

    def put_batch(host_batch):
        return step_lib.put_batch(host_batch, step_fn.batch_shardings)

    eval_fn = None
    if eval_files:
        eval_step = step_lib.make_eval_step(cfg, mesh=mesh, rules=rules, param_shardings=shardings.params)

        def eval_fn(params):
            totals: dict[str, float] = {}
            batches = iter(make_dataset(config, tokenizer, eval_files, train=False))
            for _, host_batch in zip(range(config.data.eval_batches), batches):
                for k, v in jax.device_get(eval_step(params, put_batch(host_batch))).items():
                    totals[k] = totals.get(k, 0.0) + float(v)
            if not totals:
                return {}
            out = {"eval_loss": totals["ce_sum"] / max(totals["ce_tokens"], 1.0)}
            if "mtp_sum" in totals:
                out["eval_mtp_loss"] = totals["mtp_sum"] / max(totals["mtp_tokens"], 1.0)
            return out

    def meta_fn():
        return {"stage": "sft", "model": dataclasses.asdict(cfg), "tokenizer": tokenizer_path}

    # ---------------------------------------------------------------- 5. loop
    start_step = int(jax.device_get(state.step))
    logger = MetricsLogger(workdir, total_steps=steps, start_step=start_step, enabled=is_primary(),
                           progress=config.train.progress, desc=os.path.basename(workdir) or "sft")
    result = train_loop(state, step_fn, train_iter, put_batch, steps=steps, checkpointer=checkpointer,
                        logger=logger, meta_fn=meta_fn, data_state_fn=train_iter.get_state,
                        log_every=config.train.log_every,
                        checkpoint_every=config.train.checkpoint_every, eval_every=config.train.eval_every,
                        eval_fn=eval_fn, data_metrics=train_iter.metrics)
    return finish_run("sft", workdir, checkpointer, logger, result.checkpoint_step, result.status, result.metrics,
                      tokenizer_path)


# ------------------------------------------------------------------------------------------ helpers

def build_step(config, cfg: models.ModelConfig, mesh, rules):
    """(optimizer, state shardings, jitted train step) for `config` and model `cfg`."""
    tx, schedule = opt_lib.make_optimizer(config.optimizer, cfg, int(config.train.steps))
    shardings = state_lib.state_shardings(cfg, tx, mesh, rules)
    batch_shape = (int(config.data.batch_size), int(config.data.seq_len))
    step_fn = step_lib.make_train_step(cfg, tx, schedule, micro_batches=config.train.micro_batches, mesh=mesh,
                                       rules=rules, shardings=shardings, batch_shape=batch_shape)
    return tx, shardings, step_fn


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



def start_run(config, workdir: str):
    """What every training stage does first: (absolute workdir, created; mesh; rules; the configured
    ModelConfig; the Checkpointer of WORKDIR/checkpoints; its latest step; that step's meta), the last two
    None when the run has not saved yet."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh, rules = mesh_and_rules(config.mesh)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.train.keep_checkpoints,
                                         async_save=config.train.async_checkpoints)
    resume_step = checkpointer.latest_step()
    resume_meta = checkpointer.restore_meta(resume_step) if resume_step is not None else None
    return workdir, mesh, rules, model_config(config.model), checkpointer, resume_step, resume_meta


def finish_run(stage: str, workdir: str, checkpointer, logger, saved_step, status: str, metrics: dict,
               tokenizer_path: str) -> StageResult:
    """What every training stage does last: close the checkpointer and return the StageResult (the final
    checkpoint, tokenizer, metrics.jsonl). `metrics` empty (nothing left to train on a rerun of a finished
    run): the run's last logged record."""
    checkpointer.close()
    if not metrics and os.path.exists(logger.path):
        records = read_metrics(logger.path)
        metrics = records[-1] if records else {}
    checkpoint = checkpointer.step_dir(saved_step) if saved_step is not None else None
    return StageResult(stage=stage, workdir=workdir, status=status, checkpoint=checkpoint,
                       outputs={"checkpoint": checkpoint, "tokenizer": tokenizer_path, "metrics": logger.path},
                       metrics=metrics)


def initial_weights(config, cfg: models.ModelConfig, resume_meta, mesh, rules):
    """(cfg, init_params, init_meta): a resumed run keeps its saved architecture (its params come with its
    checkpoint); else config.init_from's weights and architecture; else (cfg, None, {}) for a fresh init."""
    if resume_meta is not None:
        log.info("resuming from the run's own checkpoint")
        return models.ModelConfig(**resume_meta["model"]), None, {}
    if config.init_from:
        cfg, params, meta = load_init(config.init_from, cfg, mesh, rules)
        log.info("initialised from %s", config.init_from)
        return cfg, params, meta
    return cfg, None, {}


def load_init(path: str, cfg: models.ModelConfig, mesh, rules):
    """(cfg, params, meta) from an r1jax checkpoint (the config's architecture) or an HF directory (its own
    architecture from config.json, with the config's TRAINING_FIELDS: dtype, remat, bias rate, ...)."""
    if ckpt_lib.find_checkpoint(path) is not None:
        params, meta = ckpt_lib.load_params(path, cfg, models.param_shardings(cfg, mesh, rules))
        return cfg, params, meta
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"config.init_from={path!r}: neither an r1jax checkpoint (run dir, checkpoints/ or "
                                "step dir) nor a Hugging Face directory (config.json + *.safetensors)")
    from r1jax import hf

    hf_cfg, params = hf.load_hf_checkpoint(path, dtype=cfg.param_dtype, mesh=mesh, rules=rules)
    cfg = hf_cfg.replace(**{name: getattr(cfg, name) for name in TRAINING_FIELDS})
    return cfg, params, {"tokenizer": path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None}


def stage_tokenizer(config, workdir: str, resume_meta, init_meta, cfg: models.ModelConfig):
    """(path, tokenizer) of the run (resolve_tokenizer's choice), checked to fit the model's vocabulary."""
    from r1jax.data.tokenizer import load_tokenizer

    path = resolve_tokenizer(config, workdir, resume_meta, init_meta)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{cfg.vocab_size}; set config.model.overrides.vocab_size")
    return path, tokenizer


def resolve_tokenizer(config, workdir: str, resume_meta, init_meta) -> str:
    """config.data.tokenizer, else the resumed run's, else init_from's, else (tiny world) train one."""
    for candidate in (config.data.tokenizer, (resume_meta or {}).get("tokenizer"), init_meta.get("tokenizer")):
        if candidate:
            return candidate
    if not config.data.tiny_world:
        raise ValueError("no tokenizer: set config.data.tokenizer (a SentencePiece .model or an HF tokenizer dir)")
    world = ensure_world(workdir, config.data.world_seed)
    prefix = os.path.join(world, "tokenizer")
    if not os.path.isfile(prefix + ".model"):
        train_world_tokenizer(world, prefix, model_config(config.model).vocab_size)
    return prefix + ".model"


def ensure_world(workdir: str, seed: int) -> str:
    """WORKDIR/world: the tiny synthetic world, written once (into a temporary dir, then renamed)."""
    world = os.path.join(workdir, "world")
    if not os.path.isfile(os.path.join(world, "manifest.json")):
        from r1jax.data.synthetic import write_world

        tmp = f"{world}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_world(tmp, seed)
        shutil.rmtree(world, ignore_errors=True)
        os.replace(tmp, world)
    return world


def train_world_tokenizer(world: str, prefix: str, vocab_size: int) -> str:
    """A SentencePiece model over every text field of the world, so all stages share one tokenizer."""
    from r1jax.data import tokenizer as tok_lib

    files = sorted(os.path.join(world, n) for n in os.listdir(world) if n.endswith(".jsonl"))
    texts = list(tok_lib.texts_from_files(files, ["text", "prompt", "response", "chosen", "rejected"]))
    tmp = f"{prefix}.tmp{os.getpid()}"
    tok_lib.train_sentencepiece(texts, tmp, vocab_size)
    for ext in (".vocab", ".model"):
        os.replace(tmp + ext, prefix + ext)
    return prefix + ".model"


def resolve_files(config, workdir: str) -> tuple[list[str], list[str]]:
    """(train files, eval files): the config's, or the tiny world's; eval_holdout splits off an eval set."""
    data = config.data
    train_files, eval_files = list(data.train_files), list(data.eval_files)
    if not train_files:
        if not data.tiny_world:
            raise ValueError("config.data.train_files is empty (set it, or data.tiny_world=True at tiny scale)")
        world = ensure_world(workdir, data.world_seed)
        train_files = [os.path.join(world, f"{name}.jsonl") for name in data.world_files]
    if not eval_files and data.eval_holdout > 0:
        train_files, eval_files = holdout_split(train_files, os.path.join(workdir, "data"), data.eval_holdout,
                                                config.seed)
    return train_files, eval_files


def holdout_split(files: list[str], out_dir: str, n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle the records of `files` (seeded) and write the first n_eval to eval.jsonl, the rest to
    train.jsonl under out_dir; redone only when the inputs change. For small datasets: it reads every record."""
    train_path, eval_path = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "eval.jsonl")
    spec_path = os.path.join(out_dir, "split.json")
    spec = {"files": [os.path.abspath(f) for f in files], "n_eval": n_eval, "seed": seed}
    if not (os.path.isfile(spec_path) and json.load(open(spec_path)) == spec):
        from r1jax.data.sources import iterate_records

        records = list(iterate_records(files))
        if n_eval >= len(records):
            raise ValueError(f"data.eval_holdout={n_eval} but {files} hold only {len(records)} records")
        random.Random(seed).shuffle(records)
        os.makedirs(out_dir, exist_ok=True)
        for path, part in ((eval_path, records[:n_eval]), (train_path, records[n_eval:])):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
            os.replace(path + ".tmp", path)
        write_json(spec_path, spec)
    return [train_path], [eval_path]


def make_dataset(config, tokenizer, files: list[str], *, train: bool):
    """The packed batch dataset of this host (its share of the global batch)."""
    from r1jax.data.pipeline import make_sft_dataset

    data = config.data
    n_proc = jax.process_count()
    if data.batch_size % n_proc:
        raise ValueError(f"data.batch_size={data.batch_size} is not divisible by the {n_proc} processes")
    return make_sft_dataset(
        files, tokenizer, seq_len=data.seq_len, batch_size=data.batch_size // n_proc, seed=config.seed,
        shuffle=data.shuffle and train, num_epochs=data.num_epochs if train else 1,
        process_index=jax.process_index(), process_count=n_proc, prompt_field=data.prompt_field,
        response_field=data.response_field, text_field=data.text_field, template=data.template,
        skip_malformed=data.skip_malformed, pack=data.pack)
