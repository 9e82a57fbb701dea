"""Device mesh and logical-axis sharding rules (MaxText style).

Parameters carry logical axis names (hsa_jax/layers.py); RULES maps each name to a mesh axis.
An axis whose size does not divide the dimension is left replicated for that parameter.
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


def spec_for(shape, logical_axes, mesh: Mesh) -> P:
    axes = tuple(logical_axes) if logical_axes else (None,) * len(shape)
    out = []
    for dim, name in zip(shape, axes):
        mesh_axis = RULES.get(name)
        out.append(mesh_axis if mesh_axis and dim % mesh.shape[mesh_axis] == 0 else None)
    return P(*out)


def param_shardings(params: nnx.State, mesh: Mesh):
    """NamedSharding for every parameter, from its `logical_axes` metadata."""
    def one(var):
        return var.replace(NamedSharding(mesh, spec_for(var.shape, getattr(var, "logical_axes", None), mesh)))
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
