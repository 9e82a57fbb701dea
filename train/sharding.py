"""Device mesh and logical-axis sharding rules (MaxText style).

Parameters carry logical axis names (hsa_jax/common/layers.py); RULES maps each name to a mesh axis, and a run
config's `mesh.rules` overrides entries (e.g. `mesh.rules={vocab: fsdp}`). An axis whose size does not
divide the dimension is left replicated for that parameter; `unsharded_report` lists those cases so a
run says what it could not shard.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hsa_jax.common.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
RULES = {
    "embed": "fsdp",
    "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor", "retrieval": "tensor",
    "head_dim": None, "norm": None, None: None,
}
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes


def merge_rules(overrides: dict | None) -> dict:
    """RULES with a run config's overrides; ConfigError for an unknown logical or mesh axis."""
    rules = dict(RULES)
    for name, axis in (overrides or {}).items():
        if name not in RULES:
            raise ConfigError(f"config field mesh.rules has unknown logical axis {name!r}; allowed: "
                              f"{sorted(k for k in RULES if k)}")
        if axis is not None and axis not in MESH_AXES:
            raise ConfigError(f"config field mesh.rules.{name}={axis!r} is invalid: must be one of {MESH_AXES} "
                              f"or null (replicated)")
        rules[name] = axis
    return rules


def make_mesh(data: int, fsdp: int, tensor: int, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one axis may be -1 (fill)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                          f"{len(devices)} are available; set one axis to -1 to fill")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def spec_for(shape, logical_axes, mesh: Mesh, rules: dict = RULES) -> P:
    axes = tuple(logical_axes) if logical_axes else (None,) * len(shape)
    out = []
    for dim, name in zip(shape, axes):
        mesh_axis = rules.get(name)
        out.append(mesh_axis if mesh_axis and dim % mesh.shape[mesh_axis] == 0 else None)
    return P(*out)


def param_shardings(params: nnx.State, mesh: Mesh, rules: dict = RULES):
    """NamedSharding for every parameter, from its `logical_axes` metadata."""
    def one(var):
        return var.replace(NamedSharding(mesh, spec_for(var.shape, getattr(var, "logical_axes", None), mesh, rules)))
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def unsharded_report(params: nnx.State, mesh: Mesh, rules: dict = RULES) -> list[str]:
    """'path: dim i (size n, logical axis a) not divisible by mesh axis m (k)' for every parameter
    dimension that a rule shards but whose size does not divide, so it stays replicated."""
    out = []
    for path, var in nnx.to_flat_state(params):
        for i, (dim, name) in enumerate(zip(var.shape, getattr(var, "logical_axes", None) or ())):
            axis = rules.get(name)
            if axis and mesh.shape[axis] > 1 and dim % mesh.shape[axis]:
                out.append(f"{'.'.join(map(str, path))}: dim {i} (size {dim}, logical axis {name}) not divisible "
                           f"by mesh axis {axis} ({mesh.shape[axis]})")
    return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_bxL: np.ndarray, sharding: NamedSharding, row_start: int) -> jax.Array:
    """The global (B, L) batch array from this process's rows [row_start, row_start + b) (the block
    `make_loader` reads for it). Every device's shard must lie in that block: the mesh is laid out with
    each process's devices contiguous along the batch axes, as `make_mesh` does with jax.devices()."""
    b, L = local_bxL.shape
    B = b * jax.process_count()

    def shard(index):
        rows = index[0]
        start, stop = rows.start or 0, B if rows.stop is None else rows.stop
        if start < row_start or stop > row_start + b:
            raise ValueError(f"device shard rows {start}:{stop} are outside process {jax.process_index()}'s "
                             f"batch rows {row_start}:{row_start + b}: each process's devices must hold a contiguous "
                             f"block of the batch axes (mesh.tensor may not span processes)")
        return local_bxL[start - row_start:stop - row_start]

    return jax.make_array_from_callback((B, L), sharding, shard)


def place(value, sharding: NamedSharding) -> jax.Array:
    """A value every process holds whole (host or local-device memory) as the global array `sharding`
    describes: each addressable device receives its slice (checkpoints of a multi-process run can only
    hold global arrays)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(value, mesh: Mesh) -> jax.Array:
    """A host value (the same on every process) replicated over the mesh."""
    return place(np.asarray(value), replicated(mesh))
