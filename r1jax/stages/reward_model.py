"""The reward-model stage: a decoder with a scalar head trained on preference pairs (Bradley-Terry).

    python -m r1jax.main --config configs/reward_model.py:tiny --workdir /tmp/rm

R1's all-scenario RL (docs/reference.md §4.5) uses reward models for general prompts: helpfulness judged on the final
summary only, harmlessness on the whole response. One run trains one aspect (config.rm.aspect); the pairs whose
`kind` field equals it are used (config.rm.kinds widens that). r1jax/rl/reward_model.py holds the model, the loss
and the rewards that load the result. One straight flow:

  1. run              WORKDIR, mesh, checkpoints, resume point (r1jax/train/run.py); the preference records
                      are read and checked here (file:line of a bad one), before any weight is loaded
  2. weights          resume WORKDIR/checkpoints, else config.init_from (r1jax run, HF dir or a Hub id in the
                      local HF cache) + a zero head, else a fresh init
  3. data             preference pairs -> (chosen, rejected) token rows: template(question) + scored part
  4. step             jitted Bradley-Terry update over [2B, T] rows (chosen then rejected); router bias frozen
  5. loop             r1jax/train/loop.py; batches are a pure function of the step (seeded permutation per
                      epoch), so a resume replays exactly; eval = pairwise accuracy on the held-out pairs,
                      overall and per `subkind` of the pairs that have one (heldout_pair_accuracy/<subkind>)

Outputs: checkpoint (its meta names the aspect, template and max_len, so `reward_model.load` needs nothing
else), tokenizer, metrics. Final metrics include heldout_pair_accuracy.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import models
from r1jax.data.sources import iterate_records
from r1jax.rl import reward_model as rm_lib
from r1jax.sharding import use_rules
from r1jax.train import optimizer as opt_lib
from r1jax.train import state as state_lib
from r1jax.train.run import StageResult, data_files, mesh_and_rules, model_config, open_run
from r1jax.train.state import TrainState

log = logging.getLogger(__name__)
PAIR_SCHEMA = {"chosen": "str", "rejected": "str"}


def run(config, workdir: str) -> StageResult:
    rm = config.rm

    # ---------------------------------------------------------------- 1-2. run, records, weights (the decoder's)
    run = open_run(config, workdir)
    # the records first: a missing or wrong-typed field fails with file:line before any weight is loaded
    train_pairs = load_pairs(config, data_files(config.data, run.workdir, "train_files", "world_files"))
    eval_files = data_files(config.data, run.workdir, "eval_files", "eval_world_files", required=False)
    heldout_pairs = load_pairs(config, eval_files) if eval_files else None
    cfg, init = run.initial_policy()

    # ---------------------------------------------------------------- 3. data
    tokenizer_path, tokenizer = run.tokenizer(cfg, init)
    train = encode_pairs(train_pairs, tokenizer, config)
    heldout = encode_pairs(heldout_pairs, tokenizer, config) if heldout_pairs else None
    log.info("%d training pairs, %d held-out pairs (aspect %s)", len(train.chosen),
             0 if heldout is None else len(heldout.chosen), rm.aspect)

    # ---------------------------------------------------------------- 4. optimizer, state, step
    tx = make_optimizer(config.optimizer, cfg, int(config.train.steps))
    shardings = rm_state_shardings(cfg, tx, run.mesh, run.rules)
    if run.resumed:
        state, _ = run.restore(abstract_rm_state(cfg, tx, shardings))
    else:
        state = init_rm_state(cfg, tx, config.seed, shardings, float(rm.likelihood_init),
                              init.params if init is not None else None)
    update, score_fn = make_steps(cfg, tx, run.mesh, run.rules, shardings)
    batch_size, seq_len = int(config.data.batch_size), int(config.data.seq_len)

    counter = itertools.count(int(jax.device_get(state.step)))  # the step on the host: no device sync per step

    def step_fn(state):  # the batch is a pure function of the step: a resume replays exactly
        step = next(counter)
        batch = train.batch(train.rows_for_step(step, batch_size, config.seed), batch_size, tokenizer.pad_id, seq_len)
        state, metrics = update(state, batch["tokens"], batch["lengths"], batch["starts"])
        return state, {**metrics, "epoch": step * batch_size // len(train.chosen)}, int(batch["lengths"].sum())

    def evaluate(params) -> dict[str, float]:
        margins = []
        for i in range(0, len(heldout.chosen), batch_size):
            batch = heldout.batch(range(i, min(i + batch_size, len(heldout.chosen))), batch_size, tokenizer.pad_id,
                                  seq_len)
            s = np.asarray(score_fn(params, batch["tokens"], batch["lengths"], batch["starts"]))
            n = batch["n"]
            margins.append(s[:n] - s[batch_size:batch_size + n])
        margin = np.concatenate(margins)
        subkinds = np.asarray(heldout.subkinds)
        per_subkind = {f"heldout_pair_accuracy/{k}": float(np.mean(margin[subkinds == k] > 0))
                       for k in sorted(set(heldout.subkinds)) if k}
        return {"heldout_pair_accuracy": float(np.mean(margin > 0)), "heldout_margin": float(np.mean(margin)),
                **per_subkind}

    def meta():
        return {"model": dataclasses.asdict(cfg), "tokenizer": tokenizer_path, "aspect": rm.aspect,
                "template": config.data.template, "max_len": int(config.data.seq_len)}

    # ---------------------------------------------------------------- 5. loop
    result = run.loop(state, step_fn, meta_fn=meta, eval_fn=evaluate if heldout is not None else None)
    return run.finish(result, tokenizer_path)


# ------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Pairs:
    """Encoded preference pairs: token lists of the chosen and the rejected side, and where their scored parts
    start."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    chosen_starts: list[int]
    rejected_starts: list[int]
    subkinds: list[str]  # the records' `subkind` ("" without one): held-out accuracy is also reported per subkind

    def rows_for_step(self, step: int, batch_size: int, seed: int) -> list[int]:
        """The pair indices of step `step`: consecutive slices of a seeded permutation per epoch."""
        n = len(self.chosen)
        start = step * batch_size
        out = []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), n)
            order = np.random.default_rng([seed, epoch]).permutation(n)
            out += [int(i) for i in order[offset:offset + batch_size - len(out)]]
        return out

    def batch(self, rows, batch_size: int, pad_id: int, seq_len: int) -> dict:
        """tokens [2B, seq_len] (chosen rows, then rejected rows), lengths and starts [2B]; short batches are
        padded. One shape for every batch: one compile."""
        rows = list(rows)
        both = rows + [rows[-1]] * (batch_size - len(rows))
        tokens, lengths = rm_lib.pad_rows([self.chosen[i] for i in both] + [self.rejected[i] for i in both], pad_id,
                                          bucket=seq_len)
        starts = np.asarray([self.chosen_starts[i] for i in both] + [self.rejected_starts[i] for i in both], np.int32)
        return {"tokens": tokens, "lengths": lengths, "starts": starts, "n": len(rows)}


