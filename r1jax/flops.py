"""FLOP counting for the AOT fit check (r1jax/aot.py): the matmul FLOPs of one run of a jaxpr (XLA's cost_analysis
counts a loop body once), the compiled HLO's skippable conditionals, and the model FLOPs per token that the
counted FLOPs are compared with."""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax

from r1jax import models
from r1jax.models import gmm
from r1jax.models.transformer import ParamSpec


class FlopCount(NamedTuple):
    """Matmul FLOPs of one run of a jaxpr, summed over all devices (see `jaxpr_flops`)."""

    flops: float  # everything, grouped-matmul kernels at their worst-case bound
    while_loops: int = 0  # loops met (unknown trip count: body counted once)
    ragged: float = 0.0  # of `flops`: ragged_dot over whole operands
    gmm_bound: float = 0.0  # of `flops`: the Pallas grouped-matmul kernels at their largest grid
    gmm_balanced: float = 0.0  # the same kernels' grid under balanced routing (not in `flops`)
    skippable: float = 0.0  # of `flops`: lax.cond branches whose alternative has no matmul (attention blocks)

    def __add__(self, other):
        return FlopCount(*(a + b for a, b in zip(self, other)))

    def times(self, n):
        return FlopCount(*(v if f == "while_loops" else v * n for f, v in zip(self._fields, self)))

    @property
    def balanced(self) -> float:
        """`flops` with the grouped-matmul kernels at their balanced-routing grid."""
        return self.flops - self.gmm_bound + self.gmm_balanced


