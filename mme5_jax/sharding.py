"""Logical-axis sharding: one rules table (mme5_jax/configs/sharding.yaml) maps logical names onto the mesh.

Meshes have the axes ("data", "fsdp", "tensor"). Frozen weights are FSDP-sharded on `embed`, tensor-parallel on
heads/mlp; batches are split over data x fsdp.
"""
import math

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mme5_jax.configs import bundled_config

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES_FILE = str(bundled_config("sharding.yaml"))


def load_rules(path: str = DEFAULT_RULES_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        rules = (yaml.safe_load(f) or {}).get("logical_axis_rules")
    if not isinstance(rules, dict):
        raise ValueError(f"{path}: expected a 'logical_axis_rules' mapping")
    for name, axes in rules.items():
        for axis in _as_tuple(axes):
            if axis not in MESH_AXES:
                raise ValueError(f"{path}: logical axis {name!r} maps to unknown mesh axis {axis!r}; "
                                 f"mesh axes are {MESH_AXES}")
    return rules


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over all devices; -1 on `data` takes whatever the other axes leave."""
    devices = jax.devices() if devices is None else devices
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices are not divisible by fsdp*tensor = {fsdp * tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {data * fsdp * tensor} devices, "
                         f"have {len(devices)}")
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _as_tuple(axes):
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)


def logical_to_spec(logical_axes, shape, mesh, rules) -> PartitionSpec:
    """PartitionSpec for a tensor of `shape` tagged `logical_axes`; undivisible or reused mesh axes replicate."""
    used, spec = set(), []
    for name, size in zip(logical_axes, shape):
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule in the sharding table")
        axes = tuple(a for a in _as_tuple(rules[name]) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def state_shardings(state, mesh, rules=None):
    """NamedShardings for an NNX state (or abstract state) from each variable's `logical_axes` metadata."""
    rules = load_rules() if rules is None else rules

    def sharding(variable):
        axes = variable.get_metadata("logical_axes", None) or (None,) * len(variable.shape)
        spec = logical_to_spec(axes, variable.shape, mesh, {**rules, None: None})
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_rows(mesh, rules=None):
    """The mesh axes that split a batch's rows: the `batch` rule's axes of size > 1, as one PartitionSpec entry."""
    rules = load_rules() if rules is None else rules
    axes = tuple(a for a in _as_tuple(rules.get("batch")) if mesh.shape.get(a, 1) > 1)
    return (axes if len(axes) > 1 else axes[0]) if axes else None


def batch_sharding(mesh, rules=None, lead: int = 0) -> NamedSharding:
    """Rows (dimension `lead`) split over the `batch` rule's mesh axes; every other dimension replicated.

    The one place a batch's placement is decided: the pipeline, the train step, the embedder and the benchmarks
    all use it, so changing the rules table moves every batch alike.
    """
    return NamedSharding(mesh, PartitionSpec(*([None] * lead), batch_rows(mesh, rules)))


def batch_divisor(mesh, rules=None) -> int:
    rules = load_rules() if rules is None else rules
    return int(np.prod([mesh.shape.get(a, 1) for a in _as_tuple(rules.get("batch"))]))
