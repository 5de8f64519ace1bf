"""Meshes and logical-axis sharding.

Model code names only *logical* axes (`embed`, `heads`, `exp`, `act_batch`, ...). A rule table — data in the
config — maps each logical axis to zero, one or several *mesh* axes (`data`, `fsdp`, `expert`, `tensor`).
`logical_to_spec` resolves a leaf's axes and fails with a message naming the leaf when two logical axes claim
the same mesh axis or a dimension does not divide the mesh size. Activations are constrained through
`constrain`, a no-op unless a mesh and rules are active (`use_rules`), so the model runs unchanged on one device.

The mesh is built from ICI sizes (within a slice) and DCN sizes (across slices); -1 means "whatever is left".
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Default logical -> mesh rules: FSDP over `embed`, tensor parallelism over heads/MLP/vocab, experts over `expert`,
# the batch over every data-like axis. A rule value is a mesh axis name, a tuple of names, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("q_lora", None),
    ("kv_lora", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("exp_mlp", "tensor"),
    ("norm", None),
    ("cache_batch", ("data", "fsdp", "expert")),
)


class ShardingError(ValueError):
    pass


def resolve_mesh_shape(sizes: Mapping[str, int], n_devices: int, what: str) -> dict[str, int]:
    """Fill the single -1 entry so the product equals n_devices; fail clearly otherwise."""
    sizes = {k: int(v) for k, v in sizes.items()}
    fills = [k for k, v in sizes.items() if v == -1]
    if len(fills) > 1:
        raise ShardingError(f"{what}: at most one axis may be -1, got {fills}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fills:
        if n_devices % known:
            raise ShardingError(f"{what}: {n_devices} devices not divisible by the fixed axes {sizes} (product {known})")
        sizes[fills[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ShardingError(f"{what}: axis sizes {sizes} multiply to {math.prod(sizes.values())}, expected {n_devices} devices")
    return sizes


def make_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh with axes MESH_AXES. `ici` sizes are per slice; `dcn` sizes multiply them across slices.

    Example: ici={"fsdp": -1, "tensor": 4}, dcn={"data": 2} on 2 slices of 64 chips -> data 2, fsdp 16, tensor 4.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = dict(dcn or {})
    unknown = [k for k in list(ici) + list(dcn) if k not in MESH_AXES]
    if unknown:
        raise ShardingError(f"unknown mesh axis names {unknown}; known: {MESH_AXES}")
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    dcn_sizes = resolve_mesh_shape({a: dcn.get(a, 1) for a in MESH_AXES}, n_slices, "mesh.dcn")
    per_slice = len(devices) // n_slices
    ici_sizes = resolve_mesh_shape({a: ici.get(a, 1) for a in MESH_AXES}, per_slice, "mesh.ici")
    ici_shape = [ici_sizes[a] for a in MESH_AXES]
    dcn_shape = [dcn_sizes[a] for a in MESH_AXES]
    if n_slices > 1:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
    else:
        shape = [i * d for i, d in zip(ici_shape, dcn_shape)]
        try:
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # CPU / fake devices have no physical topology to respect
            arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _as_tuple(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    return tuple(v)


def logical_to_spec(axes: Sequence[str | None], rules, mesh: Mesh | None = None, shape=None, name: str = "?") -> P:
    """PartitionSpec for a leaf with logical `axes`. Checks collisions and (given mesh+shape) divisibility."""
    table = dict(rules)
    used: dict[str, str] = {}
    out = []
    for i, ax in enumerate(axes):
        if ax is None:
            out.append(None)
            continue
        if ax not in table:
            raise ShardingError(f"{name}: logical axis {ax!r} has no sharding rule; add it to the rules (known: {sorted(table)})")
        mesh_axes = tuple(m for m in _as_tuple(table[ax]) if mesh is None or mesh.shape.get(m, 1) > 1)
        for m in mesh_axes:
            if m in used:
                raise ShardingError(f"{name}: mesh axis {m!r} used by both logical axes {used[m]!r} and {ax!r} (axes {tuple(axes)})")
            used[m] = ax
        if mesh is not None and shape is not None and mesh_axes:
            n = math.prod(mesh.shape[m] for m in mesh_axes)
            if shape[i] % n:
                raise ShardingError(
                    f"{name}: dimension {i} ({ax!r}) of shape {tuple(shape)} is {shape[i]}, not divisible by "
                    f"mesh axes {mesh_axes} of total size {n}; change the rule for {ax!r} or the mesh")
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*out)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules):
    """NamedShardings for a pytree of logical axes (leaves: tuples) with matching shapes (leaves: tuples)."""
    flat_axes, treedef = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = treedef.flatten_up_to(shapes_tree)
    out = []
    for (path, axes), shape in zip(flat_axes, flat_shapes):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        out.append(NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape, name)))
    return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------------------- activation constraints

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("r1jax_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules):
    """Activate (mesh, rules) for `constrain` calls made while tracing inside this context."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x, axes: Sequence[str | None]):
    """with_sharding_constraint by logical axes when rules are active; identity otherwise."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules, mesh)
    # A dimension that does not divide (e.g. batch 1 at decode) stays replicated rather than failing.
    spec = P(*[s if s is None or x.shape[i] % math.prod(mesh.shape[m] for m in _as_tuple(s)) == 0 else None
               for i, s in enumerate(spec)])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

