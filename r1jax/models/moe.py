"""DeepSeekMoE: sigmoid router with aux-loss-free selection bias, group-limited top-k, dropless dispatch.

Dimension letters: M tokens (B*T flattened), D model, E routed experts, F expert width, k experts per token.

Routing (DeepSeek-V3 §2.1.2, docs/reference.md §1):
  1. s = sigmoid(x W_gate) in fp32                                   [M, E]
  2. s_b = s + b   (b = e_score_correction_bias, used for *selection* only)
  3. group score = sum of the top-2 s_b in each of n_group groups; keep the topk_group best groups
  4. pick the top-k experts by s_b among the kept groups
  5. weights = unbiased s of the chosen experts / their sum (norm_topk_prob) * routed_scaling_factor
  6. y = sum_k w_k Expert_k(x) + SharedExperts(x)

Dispatch is dropless: the M*k (token, expert) pairs are sorted by expert, each expert's contiguous rows go
through a grouped matmul (FLOPs ~ M*k, independent of E), and the results are unsorted and weighted. The grouped
matmul (`moe_impl`, "auto" picks by the platform compiled for):
  gmm         TPU: JAX's Pallas grouped-matmul kernels (megablox gmm / tgmm, r1jax/models/gmm.py), a grid over
              the row tiles that hold routed rows, counted at run time from the group sizes
  ragged_dot  GPU: `jax.lax.ragged_dot`
  tiled       CPU, where XLA's ragged_dot computes every expert densely: a loop over expert tiles that computes
              only the tiles holding rows (`_experts_tiled`)
All three give the same values and gradients (tests/test_gmm.py, tests/test_model.py); gmm runs anywhere in
Pallas interpret mode (slow: tests only).

Expert parallelism (EP): when an active mesh (r1jax.sharding.use_rules) puts the `exp` axis of the expert weights on
mesh axes of size > 1, `moe_layer` runs `dispatch_ep` instead: inside `jax.shard_map` every device sorts its own
tokens' pairs by expert, a ragged all-to-all sends each expert's rows to the device holding it, the local experts
run the same grouped matmul, and a second ragged all-to-all brings the rows home (the dispatch / combine exchange
of DeepSeek-V3 §3.2.2). Dropless with a proven bound, not a capacity factor: a device of an EP group of size P_e
can receive at most P_e * c * min(k, E_loc) rows from c tokens per device (each token sends at most one row to
each expert), and the receive buffer has exactly that many rows, so no row is ever dropped whatever the routing.
That worst case is P_e times the balanced load: tokens go through the exchange in chunks of c per device, c chosen
to keep the buffer under `EP_MAX_BUFFER_ROWS` rows. The gmm and tiled paths compute only the buffer's filled
rows (ragged_dot is counted, and as far as is known run by XLA, over all of it). Without an active mesh (or with
`exp` unsharded) the single-device path above runs unchanged; gmm under a mesh runs it per device
(`dispatch_per_device`: a Mosaic kernel cannot be partitioned by XLA's SPMD partitioner).

Balancing is aux-loss-free: the layer reports each expert's load; `update_router_bias` (outside the gradient)
moves b_i by gamma * sign(mean load - load_i). The optional sequence-wise balance loss is
L = alpha * mean_b sum_i f_i P_i with f_i = E/(k T) * #tokens choosing i, P_i = mean_t s_i / sum_j s_j.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax import sharding
from r1jax.models import gmm
from r1jax.models.config import ModelConfig
from r1jax.models.layers import swiglu

# Rows of the EP receive buffer per device and chunk (the worst case, see the module docstring). 64k rows of
# D = 7168 in bf16 are 0.9 GB; the chunk of tokens per device shrinks as the EP group grows.
EP_MAX_BUFFER_ROWS = 65536

# Rows per step of the loop over tiles in `_tiled_swiglu`: large enough that the batched matmuls of a step keep
# the cores busy, small enough that the unused tail of the last used chunk is a small share of the work.
TILE_CHUNK_ROWS = 1024
L2_BYTES = 1 << 20  # a core's L2 cache on current server CPUs (1-2 MiB): where a tile's weights stop being cheap


def route(x, w_router, bias, cfg: ModelConfig):
    """x [M,D] -> (weights [M,k] fp32, expert ids [M,k] int32, scores s [M,E] fp32). Steps 1-5 above."""
    e, g = cfg.n_routed_experts, cfg.n_group
    logits = jnp.dot(x.astype(jnp.float32), w_router.astype(jnp.float32))
    s = jax.nn.sigmoid(logits)  # 1.
    s_b = s + jax.lax.stop_gradient(bias.astype(jnp.float32))  # 2.
    if g > 1:  # 3.
        grouped = s_b.reshape(-1, g, e // g)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [M, G]
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)
        group_mask = jnp.zeros_like(group_score, dtype=bool).at[jnp.arange(s.shape[0])[:, None], keep].set(True)
        s_b = jnp.where(jnp.repeat(group_mask, e // g, axis=1), s_b, -jnp.inf)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(s_b), cfg.n_experts_per_tok)  # 4.
    w = jnp.take_along_axis(s, idx, axis=1)  # 5. unbiased scores carry the gradient
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx, s


def _sort_pairs(idx, n_exp):
    """Sort the M*k (token, expert) pairs by expert. Returns (order [M*k], group sizes [E])."""
    flat = idx.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=n_exp).astype(jnp.int32)


def _experts_ragged(rows, sizes, w_gate, w_up, w_down):
    """SwiGLU per expert over rows grouped by expert with jax.lax.ragged_dot (grouped-matmul kernels on TPU/GPU)."""
    h = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, sizes)) * jax.lax.ragged_dot(rows, w_up, sizes)
    return jax.lax.ragged_dot(h, w_down, sizes)


def _tile_size(n_rows: int, n_exp: int, max_tile: int, weight_bytes: int = 0) -> int:
    """Rows per tile: a power of two at most max_tile, n_rows / E (2 n_rows / E) and sqrt(c n_rows / E).

    Padding costs ~E*Tm/2 rows of matmul and every tile copies its expert's weights once, ~ n_rows/Tm + E copies
    of D*F; the sum is smallest near Tm = sqrt(c n_rows / E), c = twice the cost of copying a weight over that
    of one multiply-add. Measured on CPU: c ~ 16 while a tile's three matrices (`weight_bytes`) fit in a core's
    L2 cache (the tiny models, the MoE flatness bench); ~ 256 once they come from memory, where the backward
    also writes and adds a weight gradient per tile, and a tile of up to twice the balanced load pays for its
    padding (the 100m MoE layer: Tm 128 instead of 32 is ~1.7x faster, docs/performance.md)."""
    from_memory = weight_bytes > L2_BYTES
    c, cap = (256, 2 * n_rows // n_exp) if from_memory else (16, n_rows // n_exp)
    tm = max(1, min(max_tile, cap, math.isqrt(c * n_rows // n_exp)))
    return 1 << (tm.bit_length() - 1)


def _experts_tiled(x, src, dst, sizes, w_gate, w_up, w_down, max_tile: int):
    """The grouped SwiGLU as tiles. Sorted row r (rows grouped by expert, `sizes` [E] of them) reads x[src[r]]
    and is written to output row dst[r]: x [A, D], src/dst [P] -> y [P, D] (dst a permutation of range(P)).

    Each expert's rows are padded to a multiple of a tile of Tm rows (`_tile_size`), so every tile belongs to
    one expert. The tile layout holds the worst case, P/Tm + E tiles, in chunks of at most TILE_CHUNK_ROWS rows
    (one chunk of exactly the worst case when that is smaller: a decode step's 64 tokens x top-2 over 8 experts
    make 16 tiles of 16 rows, not 64), but only the chunks holding rows are computed (`_tiled_swiglu`): the
    work is ~ P + E*Tm/2 rows, and no buffer of the worst-case size is written. CPU's ragged_dot computes every
    expert densely, hence this path there."""
    n_rows, n_exp = src.shape[0], w_gate.shape[0]
    tile_weight_bytes = 3 * w_gate.shape[1] * w_gate.shape[2] * w_gate.dtype.itemsize
    tm = _tile_size(n_rows, n_exp, max_tile, tile_weight_bytes)
    max_tiles = -(-n_rows // tm) + n_exp  # the worst case
    per_chunk = max(1, min(TILE_CHUNK_ROWS // tm, max_tiles))  # tiles; few rows (decoding): one small chunk
    n_chunks = -(-max_tiles // per_chunk)
    padded = -(-sizes // tm) * tm  # [E]
    pad_end = jnp.cumsum(padded)
    shift = pad_end - padded - (jnp.cumsum(sizes) - sizes)  # [E] padded start - sorted start
    sorted_e = jnp.repeat(jnp.arange(n_exp), sizes, total_repeat_length=n_rows)  # expert of each sorted row
    slot = shift[sorted_e] + jnp.arange(n_rows)  # [P] place of each sorted row in the tile layout
    n_slots = n_chunks * per_chunk * tm
    slot_src = jnp.full((n_slots,), x.shape[0], src.dtype).at[slot].set(src, unique_indices=True)
    slot_dst = jnp.full((n_slots,), n_rows, dst.dtype).at[slot].set(dst, unique_indices=True)
    tile_e = jnp.searchsorted(pad_end, jnp.arange(n_chunks * per_chunk) * tm, side="right")
    tile_e = jnp.minimum(tile_e, n_exp - 1).reshape(n_chunks, per_chunk)
    used = -(-pad_end[-1] // (per_chunk * tm))  # chunks holding rows
    args = (jnp.asarray(x), slot_src.reshape(n_chunks, -1), slot_dst.reshape(n_chunks, -1), tile_e, used,
            jnp.asarray(w_gate), jnp.asarray(w_up), jnp.asarray(w_down))
    return _tiled_swiglu(n_rows, *_varying(args, *args))  # one mesh type for all: the VJP's sums need no psum


def _tile_inputs(x, slot_src, tile_e, i, w_gate, w_up):
    """Chunk i's rows [G, Tm, D] (zero in padding slots) and their gate and up projections [G, Tm, F]."""
    g = tile_e.shape[1]
    e = tile_e[i]  # [G]
    b = jnp.take(x, slot_src[i], axis=0, mode="fill", fill_value=0).reshape(g, -1, x.shape[1])
    return b, jnp.einsum("ntd,ndf->ntf", b, w_gate[e]), jnp.einsum("ntd,ndf->ntf", b, w_up[e])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled_swiglu(n_out: int, x, slot_src, slot_dst, tile_e, used, w_gate, w_up, w_down):
    """y[slot_dst] = SwiGLU of x[slot_src] with each tile's expert, looping over the `used` chunks only.
    x [A, D], slot_src/slot_dst [C, G*Tm] (past the end in padding slots), tile_e [C, G] -> y [n_out, D].

    The VJP is written by hand: it recomputes the gate and up projections chunk by chunk and accumulates the
    gradients in place (scatter-adds into one [E, D, F] buffer per weight and one [A, D] for x)."""
    def step(i, y):
        _, gate, up = _tile_inputs(x, slot_src, tile_e, i, w_gate, w_up)
        out = jnp.einsum("ntf,nfd->ntd", jax.nn.silu(gate) * up, w_down[tile_e[i]])
        return y.at[slot_dst[i]].set(out.reshape(-1, x.shape[1]), mode="drop", unique_indices=True)

    init = jnp.zeros((n_out, x.shape[1]), x.dtype)
    return jax.lax.fori_loop(0, used, step, _varying(init, x))


