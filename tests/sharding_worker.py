"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_sharding.py): sharded vs unsharded.

For each mesh shape, params and batch are placed with the config's logical rules, forward logits and gradients of
a next-token loss are computed with activation constraints active, and compared with a single-device run.
Prints one JSON line per mesh with the max differences."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from r1jax import models as M
from r1jax import sharding as S

jax.config.update("jax_default_matmul_precision", "highest")


def loss_fn(params, tokens, cfg):
    logits, aux = M.forward(params, tokens, cfg)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    return nll + aux["aux_loss"], logits


def main(preset, meshes):
    assert jax.device_count() == 8, jax.device_count()
    base = M.get_preset(preset)
    cfg = base.replace(aux_loss_alpha=0.01, n_layers=3, n_dense_layers=1 if base.is_moe else 3)
    params = M.init(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, cfg.vocab_size)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(p, t, cfg), has_aux=True))
    (ref_loss, ref_logits), ref_grads = grad_fn(params, tokens)
    for ici in meshes:
        mesh = S.make_mesh(ici)
        rules = S.DEFAULT_RULES
        p_shard = M.param_shardings(cfg, mesh, rules)
        batch_shard = NamedSharding(mesh, S.logical_to_spec(("act_batch", None), rules, mesh))
        p = jax.device_put(params, p_shard)
        t = jax.device_put(tokens, batch_shard)
        with S.use_rules(mesh, rules):
            step = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(p, t, cfg), has_aux=True),
                           in_shardings=(p_shard, batch_shard))
            (loss, logits), grads = step(p, t)
        gdiff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
        sharded_leaves = sum(1 for x in jax.tree.leaves(p) if not x.sharding.is_fully_replicated)
        print(json.dumps({"mesh": ici, "loss": abs(float(loss - ref_loss)), "logits": float(jnp.abs(logits - ref_logits).max()),
                          "grads": gdiff, "sharded_leaves": sharded_leaves}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [json.loads(m) for m in sys.argv[2:]])
