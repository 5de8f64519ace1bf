"""The SFT loss and the jitted train / eval steps.

Batches follow the packing contract (r1jax/data/packing.py): inputs, targets, loss_mask, segment_ids,
positions, all [B, T]. Several documents may share a row; `segment_ids` keep their attention apart and
`positions` restart per document, so a packed row trains exactly like its documents unpacked.

Loss of one optimizer step over the global batch (B rows, split into M micro-batches):

    L = sum_t m_t CE_t / sum_t m_t                               next-token cross-entropy, mean over
                                                                 the loss_mask tokens of the whole batch
      + w_mtp * sum_t m'_t CE'_t / sum_t m'_t                    DeepSeek-V3 MTP (eq. 24-25), depth 1
      + aux_loss                                                 sequence-wise balance loss (x alpha)

CE'_t is the MTP head at t predicting token t+2 (= targets[t+1]); m'_t = m_t * m_{t+1} * [seg_t == seg_{t+1}]:
both predictions are trained and t+1 is in t's document. The denominators are counted over the whole
batch before the micro-batch scan, so accumulating M micro-batches gives the same gradient as one big
batch, and one call is one optimizer update. After the update the router's selection bias moves by
`update_router_bias` (not a gradient; rate = ModelConfig.bias_update_rate, 0 = frozen).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import models
from r1jax.sharding import logical_to_spec, use_rules
from r1jax.train.state import TrainState

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def mtp_targets(batch):
    """(targets [B,T], mask [B,T]) for MTP logits at t, which predict token t+2 = targets[t+1]."""
    targets, mask, seg = batch["targets"], batch["loss_mask"].astype(jnp.float32), batch["segment_ids"]
    shifted = jnp.concatenate([targets[:, 1:], jnp.zeros_like(targets[:, :1])], axis=1)
    valid = mask[:, :-1] * mask[:, 1:] * (seg[:, :-1] == seg[:, 1:])
    return shifted, jnp.concatenate([valid, jnp.zeros_like(mask[:, :1])], axis=1)


def loss_sums(params, batch, cfg: models.ModelConfig) -> dict[str, jax.Array]:
    """Un-normalised loss terms of one (micro-)batch: sums and token counts, plus aux_loss and expert_load."""
    h, aux = models.hidden_states(params, batch["inputs"], cfg, positions=batch["positions"],
                                  segment_ids=batch["segment_ids"], mtp=True)
    mask = batch["loss_mask"].astype(jnp.float32)
    out = {
        "ce_sum": -jnp.sum(models.token_logprobs(params, h, batch["targets"], cfg)[0] * mask),
        "ce_tokens": jnp.sum(mask),
        "aux_loss": aux["aux_loss"],
    }
    if "mtp_hidden" in aux:
        mtp_tgt, mtp_mask = mtp_targets(batch)
        out["mtp_sum"] = -jnp.sum(models.token_logprobs(params, aux["mtp_hidden"], mtp_tgt, cfg)[0] * mtp_mask)
        out["mtp_tokens"] = jnp.sum(mtp_mask)
    if "expert_load" in aux:
        out["expert_load"] = aux["expert_load"]
    return out


def _split_micro(batch, n_micro: int):
    """[B,T] -> [M, B/M, T], micro-batch m = rows m, m+M, m+2M, ... so each keeps the batch's sharding."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // n_micro, n_micro, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def batch_sharding(mesh, rules, shape) -> NamedSharding:
    """Rows over the data-parallel axes (the `act_batch` rule), tokens unsharded."""
    return NamedSharding(mesh, logical_to_spec(("act_batch", None), rules, mesh, shape, "batch"))


