"""The train state (a pytree) and its shardings.

    TrainState(step, params, opt_state, rng)

`params` are the fp32 master weights; the forward casts them to `ModelConfig.dtype` per block.
Optimizer moments take their parameter's sharding; the optimizer's scalars
(step counts) and the rng are replicated. `rng` is a raw uint32 key so it checkpoints as plain data.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import models


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]

    def replace(self, **kw) -> "TrainState":
        return dataclasses.replace(self, **kw)


def state_shardings(cfg: models.ModelConfig, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
    """NamedShardings for every leaf of the TrainState: params by the model's logical axes."""
    replicated = NamedSharding(mesh, P())
    params = models.param_shardings(cfg, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, models.abstract_params(cfg))
    return TrainState(step=replicated, params=params, opt_state=_like_params(abstract_opt, params, replicated),
                      rng=replicated)


def _like_params(opt_state, param_shardings, default):
    """Optimizer-state leaves that mirror a parameter (Adam's mu, nu: the trailing dict keys of the leaf's
    path are the parameter's path) take its sharding; all others (counts, scalars) get `default`."""
    by_path = {tuple(k.key for k in path): sharding
               for path, sharding in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

    def pick(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(k.key)
        return by_path.get(tuple(reversed(keys)), default) if leaf.ndim else default

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def abstract_state(cfg: models.ModelConfig, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the TrainState; allocates nothing. Used to restore checkpoints."""
    shapes = jax.eval_shape(functools.partial(_fresh, cfg, tx), jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _fresh(cfg, tx, rng) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = models.init(cfg, init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng)


def init_state(cfg: models.ModelConfig, tx, seed: int, shardings: TrainState) -> TrainState:
    """A fresh state, created directly in its sharded layout (no host copy of the full params)."""
    fresh = jax.jit(functools.partial(_fresh, cfg, tx), out_shardings=shardings)
    return fresh(jax.random.PRNGKey(seed))


def state_from_params(params, tx, seed: int, shardings: TrainState) -> TrainState:
    """A state whose params are given (init_from a checkpoint): fresh optimizer state, step 0."""

    def make(params, rng):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    _, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    return jax.jit(make, out_shardings=shardings, donate_argnums=0)(params, state_rng)