def load_pairs(config, files: list[str]) -> list[dict]:
    """The records of `files` whose `kind` is in rm.kinds (default: [rm.aspect]); all when they have no kind."""
    kinds = set(config.rm.kinds or (config.rm.aspect,))
    schema = {config.data.prompt_field: "str", **PAIR_SCHEMA}
    records = [r for r in iterate_records(files, schema=schema) if r.get("kind", config.rm.aspect) in kinds]
    if not records:
        raise ValueError(f"no preference pairs of kind {sorted(kinds)} in {files}")
    return records


def encode_pairs(records: list[dict], tokenizer, config) -> Pairs:
    data, aspect = config.data, config.rm.aspect
    encode = lambda response, r: rm_lib.encode(  # noqa: E731
        tokenizer, r[data.prompt_field], response, aspect, data.template, int(data.seq_len))
    chosen, chosen_starts = zip(*[encode(r["chosen"], r) for r in records])
    rejected, rejected_starts = zip(*[encode(r["rejected"], r) for r in records])
    return Pairs(chosen=list(chosen), rejected=list(rejected), chosen_starts=list(chosen_starts),
                 rejected_starts=list(rejected_starts), subkinds=[str(r.get("subkind") or "") for r in records])


# ------------------------------------------------------------------------------------------ state and step


