"""Attention kernels that XLA cannot partition, run on each device's shard of the mesh.

A Pallas kernel (splash) sees only the arrays it is given: traced under `jax.jit` on global
arrays, it would run on the whole batch, which XLA then gathers to every device or fails to
partition. cuDNN's fused attention partitions itself only when q, k and v share one sharding
with neither the sequence nor head_dim split, which XLA's propagation does not promise (query
heads split where their fewer K/V heads are not break it). So each runs inside `jax.shard_map`
over the mesh in context (`jax.set_mesh`, or `jax.sharding.use_abstract_mesh` inside a traced
function, as the train and eval steps do): the batch split over the data-parallel axes, heads
over "tensor" when it divides the KV heads (a query head's group must sit on the device that
holds its K/V), else replicated there. With no mesh in context the kernel runs as it is.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from hammer.errors import HammerError

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def per_shard(kernel: Callable, q, k, v, mesh: Mesh | AbstractMesh | None = None, *,
              segment_ids=None):
    """`kernel(q, k, v)` on each shard of `mesh` (default: the one in context), q [b, t, heads, d],
    k/v [b, s, kv_heads, d] -> [b, t, heads, d]; with `segment_ids` [b, t],
    `kernel(q, k, v, segment_ids)`, the ids split as the batch."""
    args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(*args)
    batch_axes = tuple(axis for axis in BATCH_AXES if axis in mesh.shape)
    batch_shards = math.prod(mesh.shape[axis] for axis in batch_axes)
    if q.shape[0] % batch_shards:
        raise HammerError(f"batch {q.shape[0]} does not split over mesh axes {batch_axes} "
                          f"of {batch_shards} devices")
    head_shards = mesh.shape.get(HEAD_AXIS, 1)
    head_axis = HEAD_AXIS if head_shards > 1 and k.shape[2] % head_shards == 0 else None
    spec = PartitionSpec(batch_axes or None, None, head_axis, None)
    specs = (spec, spec, spec, PartitionSpec(batch_axes or None, None))[:len(args)]
    if all(axis_type == AxisType.Explicit for axis_type in mesh.axis_types):
        # Explicit sharding is part of the type, which shard_map checks rather than converts.
        args = tuple(jax.reshard(x, NamedSharding(mesh, s)) for x, s in zip(args, specs))
    # check_vma=False: a pallas_call (or cuDNN's custom call) declares no varying mesh axes.
    local = jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)
    return local(*args)