def _grouped_kernel(eqn, balanced_rows) -> FlopCount:
    """A megablox gmm / tgmm pallas_call (its grid has one dimension sized at run time, num_active_tiles).

    Its operands start with that size, then the kernel's group metadata (r1jax.models.gmm): group_offsets
    [E+1], group_ids [tiles_m + E - 1] (the longest grid: every row tile plus one per group starting inside a
    tile) and m_tile_ids. One grid step costs the kernel body's FLOPs (one Tm x Tk x Tn block matmul), times
    the static grid dimensions. Bound: the metadata length. Balanced: the kernel's own tile count
    (gmm.active_tiles) for balanced_rows(rows, E) rows split evenly over the E groups."""
    grid = eqn.params["grid_mapping"].grid
    dims = [d for d in grid if not isinstance(d, int)]
    offsets, group_ids = (eqn.invars[len(dims) + i].aval.shape[0] for i in (0, 1))
    if len(dims) != 1:
        raise ValueError(f"pallas_call with grid {grid}: the FLOP count knows one run-time grid dimension")
    n_groups = offsets - 1
    tm = eqn.params["grid_mapping"].block_mappings[0].block_shape[0].block_size
    n_rows = (group_ids - n_groups + 1) * tm
    filled = balanced_rows(n_rows, n_groups) if balanced_rows else n_rows
    sizes = [filled // n_groups + (i < filled % n_groups) for i in range(n_groups)]
    per_step = jaxpr_flops(eqn.params["jaxpr"]).flops * math.prod(d for d in grid if isinstance(d, int))
    bound, balanced = per_step * group_ids, per_step * int(gmm.active_tiles(sizes, n_rows, tm))
    return FlopCount(bound, 0, 0.0, bound, balanced)


def jaxpr_flops(jaxpr, balanced_rows=None) -> FlopCount:
    """Matmul FLOPs of one run of `jaxpr`, summed over all devices.

    XLA's cost_analysis() counts a loop body once, whatever its trip count (checked: a scan over 2 or 8 layers
    reports the same FLOPs), so the per-step count walks the jaxpr instead: dot_general and ragged_dot FLOPs,
    scan bodies times their length, shard_map bodies (per-device shapes) times the devices, the larger cond
    branch (`skippable` when another branch has no matmul). A while_loop's trip count is unknown: its body is
    counted once and the loop is reported.
    ragged_dot counts every row of its operand: under expert parallelism that is the worst-case receive buffer
    (r1jax.models.moe). The grouped-matmul kernels (moe_impl="gmm", `_grouped_kernel`) are counted at their
    largest grid and at their grid under balanced routing; `balanced_rows(rows, groups)` says how many rows
    of a kernel's buffer balanced routing fills (r1jax.models.moe.balanced_rows; default all)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    count = FlopCount(0.0)
    walk = functools.partial(jaxpr_flops, balanced_rows=balanced_rows)
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (lhs_contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            count += FlopCount(2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract))
        elif name == "ragged_dot_general":
            dims = params["ragged_dot_dimension_numbers"]
            (_, rhs_contract), (_, rhs_batch) = dims.dot_dimension_numbers
            rhs = eqn.invars[1].aval.shape
            fixed = set(rhs_contract) | set(rhs_batch) | set(dims.rhs_group_dimensions)
            free = math.prod(n for d, n in enumerate(rhs) if d not in fixed)
            f = 2.0 * math.prod(eqn.invars[0].aval.shape) * free
            count += FlopCount(f, 0, f)
        elif name == "pallas_call" and not all(isinstance(d, int) for d in params["grid_mapping"].grid):
            count += _grouped_kernel(eqn, balanced_rows)
        elif name == "pallas_call":
            count += walk(params["jaxpr"]).times(math.prod(params["grid_mapping"].grid))
        elif name == "scan":
            count += walk(params["jaxpr"]).times(params["length"])
        elif name == "while":
            count += walk(params["body_jaxpr"]) + FlopCount(0.0, 1)
        elif name == "cond":
            branches = [walk(b) for b in params["branches"]]
            taken = max(branches, key=lambda c: c.flops)
            count += taken._replace(skippable=taken.flops) if min(c.flops for c in branches) == 0 else taken
        elif name == "shard_map":
            devices = math.prod(params["mesh"].shape[a] for a in params["newly_manual_axes"])
            count += walk(params["jaxpr"]).times(devices)
        else:
            for value in params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        count += walk(sub)
    return count


def skipping_conditionals(hlo: str) -> tuple[int, int]:
    """(conditionals in a compiled HLO module, those with matmuls in one branch only). The chunked attention's
    lax.cond over key blocks (r1jax/models/attention.py) skips the blocks the mask rules out only if it stays a
    conditional through compilation: a select would compute both branches and discard one."""
    comps = {m.group(1): m.group(2) for m in re.finditer(r"^(?:ENTRY )?%(\S+) \(.*?\{\n(.*?)\n\}\n", hlo, re.S | re.M)}

    @functools.cache
    def matmuls(name: str) -> int:  # dots and convolutions in a computation and everything it calls
        body = comps.get(name, "")
        called = re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", body)
        called += [c for group in re.findall(r"branch_computations=\{([^}]*)\}", body)
                   for c in re.findall(r"%([\w.\-]+)", group)]
        return len(re.findall(r" (?:convolution|dot)\(", body)) + sum(matmuls(c) for c in called)

    groups = re.findall(r" conditional\(.*?branch_computations=\{([^}]*)\}", hlo)
    branches = [re.findall(r"%([\w.\-]+)", g) for g in groups]
    return len(branches), sum(1 for b in branches if sum(matmuls(c) > 0 for c in b) == 1)


def activated_params(cfg: models.ModelConfig) -> int:
    """Parameters one token passes through: everything but the unchosen routed experts, MTP module included."""
    total = 0
    for s in jax.tree.leaves(models.param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec)):
        n = math.prod(s.shape)
        total += n * cfg.n_experts_per_tok // cfg.n_routed_experts if "exp" in s.axes else n
    return total


def model_flops_per_token(cfg: models.ModelConfig, seq_len: int, training: bool) -> float:
    """The model's FLOPs per token: 2 x activated params per matmul pass plus causal attention over rows of
    seq_len tokens (scores and values, 2 (d_qk + d_v) FLOPs per head and visible key, (T + 1) / 2 keys on
    average); x3 when training (forward + backward). Rematerialisation and padding are not model FLOPs."""
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    layers = cfg.n_layers + (cfg.mtp_depth if training else 0)
    attention = 2 * layers * cfg.n_heads * (d_qk + d_v) * (seq_len + 1) / 2
    return (3 if training else 1) * (2 * activated_params(cfg) + attention)


def causal_block_share(seq_len: int, block: int) -> float:
    """Share of the chunked attention's (query block, key block) pairs a causal mask lets through when
    T = S = seq_len is cut into n blocks: query block i sees key blocks 0..i, n (n + 1) / 2 of n^2 pairs
    (packed rows skip more: an upper bound)."""
    n = -(-seq_len // block) if block and seq_len > block else 1
    return (n + 1) / (2 * n)