def make_optimizer(opt, cfg: models.ModelConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW as r1jax.train.optimizer (same schedule, decay only on matrices, router bias frozen) over the
    decoder, plus the head (trained, not decayed)."""
    schedule = opt_lib.make_schedule(opt, total_steps)
    parts = [optax.clip_by_global_norm(float(opt.clip_norm))] if float(opt.clip_norm) > 0 else []
    head = rm_lib.abstract_rm_params(cfg)["head"]
    decay = {"decoder": opt_lib.weight_decay_mask(cfg), "head": jax.tree.map(lambda _: False, head)}
    parts.append(optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                             weight_decay=float(opt.weight_decay), mask=decay))
    trainable = models.trainable_mask(models.abstract_params(cfg))
    labels = {"decoder": jax.tree.map(lambda t: "train" if t else "frozen", trainable),
              "head": jax.tree.map(lambda _: "train", head)}
    return optax.multi_transform({"train": optax.chain(*parts), "frozen": optax.set_to_zero()}, labels)


def rm_state_shardings(cfg, tx, mesh, rules) -> TrainState:
    replicated = NamedSharding(mesh, P())
    abstract = rm_lib.abstract_rm_params(cfg)
    params = {"decoder": models.param_shardings(cfg, mesh, rules),
              "head": jax.tree.map(lambda _: replicated, abstract["head"])}
    abstract_opt = jax.eval_shape(tx.init, abstract)
    return TrainState(step=replicated, params=params,
                      opt_state=state_lib._like_params(abstract_opt, params, replicated),  # noqa: SLF001
                      rng=replicated)


def _fresh(cfg, tx, rng, likelihood_init: float = 0.0, decoder=None) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = {"decoder": models.init(cfg, init_rng) if decoder is None else decoder,
              "head": rm_lib.init_head(cfg, likelihood_init)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)


def init_rm_state(cfg, tx, seed: int, shardings: TrainState, likelihood_init: float = 0.0,
                  decoder=None) -> TrainState:
    """A fresh state (decoder from `decoder` when given, e.g. the base model), laid out by `shardings`."""
    rng = jax.random.PRNGKey(seed)
    if decoder is None:
        return jax.jit(lambda r: _fresh(cfg, tx, r, likelihood_init), out_shardings=shardings)(rng)
    return jax.jit(lambda d, r: _fresh(cfg, tx, r, likelihood_init, d), out_shardings=shardings,
                   donate_argnums=0)(decoder, rng)


def abstract_rm_state(cfg, tx, shardings: TrainState) -> TrainState:
    shapes = jax.eval_shape(lambda r: _fresh(cfg, tx, r), jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def make_steps(cfg: models.ModelConfig, tx, mesh, rules, shardings: TrainState):
    """(jitted update(state, tokens [2B, T], lengths [2B], starts [2B]) -> (state, metrics), jitted
    scores(params, tokens, lengths, starts))."""

    def loss_fn(params, tokens, lengths, starts):
        s, aux = rm_lib.scores(params, tokens, lengths, starts, cfg)
        half = tokens.shape[0] // 2
        loss, metrics = rm_lib.bradley_terry(s[:half], s[half:])
        return loss + aux["aux_loss"], {**metrics, "aux_loss": aux["aux_loss"]}

    def update(state: TrainState, tokens, lengths, starts):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, tokens, lengths, starts)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return (TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng),
                {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "w_lp": params["head"]["w_lp"]})

    replicated = NamedSharding(mesh, P())
    jit_update = jax.jit(update, in_shardings=(shardings, replicated, replicated, replicated),
                         out_shardings=(shardings, replicated), donate_argnums=0)
    jit_scores = jax.jit(lambda p, t, n, s: rm_lib.scores(p, t, n, s, cfg)[0],
                         in_shardings=(shardings.params, replicated, replicated, replicated))

    def run_update(state, tokens, lengths, starts):
        with use_rules(mesh, rules):
            return jit_update(state, tokens, lengths, starts)

    def run_scores(params, tokens, lengths, starts):
        with use_rules(mesh, rules):
            return jit_scores(params, tokens, lengths, starts)

    return run_update, run_scores


def smoke_step(config) -> dict:
    """One Bradley-Terry update of the config's model on random token pairs (no files, no checkpoint)."""
    mesh, rules = mesh_and_rules(config.mesh)
    cfg = model_config(config.model)
    tx = make_optimizer(config.optimizer, cfg, int(config.train.steps))
    shardings = rm_state_shardings(cfg, tx, mesh, rules)
    state = init_rm_state(cfg, tx, config.seed, shardings)
    step_fn, _ = make_steps(cfg, tx, mesh, rules, shardings)
    rng = np.random.default_rng(config.seed)
    b, t = int(config.data.batch_size), min(int(config.data.seq_len), 64)
    tokens = rng.integers(0, cfg.vocab_size, (2 * b, t), dtype=np.int32)
    lengths = rng.integers(2, t + 1, (2 * b,)).astype(np.int32)
    _, metrics = step_fn(state, tokens, lengths, lengths // 2)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
