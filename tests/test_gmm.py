"""MoE dispatch on the Pallas grouped-matmul kernels (moe_impl="gmm", r1jax/models/gmm.py), in interpret mode on
CPU: same values and gradients as ragged_dot for balanced, skewed and empty-expert routings, and the kernel's grid
covers the tiles holding routed rows, not the buffer. Under expert parallelism: tests/test_moe_ep.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.models import gmm
from r1jax.models import moe

M_TOK, D, E, F, K = 24, 16, 8, 32, 2
TILING = (8, 128, 128)  # Tm = 8: rows of a tile in the kernel; Tk, Tn are clipped to D, F


def routing(kind: str, rng) -> np.ndarray:
    """idx [M, k]: balanced (every expert gets M*k/E rows), skewed (3/4 of the tokens on experts 0 and 1) or
    empty (experts 0, 3 and 7 get nothing: the first, a middle and the last group are empty)."""
    if kind == "balanced":
        return (np.arange(M_TOK * K) % E).reshape(M_TOK, K)
    if kind == "skewed":
        hot = np.tile([0, 1], (M_TOK * 3 // 4, 1))
        return np.concatenate([hot, np.stack([rng.permutation(E)[:K] for _ in range(M_TOK - len(hot))])])
    allowed = np.array([1, 2, 4, 5, 6])
    return np.stack([rng.permutation(allowed)[:K] for _ in range(M_TOK)])


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def results():
    """Values and gradients (x, weights, w_gate, w_up, w_down) of gmm and ragged_dot dispatch, each compiled once
    and run on the three routings."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(M_TOK, D)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, size=(M_TOK, K)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(E, D, F)) / 4, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.normal(size=(E, F, D)) / 4, jnp.float32)

    def loss(impl, x, w, wg, wu, wd, idx):
        y = moe.dispatch(x, idx, w, wg, wu, wd, impl, gmm_tiling=TILING)
        return (y * jnp.sin(y)).sum(), y

    with jax.default_matmul_precision("highest"):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True), static_argnums=0)
        out = {}
        for kind in ("balanced", "skewed", "empty"):
            idx = jnp.asarray(routing(kind, rng), jnp.int32)
            out[kind] = {impl: fn(impl, x, w, wg, wu, wd, idx) for impl in ("gmm", "ragged_dot")}
        jaxpr = str(jax.make_jaxpr(lambda *a: loss("gmm", *a))(x, w, wg, wu, wd, idx))
    return out, jaxpr


@pytest.mark.parametrize("kind", ["balanced", "skewed", "empty"])
def test_gmm_dispatch_equals_ragged_dot(results, kind):
    out, jaxpr = results
    ((_, y), grads), ((_, y_ref), grads_ref) = out[kind]["gmm"], out[kind]["ragged_dot"]
    assert "pallas_call" in jaxpr  # the kernel ran, not a fallback
    assert _rel(y, y_ref) <= 1e-5
    for name, g, g_ref in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, grads_ref):
        assert _rel(g, g_ref) <= 1e-5, name
    if kind == "empty":  # an expert nobody chose gets a zero weight gradient (tgmm zeroes empty groups)
        for g in grads[2:]:
            assert float(jnp.abs(g[jnp.array([0, 3, 7])]).max()) == 0.0


def covering_tiles(sizes, tm: int) -> int:
    """Independent count: for each group holding rows [start, end), the Tm-tiles those rows touch."""
    ends = np.cumsum(sizes)
    return sum(-(-end // tm) - start // tm for start, end in zip(ends - sizes, ends) if end > start)


@pytest.mark.parametrize("kind", ["balanced", "skewed"])
def test_kernel_grid_covers_the_routed_rows_not_the_buffer(kind):
    tm = TILING[0]
    sizes = np.bincount(routing(kind, np.random.default_rng(1)).reshape(-1), minlength=E)
    # Single device: M*k rows, all routed.
    assert int(gmm.active_tiles(sizes, M_TOK * K, tm)) == covering_tiles(sizes, tm)
    # An EP receive buffer 8x the rows routed to this device (the proven worst case): the grid is the same
    # tiles, not the buffer's 8 * M*k / Tm + E - 1.
    buffer_rows = 8 * M_TOK * K
    active = int(gmm.active_tiles(sizes, buffer_rows, tm))
    assert active == covering_tiles(sizes, tm)
    assert active < gmm.max_active_tiles(buffer_rows, E, tm) / 4


def test_auto_picks_the_kernel_only_on_tpu():
    assert moe._resolve_impl("auto") == "tiled"  # this CPU; TPU compiles: tests/test_aot.py
    # device_kind of the AOT topologies: v5p is "TPU v5", v6e "TPU v6 lite"
    assert gmm.default_tiling("TPU v5") == gmm.TILING["v5p"] and gmm.default_tiling("TPU v6 lite") == gmm.TILING["v6e"]
