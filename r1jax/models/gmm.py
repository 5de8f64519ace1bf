"""The grouped SwiGLU of MoE dispatch on JAX's Pallas grouped-matmul kernels (megablox `gmm` / `tgmm`): TPU.

Dimension letters: R rows grouped by expert (sizes [E], sum(sizes) <= R), D model, E experts, F expert width.

`gmm(lhs [R,K], rhs [E,K,N], sizes)` computes lhs[rows of group i] @ rhs[i] tile by tile: rows are cut into
tiles of Tm, and the kernel's grid runs over `num_active_tiles` (tile, group) pairs computed at run time from
the group sizes (`make_group_metadata`): one per Tm-tile that holds rows of a group, plus one per group that
starts inside a tile (a tile shared by two groups is computed for each). Rows past sum(sizes) are never
touched, so the worst-case receive buffer of expert parallelism (r1jax.models.moe) costs only its filled
rows. `tgmm(lhs^T [K,R], rhs [R,N], sizes)` -> [E,K,N] is the weight gradient: per group, lhs^T @ rhs over
the group's rows, with rows of other groups masked out inside shared tiles.

The VJP is written here for the whole SwiGLU y = (silu(x Wg) * (x Wu)) Wd, so that every weight gradient is a
tgmm and every input gradient a gmm with the transposed weight (`transpose_rhs`, no transposed copy):
  dWd = tgmm(h, dy)   dh = gmm(dy, Wd^T)   dg, du from dh   dWg = tgmm(x, dg)   dWu = tgmm(x, du)
  dx  = gmm(dg, Wg^T) + gmm(du, Wu^T)
The kernels leave output rows past sum(sizes) unwritten (whatever the buffer held): the forward's consumers
(the un-sort gather, the return exchange) never read them, and dx is zeroed there so no stale value flows back.

Tiles (Tm, Tk, Tn) come from ModelConfig.moe_gmm_tiling, else `TILING` for the target chip (`default_tiling`).
The kernel needs R % Tm == 0 (rows are padded here) and blocks whose last two dims are multiples of (8, 128)
or the whole dimension (Tk, Tn are clipped to K, N). Tm is the number of rows that share one load of a
[Tk, Tn] weight tile: the kernel is compute-bound when Tm FLOPs per weight byte (2 Tm FLOPs per bf16 element)
exceed the chip's peak FLOPs / HBM bandwidth, 459e12 / 2.76e12 = 166 on v5p and 918e12 / 1.64e12 = 560 on
v6e, so Tm = 256 (v5p) and 512 (v6e); a larger Tm only adds padding (up to Tm - 1 rows per group). Tk = Tn =
1024 divide D = 7168 and F = 2048 (DeepSeek-V3), and one grid step's double-buffered blocks plus the fp32
accumulator stay small: gmm (lhs Tm x Tk, rhs Tk x Tn, out Tm x Tn in bf16, acc Tm x Tn) 7 MiB on v5p, 10 MiB
on v6e; tgmm (acc Tk x Tn) 10 / 12 MiB; all under 16 MiB, against 64 MiB of VMEM per core on v5p and 128 MiB
on v6e (jax/_src/pallas/mosaic/tpu_info.py), since the megablox kernels do not raise the compiler's scoped
VMEM limit. MaxText's megablox defaults are the same order (512, 1024, 1024). Not yet tuned on a TPU.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
# The kernel module (the package's `gmm` name is the ops-level custom_vjp, which hides the module).
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

# (Tm, Tk, Tn) per TPU generation (the module docstring says why).
TILING = {"v5p": (256, 1024, 1024), "v6e": (512, 1024, 1024)}
DEFAULT_GENERATION = "v5p"  # other / unknown chips (v4, v5e): the smaller row tile


def default_tiling(device_kind: str) -> tuple[int, int, int]:
    """TILING for a device_kind ("TPU v5" = v5p, "TPU v6 lite" = v6e); v5p's for any other chip."""
    return TILING["v6e"] if "v6" in device_kind.lower() else TILING[DEFAULT_GENERATION]


def _clip(tiling, k: int, n: int) -> tuple[int, int, int]:
    tm, tk, tn = tiling
    return tm, min(tk, k), min(tn, n)


