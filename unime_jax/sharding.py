"""Meshes and the one table that maps logical axis names to mesh axes.

Parameters (see `models.layers`) and activations (`constrain`) are annotated with logical names;
`LOGICAL_RULES` alone decides how they map onto the (data, fsdp, tensor) mesh. A mesh axis that
does not divide a dimension is dropped for that dimension, so tiny test models still shard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes it is split over (in order); None = replicated.
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    # parameters: FSDP shards the model width, tensor parallelism the head/MLP/vocab dims
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    # fused Phi-3 kernels: a column split would separate q/k/v (gate/up) across devices
    "qkv_fused": None,
    "mlp_fused": None,
    "norm": None,
    "patch": None,
    "positions": None,
    "lora_rank": None,
}


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices do not split into mesh {dict(zip(MESH_AXES, sizes, strict=True))}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, {len(devices)} are available"
        )
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for a tensor of `shape` annotated with logical `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[tuple[str, ...] | None] = []
    for name, dim in zip(axes, shape, strict=True):
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in unime_jax.sharding.LOGICAL_RULES")
        chosen: list[str] = []
        for mesh_axis in LOGICAL_RULES.get(name) or () if name else ():
            size = mesh.shape[mesh_axis]
            if mesh_axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(tuple(chosen) if chosen else None)
    return PartitionSpec(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """Sharding of one parameter from its `logical_axes` metadata (replicated when it has none)."""
    shape = var.get_value().shape
    axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A tree like `state` holding the NamedSharding of each variable."""
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside a `jax.set_mesh` context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Rows split over the data axes, everything else replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays (rows concatenated in process order)."""
    out = {}
    for key, value in local.items():
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, global_shape), value, global_shape
        )
    return out


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Place every variable of a state on the sharding its logical axes give."""
    return jax.device_put(state, state_shardings(state, mesh))


def host_array(x: jax.Array | np.ndarray) -> np.ndarray:
    """``x`` whole, as numpy, on this process. When ``x`` is sharded over other hosts' devices
    (fsdp or tensor meshes across processes) it is gathered, a collective that every process
    must enter for the same array; replicated or local arrays are read without one."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