def put_batch(host_batch, shardings):
    """Host numpy batch (this process's rows) -> global arrays laid out by `shardings` (dict per key)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], host_batch[k]) for k in BATCH_KEYS}


def random_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A packed batch of random documents (2 per row, every target trained) for smoke tests."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab_size, (batch, seq_len), dtype=np.int32)
    split = seq_len // 3
    segment_ids = np.where(np.arange(seq_len) < split, 1, 2).astype(np.int32)[None].repeat(batch, 0)
    positions = np.where(np.arange(seq_len) < split, np.arange(seq_len), np.arange(seq_len) - split)
    targets = np.concatenate([inputs[:, 1:], inputs[:, :1]], axis=1)
    loss_mask = (segment_ids == np.concatenate([segment_ids[:, 1:], np.zeros_like(segment_ids[:, :1])], 1))
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask.astype(np.float32),
            "segment_ids": segment_ids, "positions": positions.astype(np.int32)[None].repeat(batch, 0)}


def make_train_step(cfg: models.ModelConfig, tx: optax.GradientTransformation, schedule, *, micro_batches: int,
                    mesh, rules, shardings: TrainState, batch_shape: tuple[int, int]) -> Callable:
    """A jitted `step(state, batch) -> (state, metrics)`; the state is donated and keeps its shardings."""
    n_micro = int(micro_batches)
    if batch_shape[0] % n_micro:
        raise ValueError(f"batch size {batch_shape[0]} is not divisible by train.micro_batches={n_micro}")
    data = batch_sharding(mesh, rules, (batch_shape[0] // n_micro, batch_shape[1]))  # checks divisibility
    mtp_weight = cfg.mtp_loss_weight if cfg.mtp_depth else 0.0

    def step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
        mask = batch["loss_mask"].astype(jnp.float32)
        ce_tokens = jnp.maximum(jnp.sum(mask), 1.0)
        mtp_tokens = jnp.maximum(jnp.sum(mtp_targets(batch)[1]), 1.0)

        def micro_loss(params, micro):
            sums = loss_sums(params, micro, cfg)
            loss = sums["ce_sum"] / ce_tokens + sums["aux_loss"] / n_micro
            if "mtp_sum" in sums:
                loss = loss + mtp_weight * sums["mtp_sum"] / mtp_tokens
            return loss, sums

        def grad_fn(params, micro):  # gradients laid out like the params (reduce-scattered, not all-reduced)
            (loss, sums), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, micro)
            return (loss, sums), jax.lax.with_sharding_constraint(grads, shardings.params)

        if n_micro == 1:
            (loss, sums), grads = grad_fn(state.params, batch)
        else:
            def body(carry, micro):
                loss_acc, grads_acc, sums_acc = carry
                (loss, sums), grads = grad_fn(state.params, micro)
                add = lambda a, b: a + b  # noqa: E731
                return (loss_acc + loss, jax.tree.map(add, grads_acc, grads), jax.tree.map(add, sums_acc, sums)), None

            micro = _split_micro(batch, n_micro)
            first = jax.tree.map(lambda x: x[0], micro)
            zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: loss_sums(state.params, first, cfg)))
            zero_grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, state.params), shardings.params)
            init = (jnp.zeros((), jnp.float32), zero_grads, zero_sums)
            (loss, grads, sums), _ = jax.lax.scan(body, init, micro)
            sums = {**sums, "aux_loss": sums["aux_loss"] / n_micro}
            if "expert_load" in sums:
                sums["expert_load"] = sums["expert_load"] / n_micro

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if "expert_load" in sums:
            params = models.update_router_bias(params, sums["expert_load"], cfg.bias_update_rate)
        metrics = {
            "loss": loss,
            "ce_loss": sums["ce_sum"] / ce_tokens,
            "aux_loss": sums["aux_loss"],
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "trained_tokens": jnp.sum(mask),
        }
        if "mtp_sum" in sums:
            metrics["mtp_loss"] = sums["mtp_sum"] / mtp_tokens
        if "expert_load" in sums:
            # max/mean load over experts, worst MoE layer: 1.0 = perfectly balanced.
            load = sums["expert_load"]
            metrics["max_expert_load"] = jnp.max(load.max(-1) / jnp.maximum(load.mean(-1), 1e-9))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    batch_shardings = {k: NamedSharding(mesh, data.spec) for k in BATCH_KEYS}
    jitted = jax.jit(step, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated),
                     donate_argnums=0)

    def run(state, batch):
        with use_rules(mesh, rules):
            return jitted(state, batch)

    run.batch_shardings = batch_shardings
    run.jitted = jitted
    return run


def make_eval_step(cfg: models.ModelConfig, *, mesh, rules, param_shardings) -> Callable:
    """A jitted `eval_step(params, batch) -> {ce_sum, ce_tokens[, mtp_sum, mtp_tokens]}` (sums; no update)."""
    replicated = NamedSharding(mesh, P())

    def sums(params, batch):
        out = loss_sums(params, batch, cfg)
        out.pop("expert_load", None)
        out.pop("aux_loss")
        return out

    jitted = jax.jit(sums, in_shardings=(param_shardings, None), out_shardings=replicated)

    def run(params, batch):
        with use_rules(mesh, rules):
            return jitted(params, batch)

    return run