def _tiled_swiglu_fwd(n_out, x, slot_src, slot_dst, tile_e, used, w_gate, w_up, w_down):
    y = _tiled_swiglu(n_out, x, slot_src, slot_dst, tile_e, used, w_gate, w_up, w_down)
    return y, (x, slot_src, slot_dst, tile_e, used, w_gate, w_up, w_down)


def _tiled_swiglu_bwd(n_out, res, dy):
    x, slot_src, slot_dst, tile_e, used, w_gate, w_up, w_down = res

    def step(i, acc):
        dx, d_gate, d_up, d_down = acc
        e = tile_e[i]  # [G]
        b, g, u = _tile_inputs(x, slot_src, tile_e, i, w_gate, w_up)  # [G,Tm,D], [G,Tm,F] x2
        dy_i = jnp.take(dy, slot_dst[i], axis=0, mode="fill", fill_value=0).reshape(b.shape)
        sig = jax.nn.sigmoid(g)
        act = g * sig  # silu(g)
        d_down = d_down.at[e].add(jnp.einsum("ntf,ntd->nfd", act * u, dy_i).astype(d_down.dtype))
        dh = jnp.einsum("ntd,nfd->ntf", dy_i, w_down[e])
        du, dg = dh * act, dh * u * sig * (1 + g * (1 - sig))
        d_gate = d_gate.at[e].add(jnp.einsum("ntd,ntf->ndf", b, dg).astype(d_gate.dtype))
        d_up = d_up.at[e].add(jnp.einsum("ntd,ntf->ndf", b, du).astype(d_up.dtype))
        db = jnp.einsum("ntf,ndf->ntd", dg, w_gate[e]) + jnp.einsum("ntf,ndf->ntd", du, w_up[e])
        dx = dx.at[slot_src[i]].add(db.reshape(-1, x.shape[1]).astype(dx.dtype), mode="drop")
        return dx, d_gate, d_up, d_down

    init = (jnp.zeros_like(x), jnp.zeros_like(w_gate), jnp.zeros_like(w_up), jnp.zeros_like(w_down))
    dx, d_gate, d_up, d_down = jax.lax.fori_loop(0, used, step, _varying(init, x, dy))
    return dx, None, None, None, None, d_gate, d_up, d_down