def _gmm(lhs, rhs, sizes, tiling, interpret, transpose_rhs=False):
    """lhs [R,K] @ rhs[group] ([E,K,N], or [E,N,K] with transpose_rhs) -> [R,N] in lhs's dtype."""
    k, n = lhs.shape[1], rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return megablox.gmm(lhs, rhs, sizes, lhs.dtype, _clip(tiling, k, n), transpose_rhs=transpose_rhs,
                        interpret=interpret)


def _tgmm(lhs, rhs, sizes, dtype, tiling, interpret):
    """Per group: lhs[rows]^T @ rhs[rows]; lhs [R,K], rhs [R,N] -> [E,K,N] in `dtype` (empty groups: zero)."""
    return megablox.tgmm(lhs.swapaxes(0, 1), rhs, sizes, dtype, _clip(tiling, lhs.shape[1], rhs.shape[1]),
                         num_actual_groups=sizes.shape[0], interpret=interpret)


def grouped_swiglu(rows, sizes, w_gate, w_up, w_down, tiling: tuple[int, int, int], interpret: bool = False):
    """SwiGLU of each expert over its rows. rows [R,D] grouped by expert, sizes [E] int (sum <= R),
    w_gate/w_up [E,D,F], w_down [E,F,D] -> [R,D]; rows past sum(sizes) are not computed (arbitrary values)."""
    r = rows.shape[0]
    pad = -r % tiling[0]
    if pad:
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
    y = _swiglu(tuple(tiling), interpret, rows, sizes.astype(jnp.int32), w_gate, w_up, w_down)
    return y[:r]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _swiglu(tiling, interpret, rows, sizes, w_gate, w_up, w_down):
    return _swiglu_fwd(tiling, interpret, rows, sizes, w_gate, w_up, w_down)[0]


def _swiglu_fwd(tiling, interpret, rows, sizes, w_gate, w_up, w_down):
    mm = functools.partial(_gmm, sizes=sizes, tiling=tiling, interpret=interpret)
    g, u = mm(rows, w_gate), mm(rows, w_up)  # [R,F]
    y = mm(jax.nn.silu(g) * u, w_down)  # [R,D]
    return y, (rows, sizes, w_gate, w_up, w_down, g, u)


def _swiglu_bwd(tiling, interpret, res, dy):
    rows, sizes, w_gate, w_up, w_down, g, u = res
    mm = functools.partial(_gmm, sizes=sizes, tiling=tiling, interpret=interpret, transpose_rhs=True)
    tmm = functools.partial(_tgmm, sizes=sizes, tiling=tiling, interpret=interpret)
    sig = jax.nn.sigmoid(g)
    act = g * sig  # silu(g)
    d_down = tmm(act * u, dy, dtype=w_down.dtype)  # [E,F,D]
    dh = mm(dy, w_down)  # [R,F]
    du, dg = dh * act, dh * u * sig * (1 + g * (1 - sig))
    d_gate, d_up = tmm(rows, dg, dtype=w_gate.dtype), tmm(rows, du, dtype=w_up.dtype)  # [E,D,F]
    d_rows = mm(dg, w_gate) + mm(du, w_up)  # [R,D]
    filled = jnp.arange(rows.shape[0]) < sizes.sum()
    return jnp.where(filled[:, None], d_rows, 0).astype(rows.dtype), None, d_gate, d_up, d_down


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# ------------------------------------------------------------------------------------------ tile counts

@functools.partial(jax.jit, static_argnums=(1, 2))
def active_tiles(sizes, n_rows: int, tm: int):
    """The gmm kernel's grid length for these group sizes (its own `make_group_metadata`): the (row tile,
    group) pairs it computes over a buffer of n_rows rows (padded to a multiple of tm, as grouped_swiglu does).
    Each costs 2 Tm K N FLOPs in a gmm of [R,K] by [K,N], and the same in a tgmm."""
    sizes = jnp.asarray(sizes, jnp.int32)
    _, n = megablox.make_group_metadata(group_sizes=sizes, m=-(-n_rows // tm) * tm, tm=tm,
                                        start_group=jnp.int32(0), num_nonzero_groups=sizes.shape[0],
                                        visit_empty_groups=False)
    return n


def max_active_tiles(n_rows: int, n_groups: int, tm: int) -> int:
    """The most (tile, group) pairs any sizes can make: every row tile, plus one per group starting inside a
    tile after the first (the length of the kernel's group metadata)."""
    return -(-n_rows // tm) + n_groups - 1
