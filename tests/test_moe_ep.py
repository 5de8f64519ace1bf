"""Expert-parallel MoE dispatch (shard_map + all-to-all) equals the single-device dropless dispatch.

The checks run in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax is imported); this
file is also that subprocess (`python tests/test_moe_ep.py`), printing one JSON line per case. On CPU the
exchange is the dense emulation of ragged_all_to_all; the TPU collective itself is compiled by test_aot.py.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import subprocess_env

# (mesh, impl, buffer budget or None, routing): "skewed" sends every token to the experts of one device,
# the worst case the receive buffer is sized for; budgets force several chunks per device.
CASES = [
    ({"expert": 8}, "ragged_dot", None, "random"),
    ({"expert": 8}, "ragged_dot", None, "skewed"),
    ({"expert": 4, "fsdp": 2}, "ragged_dot", 64, "random"),
    ({"expert": 4, "fsdp": 2}, "tiled", None, "skewed"),
    ({"expert": 2, "fsdp": 2, "tensor": 2}, "ragged_dot", 32, "skewed"),
    ({"data": 2, "expert": 2, "tensor": 2}, "tiled", 48, "random"),
]
MODEL_MESHES = [{"expert": 4, "fsdp": 2}, {"expert": 2, "fsdp": 2, "tensor": 2}]
# The Pallas grouped-matmul kernels (moe_impl="gmm", interpret mode here) against the single-device tiled
# dispatch: one mesh with a tensor axis (the psum) and a budget of several chunks, one compile, three routings.
GMM_MESH, GMM_BUDGET, GMM_ROUTINGS = {"expert": 2, "fsdp": 2, "tensor": 2}, 32, ("balanced", "skewed", "empty")


@pytest.fixture(scope="module")
def worker_rows():
    env = subprocess_env(xla_flags="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                         timeout=1200)  # ~3 min on an idle 2-core machine
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_dispatch_ep_matches_dispatch(worker_rows):
    rows = [r for r in worker_rows if r["kind"] == "dispatch"]
    assert len(rows) == len(CASES)
    for r in rows:
        assert r["all_to_all"], r  # the exchange really ran
        assert r["out"] < 1e-6 and r["grads"] < 1e-6, r  # relative to the largest reference value
        if r["budget"]:
            assert r["chunks"] > 1, r


def test_gmm_dispatch_ep_matches_dispatch(worker_rows):
    rows = [r for r in worker_rows if r["kind"] == "dispatch_gmm"]
    assert [r["routing"] for r in rows] == list(GMM_ROUTINGS)
    for r in rows:
        assert r["all_to_all"] and r["pallas_call"] and r["chunks"] > 1, r
        assert r["out"] <= 1e-5 and r["grads"] <= 1e-5, r  # relative to the largest reference value


def test_gmm_per_device_without_ep_matches_dispatch(worker_rows):
    (r,) = [r for r in worker_rows if r["kind"] == "dispatch_gmm_per_device"]
    assert r["shard_map"] and r["pallas_call"], r
    assert r["out"] <= 1e-5 and r["grads"] <= 1e-5, r


def test_model_under_ep_matches_single_device(worker_rows):
    rows = [r for r in worker_rows if r["kind"] == "model"]
    assert len(rows) == len(MODEL_MESHES)
    for r in rows:
        assert r["shard_map"], r
        assert r["loss"] < 1e-5 and r["logits"] < 1e-4 and r["grads"] < 1e-5, r


def test_no_mesh_means_single_device_path():
    from r1jax.models import moe

    assert moe.expert_parallel() is None


# ------------------------------------------------------------------------------------------ the subprocess

def _rel(a, b):
    import jax.numpy as jnp

    return float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1e-30))


def _worker():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from r1jax import models as M
    from r1jax import sharding as S
    from r1jax.models import moe

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.device_count()
    rng = np.random.default_rng(0)
    m, d, e, f, k = 50, 16, 16, 8, 4  # m not divisible by 8: exercises the padding
    x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(e, d, f)) / 4, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.normal(size=(e, f, d)) / 4, jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, size=(m, k)), jnp.float32)

    def loss(fn, impl, budget, x, w, wg, wu, wd, idx):
        kw = {} if budget is None else {"max_buffer_rows": budget}
        y = fn(x, idx, w, wg, wu, wd, impl, 4, **kw)
        return (y * jnp.sin(y)).sum(), y

    ref_fn = lambda *a, **kw: moe.dispatch(*a[:8])  # noqa: E731
    for ici, impl, budget, routing in CASES:
        if routing == "skewed":  # all k among the first max(k, E_loc) experts: rank 0 gets the most rows possible
            idx = np.stack([rng.permutation(max(k, e // ici.get("expert", 1)))[:k] for _ in range(m)])
        else:
            idx = np.stack([rng.permutation(e)[:k] for _ in range(m)])
        idx = jnp.asarray(idx, jnp.int32)
        args = (x, w, wg, wu, wd)
        grad = jax.value_and_grad(loss, argnums=(3, 4, 5, 6, 7), has_aux=True)
        (_, y_ref), g_ref = jax.jit(grad, static_argnums=(0, 1, 2))(ref_fn, impl, None, *args, idx)
        mesh = S.make_mesh(ici)
        with S.use_rules(mesh, S.DEFAULT_RULES):
            p_sh = S.tree_shardings({"g": ("exp", "embed", "exp_mlp"), "d": ("exp", "exp_mlp", "embed")},
                                    {"g": wg.shape, "d": wd.shape}, mesh, S.DEFAULT_RULES)
            tok = jax.sharding.NamedSharding(mesh, S.logical_to_spec(("act_batch", None), S.DEFAULT_RULES, mesh))
            placed = (x, w, jax.device_put(wg, p_sh["g"]), jax.device_put(wu, p_sh["g"]),
                      jax.device_put(wd, p_sh["d"]), idx)
            fn = jax.jit(grad, static_argnums=(0, 1, 2))
            (_, y), g = fn(moe.dispatch_ep, impl, budget, *placed)
            hlo = fn.lower(moe.dispatch_ep, impl, budget, *placed).as_text()
        m_dev = -(-m // 8)
        n_dev = ici.get("expert", 1)
        per_chunk = (budget or moe.EP_MAX_BUFFER_ROWS) // (n_dev * min(k, e // n_dev))
        print(json.dumps({
            "kind": "dispatch", "mesh": ici, "impl": impl, "budget": budget, "routing": routing,
            "chunks": -(-m_dev // max(1, per_chunk)), "all_to_all": "all_to_all" in hlo or "all-to-all" in hlo,
            "out": _rel(y, y_ref), "grads": max(_rel(a, b) for a, b in zip(g, g_ref))}), flush=True)

    # gmm: one compiled EP step, balanced / skewed / empty-expert routings (experts 0, 5, 15 unchosen).
    routings = {"balanced": (np.arange(m * k) % e).reshape(m, k),
                "skewed": np.stack([rng.permutation(max(k, e // GMM_MESH["expert"]))[:k] for _ in range(m)]),
                "empty": np.stack([rng.permutation(np.setdiff1d(np.arange(e), [0, 5, 15]))[:k] for _ in range(m)])}
    tiling = {"gmm_tiling": (8, 128, 128)}
    ref = jax.jit(jax.value_and_grad(lambda *a: loss(lambda *b, **kw: moe.dispatch(*b[:8], **tiling), *a),
                                     argnums=(2, 3, 4, 5, 6), has_aux=True), static_argnums=(0, 1))
    mesh = S.make_mesh(GMM_MESH)
    with S.use_rules(mesh, S.DEFAULT_RULES):
        p_sh = S.tree_shardings({"g": ("exp", "embed", "exp_mlp"), "d": ("exp", "exp_mlp", "embed")},
                                {"g": wg.shape, "d": wd.shape}, mesh, S.DEFAULT_RULES)
        placed = (x, w, jax.device_put(wg, p_sh["g"]), jax.device_put(wu, p_sh["g"]), jax.device_put(wd, p_sh["d"]))
        ep = jax.jit(jax.value_and_grad(lambda *a: loss(lambda *b, **kw: moe.dispatch_ep(*b, **kw, **tiling), *a),
                                        argnums=(2, 3, 4, 5, 6), has_aux=True), static_argnums=(0, 1))
        traced = ep.trace("gmm", GMM_BUDGET, *placed, jnp.asarray(routings["balanced"], jnp.int32))
        hlo, jaxpr = traced.lower().as_text(), str(traced.jaxpr)
        n_dev = GMM_MESH["expert"]
        chunks = -(-(-(-m // 8)) // (GMM_BUDGET // (n_dev * min(k, e // n_dev))))
        for name, idx in routings.items():
            idx = jnp.asarray(idx, jnp.int32)
            (_, y_ref), g_ref = ref("tiled", None, *placed[:2], wg, wu, wd, idx)
            (_, y), g = ep("gmm", GMM_BUDGET, *placed, idx)
            print(json.dumps({
                "kind": "dispatch_gmm", "routing": name, "pallas_call": "pallas_call" in jaxpr,
                "all_to_all": "all_to_all" in hlo or "all-to-all" in hlo,
                "chunks": chunks,
                "out": _rel(y, y_ref), "grads": max(_rel(a, b) for a, b in zip(g, g_ref))}), flush=True)

    # gmm without expert parallelism on a sharded mesh: per device (a Mosaic kernel cannot be SPMD-partitioned).
    mesh = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    idx = jnp.asarray(routings["skewed"], jnp.int32)
    (_, y_ref), g_ref = ref("tiled", None, *placed[:2], wg, wu, wd, idx)
    with S.use_rules(mesh, S.DEFAULT_RULES):
        per_device = jax.jit(jax.value_and_grad(
            lambda *a: loss(lambda *b, **kw: moe.dispatch_per_device(*b[:8], **tiling), *a),
            argnums=(2, 3, 4, 5, 6), has_aux=True), static_argnums=(0, 1))
        (_, y), g = per_device("gmm", None, x, w, wg, wu, wd, idx)
        jaxpr = str(per_device.trace("gmm", None, x, w, wg, wu, wd, idx).jaxpr)
    print(json.dumps({"kind": "dispatch_gmm_per_device", "shard_map": "shard_map" in jaxpr,
                      "pallas_call": "pallas_call" in jaxpr, "out": _rel(y, y_ref),
                      "grads": max(_rel(a, b) for a, b in zip(g, g_ref))}), flush=True)

    cfg = M.get_preset("tiny_moe", aux_loss_alpha=0.01, remat="full", n_layers=2, mtp_depth=0, n_routed_experts=16,
                       n_group=4, topk_group=2)
    params = M.init(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 12), 0, cfg.vocab_size)

    def model_loss(p, t):
        logits, aux = M.forward(p, t, cfg)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, t[:, 1:, None], -1).mean() + aux["aux_loss"], logits

    # A fresh function per trace: jax caches traces by function, and the active rules are not part of the key.
    model_grad = lambda: jax.value_and_grad(lambda p, t: model_loss(p, t), has_aux=True)  # noqa: E731
    (ref_loss, ref_logits), ref_grads = jax.jit(model_grad())(params, tokens)
    for ici in MODEL_MESHES:
        mesh = S.make_mesh(ici)
        p_sh = M.param_shardings(cfg, mesh, S.DEFAULT_RULES)
        with S.use_rules(mesh, S.DEFAULT_RULES):
            step = jax.jit(model_grad(), in_shardings=(p_sh, None))
            (loss_v, logits), grads = step(jax.device_put(params, p_sh), tokens)
            jaxpr = str(step.trace(params, tokens).jaxpr)
        print(json.dumps({
            "kind": "model", "mesh": ici, "shard_map": "shard_map" in jaxpr,
            "loss": abs(float(loss_v - ref_loss)), "logits": float(jnp.abs(logits - ref_logits).max()),
            "grads": max(float(jnp.abs(a - b).max())
                         for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker()
