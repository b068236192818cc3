"""Placing the Llama's parameters on a device mesh from their logical axis names.

One table maps each logical weight axis to a mesh axis (MaxText's idea, without its hundred
order-dependent rules). Mesh axes: "data" (pure data parallel, weights replicated), "fsdp"
(data parallel with weights sharded over "embed", ZeRO-3 style) and "tensor" (Megatron-style
tensor parallel over heads and the MLP). Activations are left to XLA's propagation.
"""
from __future__ import annotations

import warnings
from typing import Mapping

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from hammer.train_config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
RULES: Mapping[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,  # every device runs every layer; pipeline stages would shard this
}


def make_mesh(axis_sizes: Mapping[str, int] | MeshConfig) -> Mesh:
    """A mesh over all devices, e.g. {"data": 2, "fsdp": 2, "tensor": 2}; -1 takes the rest. A mesh
    that leaves a device idle or needs more devices than there are is refused (ConfigError)."""
    if not isinstance(axis_sizes, MeshConfig):
        unknown = set(axis_sizes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
        axis_sizes = MeshConfig(**{axis: axis_sizes.get(axis, 1) for axis in MESH_AXES})
    sizes = axis_sizes.resolve(jax.device_count())
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names, rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    """Logical axis names -> PartitionSpec; two axes of one array on one mesh axis is an error."""
    spec = []
    for name in names:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        axis = None if name is None else rules[name]
        if axis is not None and axis in spec:
            raise ValueError(f"logical axes {tuple(names)} put mesh axis {axis!r} on two dimensions")
        spec.append(axis)
    return PartitionSpec(*spec)


def param_sharding(variable: nnx.Variable, mesh: Mesh, rules=RULES) -> NamedSharding:
    """The NamedSharding of one parameter. A dimension its mesh axis does not divide (one KV
    head on a 2-way tensor axis, an odd vocabulary) is replicated rather than refused;
    `model_shardings` warns about it."""
    return NamedSharding(mesh, PartitionSpec(*_fitted_spec(variable, mesh, rules)[0]))


def _fitted_spec(variable: nnx.Variable, mesh: Mesh, rules) -> tuple[list, list[str]]:
    """(spec, notes): the rule's spec with undividable dimensions replicated, and a note for each."""
    names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    spec, notes = [], []
    for name, axis, size in zip(names, logical_to_spec(names, rules), variable.shape):
        if axis is not None and size % mesh.shape[axis]:
            notes.append(f"{name} {size} over {axis} {mesh.shape[axis]}")
            axis = None
        spec.append(axis)
    return spec, notes


def model_shardings(model: nnx.Module, mesh: Mesh, rules=RULES) -> nnx.State:
    """The model's state with each Variable replaced by its NamedSharding. One warning names
    every parameter left replicated along a dimension its mesh axis does not divide."""
    state = nnx.state(model)
    replicated = []
    for path, variable in nnx.to_flat_state(state):
        notes = _fitted_spec(variable, mesh, rules)[1]
        if notes:
            replicated.append(f"{'.'.join(map(str, path))} ({', '.join(notes)})")
    if replicated:
        warnings.warn(f"{len(replicated)} parameters are replicated along a dimension their mesh "
                      f"axis does not divide: {'; '.join(replicated)}", stacklevel=2)
    return jax.tree.map(lambda v: param_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