_tiled_swiglu.defvjp(_tiled_swiglu_fwd, _tiled_swiglu_bwd)


def _varying(tree, *inputs):
    """`tree` marked as varying over every mesh axis that an input varies over: inside shard_map (expert
    parallelism) a loop's initial carry must have the type its body returns. Unchanged outside shard_map."""
    axes = set().union(*(jax.typeof(a).mat.varying for a in inputs))

    def cast(a):
        missing = tuple(sorted(axes - set(jax.typeof(a).mat.varying)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


@jax.custom_vjp
def _take_rows(a, idx, inv):
    """a[idx] for idx [*O] that reads every row of a [A, ...] exactly r times; inv [A, r] lists the flat output
    positions reading each row. The transpose is then a gather by inv summed over r, not a scatter-add."""
    return a[idx]


def _take_rows_fwd(a, idx, inv):
    return a[idx], (idx, inv)


def _take_rows_bwd(res, g):
    idx, inv = res
    return g.reshape((-1,) + g.shape[idx.ndim:])[inv].sum(1), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _sorted_rows(x, order, k: int):
    """x [M, D] -> the M*k (token, expert) rows in `order` [M*k], and rank [M, k] (each pair's sorted row) to
    bring them back with `_unsorted_rows`."""
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype), unique_indices=True)
    rank = rank.reshape(-1, k)
    return _take_rows(x, order // k, rank), rank


def _unsorted_rows(y, order, rank):
    """Rows [M*k, D] in `order` -> [M, k, D] by (token, expert) pair."""
    return _take_rows(y, rank, order[:, None])


def _target_device():
    """A device of the platform the code is compiled for: the active mesh's (an AOT topology from a CPU host is
    a TPU), else the default backend's."""
    active = sharding._ACTIVE.get()
    return active[0].devices.flat[0] if active is not None else jax.devices()[0]


def _target_platform() -> str:
    return _target_device().platform


def _resolve_impl(impl: str) -> str:
    if impl == "auto":
        return {"cpu": "tiled", "tpu": "gmm"}.get(_target_platform(), "ragged_dot")
    if impl not in ("gmm", "ragged_dot", "tiled"):
        raise ValueError(f"unknown MoE dispatch impl {impl!r}; expected auto, gmm, ragged_dot or tiled")
    return impl


def _gmm_tiling(tiling) -> tuple[int, int, int]:
    """The gmm kernel's (Tm, Tk, Tn): `tiling` if given, else the default for the chip compiled for."""
    return tuple(tiling) if tiling else gmm.default_tiling(_target_device().device_kind)


def dispatch(x, idx, weights, w_gate, w_up, w_down, impl: str = "auto", max_tile: int = 128, gmm_tiling=()):
    """Dropless expert computation. x [M,D], idx/weights [M,k], w_gate/w_up [E,D,F], w_down [E,F,D] -> [M,D].

    impl: "gmm", "ragged_dot", "tiled", or "auto" (gmm on TPU, ragged_dot on GPU, tiled on CPU). max_tile:
    the tiled path's largest row tile; gmm_tiling: the gmm kernel's (Tm, Tk, Tn), () = the chip's default."""
    m, k = idx.shape
    impl = _resolve_impl(impl)
    order, sizes = _sort_pairs(idx, w_gate.shape[0])
    if impl == "tiled":  # the tiles read the tokens and write the (token, expert) pairs directly
        y = _experts_tiled(x, order // k, order, sizes, w_gate, w_up, w_down, max_tile).reshape(m, k, -1)
    else:
        rows, rank = _sorted_rows(x, order, k)  # [M*k, D] grouped by expert
        y = _grouped_swiglu(rows, sizes, w_gate, w_up, w_down, impl, max_tile, gmm_tiling)
        y = _unsorted_rows(y, order, rank)  # [M, k, D]
    return jnp.einsum("mkd,mk->md", y, weights.astype(y.dtype))


# ------------------------------------------------------------------------------------- expert parallelism

def _mesh_axes(table, logical: str, mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that the rule for `logical` names."""
    value = table.get(logical)
    names = () if value is None else (value,) if isinstance(value, str) else tuple(value)
    return tuple(a for a in names if mesh.shape.get(a, 1) > 1)


def expert_parallel():
    """(mesh, token axes, expert axes, expert-width axes) when an active mesh shards the experts, else None.

    Tokens are split over the `act_batch` axes plus the expert axes (so every device of an EP group holds
    different tokens); expert weights over the `exp` axes (EP) and `exp_mlp` axes (tensor parallel inside
    each expert, summed with a psum). Their `embed` axis is gathered at the shard_map boundary (FSDP)."""
    active = sharding._ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    table = dict(rules)
    exp_axes = _mesh_axes(table, "exp", mesh)
    if not exp_axes:
        return None
    tok_axes = _mesh_axes(table, "act_batch", mesh)
    tok_axes += tuple(a for a in exp_axes if a not in tok_axes)
    mlp_axes = _mesh_axes(table, "exp_mlp", mesh)
    if set(mlp_axes) & set(tok_axes):
        raise sharding.ShardingError(
            f"expert parallelism: the `exp_mlp` rule {mlp_axes} shares mesh axes with the token axes {tok_axes} "
            "(`act_batch` + `exp`); an expert's width can only be split over axes that hold the same tokens")
    return mesh, tok_axes, exp_axes, mlp_axes


def _excl_cumsum(a, axis):
    return jnp.cumsum(a, axis) - a


def _exchange(rows, out_rows: int, input_offsets, send_sizes, output_offsets, recv_sizes, axis, platform,
              max_slice: int):
    """Ragged all-to-all of `rows` into a fresh [out_rows, ...] buffer (jax.lax.ragged_all_to_all semantics).

    XLA:CPU has no ragged all-to-all, so on CPU (tests on fake devices) the same exchange is built from a dense
    all_to_all of per-slice blocks padded to `max_slice` rows, the largest slice possible."""
    out = jnp.zeros((out_rows,) + rows.shape[1:], rows.dtype)
    if platform != "cpu":
        return jax.lax.ragged_all_to_all(rows, out, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=axis)
    n_slices, cap = input_offsets.shape[0], max_slice
    r = jnp.arange(cap)
    take = jnp.where(r[None] < send_sizes[:, None], input_offsets[:, None] + r[None], rows.shape[0])  # [S, cap]
    blocks = jnp.take(rows, take, axis=0, mode="fill", fill_value=0)  # [S, cap, ...]
    blocks = jax.lax.all_to_all(blocks, axis, 0, 0, tiled=True)
    offsets = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)
    dest = jnp.where(r[None] < recv_sizes[:, None], offsets[:, None] + r[None], out_rows)  # [S, cap]
    return out.at[dest.reshape(-1)].set(blocks.reshape((n_slices * cap,) + rows.shape[1:]), mode="drop")


def _grouped_swiglu(rows, sizes, w_gate, w_up, w_down, impl: str, max_tile: int, gmm_tiling=()):
    """Grouped SwiGLU over rows grouped by expert, where sum(sizes) may be less than the rows (the tail of the
    receive buffer). ragged_dot leaves those rows zero, gmm leaves them unwritten (nobody reads them); the
    tiled path gets a phantom zero expert for them."""
    if impl == "ragged_dot":
        return _experts_ragged(rows, sizes, w_gate, w_up, w_down)
    if impl == "gmm":
        return gmm.grouped_swiglu(rows, sizes, w_gate, w_up, w_down, _gmm_tiling(gmm_tiling),
                                  interpret=_target_platform() != "tpu")
    tail = (rows.shape[0] - sizes.sum())[None].astype(sizes.dtype)
    zero = lambda w: jnp.concatenate([w, jnp.zeros_like(w[:1])])  # noqa: E731
    every = jnp.arange(rows.shape[0])
    return _experts_tiled(rows, every, every, jnp.concatenate([sizes, tail]), zero(w_gate), zero(w_up), zero(w_down),
                          max_tile)


def _ep_chunk(x, idx, weights, w_gate, w_up, w_down, *, exp_axes, n_dev, impl, max_tile, gmm_tiling, platform):
    """One chunk on one device: x [c,D], idx/weights [c,k] -> [c,D] (partial over `exp_mlp` axes).

    Slice s*E_loc + l of an exchange is (device s of the EP group, its local expert l). C [P_e, E] holds every
    device's row count per expert, so each device computes the whole plan locally:
      forward   my rows for expert e go to owner e // E_loc, at (start of e's block there) + (rows of e from
                lower-ranked devices); the owner's buffer is grouped by local expert, then by source device
      backward  the same slices in reverse, landing at my sorted-row offsets."""
    c, k = idx.shape
    e_loc = w_gate.shape[0]
    n_exp = n_dev * e_loc
    me = jax.lax.axis_index(exp_axes)
    order, cnt = _sort_pairs(idx, n_exp)  # cnt [E]: my rows per expert
    rows, rank = _sorted_rows(x, order, k)  # [c*k, D] sorted by expert = by (owner, local expert)
    counts = jax.lax.all_gather(cnt, exp_axes)  # [P_e, E]
    block = _excl_cumsum(counts.sum(0).reshape(n_dev, e_loc), 1).reshape(n_exp)  # [E] block start at its owner
    src = _excl_cumsum(counts, 0)  # [P_e, E] start of each source's rows within a block
    mine = lambda a: jax.lax.dynamic_slice_in_dim(a, me * e_loc, e_loc, axis=1)  # noqa: E731  [P_e, E_loc]
    recv = mine(counts).reshape(-1)  # [P_e*E_loc] rows I get from source s for local expert l
    buf_rows = n_dev * c * min(k, e_loc)  # the worst case: dropless by construction
    exchange = functools.partial(_exchange, axis=exp_axes, platform=platform, max_slice=c)  # a slice: <= 1 row/token
    buf = exchange(rows, buf_rows, _excl_cumsum(cnt, 0), cnt, block + src[me], recv)
    sizes = mine(counts).sum(0)  # [E_loc] rows per local expert
    y = _grouped_swiglu(buf, sizes, w_gate, w_up, w_down, impl, max_tile, gmm_tiling)  # [buf_rows, D]
    home = (jax.lax.dynamic_slice_in_dim(block, me * e_loc, e_loc)[None] + mine(src)).reshape(-1)
    y = exchange(y, c * k, home, recv, mine(_excl_cumsum(counts, 1)).reshape(-1), cnt)
    return jnp.einsum("mkd,mk->md", _unsorted_rows(y, order, rank), weights.astype(y.dtype))


def _pad_tokens(x, idx, weights, rows: int):
    """x [M,D], idx/weights [M,k] padded to `rows` tokens; padding tokens pick experts 0..k-1 with zero weight."""
    pad, k = rows - x.shape[0], idx.shape[1]
    if not pad:
        return x, idx, weights
    idx = jnp.concatenate([idx, jnp.broadcast_to(jnp.arange(k, dtype=idx.dtype), (pad, k))])
    return jnp.pad(x, ((0, pad), (0, 0))), idx, jnp.pad(weights, ((0, pad), (0, 0)))


def dispatch_per_device(x, idx, weights, w_gate, w_up, w_down, impl: str = "auto", max_tile: int = 128,
                        gmm_tiling=()):
    """`dispatch` of each device's own tokens under an active mesh that does not shard the experts: a shard_map
    over the `act_batch` axes, the expert weights gathered whole at its boundary. The gmm kernels are Mosaic
    custom calls, which XLA's SPMD partitioner cannot split, so they must run per device like this."""
    mesh, rules = sharding._ACTIVE.get()
    tok_axes = _mesh_axes(dict(rules), "act_batch", mesh)
    n_tok = math.prod(mesh.shape[a] for a in tok_axes)
    m = x.shape[0]
    x, idx, weights = _pad_tokens(x, idx, weights, -(-m // n_tok) * n_tok)
    tok = P(tok_axes or None, None)
    run = functools.partial(dispatch, impl=impl, max_tile=max_tile, gmm_tiling=gmm_tiling)
    y = jax.shard_map(lambda x, i, w, *experts: run(x, i, w, *experts), mesh=mesh,
                      in_specs=(tok, tok, tok, P(), P(), P()), out_specs=tok, check_vma=False)(
        x, idx, weights, w_gate, w_up, w_down)
    return y[:m]


def balanced_rows(n_rows: int, n_groups: int, cfg: ModelConfig) -> int:
    """Rows of an n_rows grouped-matmul buffer over n_groups experts that hold routed rows when routing is
    balanced: all of them on one device (n_groups = E); under EP (n_groups = E_loc = E / P_e) the receive
    buffer of P_e * c * min(k, E_loc) rows (`_ep_chunk`) gets c * k, every device's share."""
    k, n_exp = cfg.n_experts_per_tok, cfg.n_routed_experts
    if n_groups >= n_exp:
        return n_rows
    return n_rows * k // ((n_exp // n_groups) * min(k, n_groups))


def dispatch_ep(x, idx, weights, w_gate, w_up, w_down, impl: str = "auto", max_tile: int = 128, gmm_tiling=(),
                max_buffer_rows: int | None = None):
    """`dispatch` under expert parallelism (module docstring); same arguments and result, global shapes.

    Needs an active mesh that shards `exp` (see `expert_parallel`). Tokens are padded to a multiple of the
    token shards times the chunk; padding rows carry zero weight."""
    ep = expert_parallel()
    if ep is None:
        raise ValueError("dispatch_ep needs an active mesh whose `exp` rule shards the experts (use_rules)")
    mesh, tok_axes, exp_axes, mlp_axes = ep
    impl, platform = _resolve_impl(impl), mesh.devices.flat[0].platform
    m, k = idx.shape
    n_exp = w_gate.shape[0]
    n_tok = math.prod(mesh.shape[a] for a in tok_axes)
    n_dev = math.prod(mesh.shape[a] for a in exp_axes)
    if n_exp % n_dev:
        raise sharding.ShardingError(
            f"expert parallelism: {n_exp} experts do not divide over the {n_dev} devices of mesh axes {exp_axes}")
    budget = EP_MAX_BUFFER_ROWS if max_buffer_rows is None else max_buffer_rows
    m_dev = -(-m // n_tok)  # tokens per device
    n_chunks = -(-m_dev // max(1, budget // (n_dev * min(k, n_exp // n_dev))))
    chunk = -(-m_dev // n_chunks)
    x, idx, weights = _pad_tokens(x, idx, weights, n_tok * n_chunks * chunk)
    body = functools.partial(_ep_chunk, exp_axes=exp_axes, n_dev=n_dev, impl=impl, max_tile=max_tile,
                             gmm_tiling=gmm_tiling, platform=platform)

    def per_device(x, idx, weights, w_gate, w_up, w_down):
        if n_chunks == 1:
            y = body(x, idx, weights, w_gate, w_up, w_down)
        else:  # one chunk's buffers live at a time, forward and backward (the chunk is recomputed)
            step = jax.checkpoint(lambda xs: body(*xs, w_gate, w_up, w_down), prevent_cse=False)
            split = lambda a: a.reshape((n_chunks, chunk) + a.shape[1:])  # noqa: E731
            y = jax.lax.map(step, (split(x), split(idx), split(weights))).reshape(n_chunks * chunk, -1)
        return jax.lax.psum(y, mlp_axes) if mlp_axes else y

    tok = P(tok_axes, None)
    w_in, w_out = P(exp_axes, None, mlp_axes or None), P(exp_axes, mlp_axes or None, None)
    # The megablox kernels build their outputs without mesh types, which a type-checked shard_map refuses.
    y = jax.shard_map(per_device, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok,
                      check_vma=impl != "gmm")(x, idx, weights, w_gate, w_up, w_down)
    return y[:m]


def moe_layer(p, x, valid, cfg: ModelConfig):
    """x [B,T,D], valid [B,T] (non-padding tokens). Returns (y [B,T,D], stats {load [E], aux_loss})."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    w, idx, s = route(xf, p["router"], p["router_bias"], cfg)
    experts = (xf, idx, w, p["w_gate"], p["w_up"], p["w_down"], cfg.moe_impl, cfg.moe_tile, cfg.moe_gmm_tiling)
    if expert_parallel():
        y = dispatch_ep(*experts)
    elif sharding._ACTIVE.get() is not None and _resolve_impl(cfg.moe_impl) == "gmm":
        y = dispatch_per_device(*experts)
    else:
        y = dispatch(*experts)
    y = y.reshape(b, t, d)
    if cfg.n_shared_experts:
        sh = p["shared"]
        y = y + swiglu(x, sh["w_gate"], sh["w_up"], sh["w_down"])
    return y, _balance_stats(idx, s, valid, cfg)


def _balance_stats(idx, s, valid, cfg: ModelConfig):
    """Expert load (share of routed slots per expert, over valid tokens) and the sequence-wise balance loss."""
    b, t = valid.shape
    e, k = cfg.n_routed_experts, cfg.n_experts_per_tok
    vf = valid.astype(jnp.float32)
    seq = jnp.repeat(jnp.arange(b), t)[:, None]  # [M,1] sequence of each token
    chosen = jnp.zeros((b, e), jnp.float32).at[seq, idx].add(vf.reshape(-1, 1))  # [B,E] valid tokens choosing i
    load = chosen.sum(0) / jnp.maximum(vf.sum() * k, 1.0)  # [E], sums to 1
    n_tok = jnp.maximum(vf.sum(1), 1.0)  # [B]
    f = chosen * e / (k * n_tok[:, None])  # [B,E]
    s_norm = (s / s.sum(-1, keepdims=True)).reshape(b, t, e) * vf[..., None]
    p_mean = s_norm.sum(1) / n_tok[:, None]  # [B,E]
    aux = (f * p_mean).sum(-1).mean()
    return {"load": load, "aux_loss": aux}


def update_router_bias(bias, load, rate: float):
    """Aux-loss-free balancing: b_i += rate * sign(mean_load - load_i). bias/load [..., E]. Not a gradient."""
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load).astype(bias.dtype)
