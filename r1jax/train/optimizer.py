"""AdamW with warmup + decay, global-norm clipping, and the router bias kept out of the optimizer.

Configured by a `config.optimizer` block (see configs/common.py):
  lr, warmup_steps (or warmup_ratio > 0: that share of train.steps, as transformers' warmup_ratio, so a preset's
  warmup follows an overridden train.steps), schedule ("cosine" | "linear" | "constant"), end_lr_ratio, b1, b2,
  eps, weight_decay, clip_norm (0 = off), moment_dtype ("float32" | "bfloat16": the dtype AdamW's two moments are
  stored in between steps; DeepSeek-V3 keeps them in BF16 without observable degradation, docs/reference.md §5;
  the update itself computes in fp32).

Two masks come from the model's single parameter declaration:
  * `models.trainable_mask` - the aux-loss-free router bias (DeepSeek-V3 §2.1.2) is moved by its own
    sign rule inside the train step, never by a gradient, so its partition gets `set_to_zero`.
  * weight decay only on leaves initialised from a normal distribution (matrices); norms ("ones") and
    biases ("zeros") are not decayed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from r1jax import models
from r1jax.models.transformer import ParamSpec

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(opt, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `opt.lr` over `opt.warmup_steps` (or ceil(warmup_ratio x total_steps), transformers'
    rule, when warmup_ratio > 0), then decay to `lr * end_lr_ratio` at total_steps."""
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={opt.schedule!r}: expected one of {SCHEDULES}")
    ratio = float(getattr(opt, "warmup_ratio", 0.0) or 0.0)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"optimizer.warmup_ratio={ratio} must be in [0, 1)")
    warmup = math.ceil(ratio * total_steps) if ratio else int(opt.warmup_steps)
    if not 0 <= warmup <= total_steps:
        raise ValueError(f"optimizer.warmup_steps={warmup} must be in [0, train.steps={total_steps}]")
    peak, end = float(opt.lr), float(opt.lr) * float(opt.end_lr_ratio)
    decay_steps = max(total_steps - warmup, 1)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(opt.end_lr_ratio))
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(cfg: models.ModelConfig):
    """True where weight decay applies: leaves declared with the normal initializer (the matrices)."""
    return jax.tree.map(lambda s: s.init == "normal", models.param_specs(cfg),
                        is_leaf=lambda x: isinstance(x, ParamSpec))


def stored_in(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """tx with its floating-point state kept in `dtype` between updates: each update takes the state back to
    fp32, runs tx, and stores the new state in `dtype` (integer leaves, such as step counts, are left alone)."""
    def cast(state, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(lambda params: cast(tx.init(params), dtype), update)


def make_optimizer(opt, cfg: models.ModelConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation over the full param tree, learning-rate schedule)."""
    schedule = make_schedule(opt, total_steps)
    parts = []
    if float(opt.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
    adamw = optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                        weight_decay=float(opt.weight_decay), mask=weight_decay_mask(cfg))
    moments = getattr(opt, "moment_dtype", "float32") or "float32"
    if moments not in ("float32", "bfloat16"):
        raise ValueError(f"optimizer.moment_dtype={moments!r}: expected 'float32' or 'bfloat16'")
    parts.append(adamw if moments == "float32" else stored_in(adamw, jnp.bfloat16))
    labels = jax.tree.map(lambda trainable: "train" if trainable else "frozen",
                          models.trainable_mask(models.abstract_params(cfg)))
    tx = optax.multi_transform({"train": optax.chain(*parts), "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
