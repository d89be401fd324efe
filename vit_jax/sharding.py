"""Device mesh and partition rules: data-parallel, FSDP and tensor-parallel from one mechanism.

The mesh has three axes, `data`, `fsdp` and `model`. The batch is split over `('data', 'fsdp')`.
Every parameter (and every optimizer-state leaf that mirrors one) gets a `PartitionSpec` from:

1. logical axis names, found by regex on its path (`.../query/kernel` -> `(embed, heads, kv)`)
   from the model family's rules (the family table, `vit_jax.models.families`; Mixer: its
   token- and channel-mixing MLPs), of which `heads` and `mlp` map onto the `model` axis
   (Megatron-style tensor parallelism of attention heads and the MLP hidden dimension);
2. FSDP: the largest remaining dimension divisible by the `fsdp` axis size is split over `fsdp`.

So the mesh shape alone selects the strategy: `data=-1` is pure data parallelism (parameters
replicated), `fsdp=N` shards parameters and optimizer state N ways, `model=M` splits heads/MLP.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "BATCH_AXES",
    "LOGICAL_TO_MESH",
    "MESH_AXES",
    "TENSOR_PARALLEL",
    "batch_sharding",
    "default_rules",
    "describe",
    "make_mesh",
    "partition_spec",
    "path_str",
    "put_sharded",
    "replicated",
    "to_host",
    "tree_shardings",
]


MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

LogicalAxes = tuple[tuple[str, tuple[str | None, ...]], ...]


def default_rules() -> LogicalAxes:
    """Every model family's (path regex, logical axes) rules, in family-table order.

    Each family's rules are a row of the family table (`vit_jax.models.families`); their patterns
    name family-specific modules, so the union shards any family's parameters (and the optimizer
    state that mirrors them) as that family's rules say. A leading scan axis stays unsharded.
    """
    from vit_jax.models import families

    return families.logical_axes()


LOGICAL_TO_MESH = {"heads": "model", "mlp": "model"}
TENSOR_PARALLEL = {"heads": "the attention heads", "mlp": "the MLP hidden dimension"}


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, model) mesh over all devices; one axis may be -1 to take the rest."""
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp, model]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} model={model}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices cannot be split into mesh data={data} fsdp={fsdp} "
                f"model={model}: {len(devices)} is not divisible by {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x model={sizes[2]} = {math.prod(sizes)} "
            f"devices, but {len(devices)} are available"
        )
    device_grid = np.asarray(devices).reshape(sizes)
    return Mesh(device_grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over the data and fsdp axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def path_str(path) -> str:
    """'a/b/c' for a jax tree path (dict keys, attributes, sequence indices)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def partition_spec(
    path: str, shape: tuple[int, ...], mesh: Mesh, rules: LogicalAxes | None = None
) -> PartitionSpec:
    """The spec for one array: tensor-parallel axes from its name, then FSDP on what is left.

    `rules` are (path regex, logical axes) pairs, the first match wins; None: `default_rules()`
    (every registered family's, e.g. `vit_jax.models.logical_axes(config)` for one family).
    Raises ValueError when `mesh.model` > 1 does not divide the heads / MLP dimension it splits.
    """
    spec: list[str | None] = [None] * len(shape)
    model_size = mesh.shape["model"]
    for pattern, logical in default_rules() if rules is None else rules:
        if re.search(pattern, path) and len(shape) >= len(logical):
            offset = len(shape) - len(logical)
            for i, name in enumerate(logical):
                axis = LOGICAL_TO_MESH.get(name)
                if not axis or model_size == 1:
                    continue
                if shape[offset + i] % model_size:
                    what = "num_heads" if name == "heads" else "mlp_dim"
                    raise ValueError(
                        f"{what}={shape[offset + i]} is not divisible by the mesh's model axis "
                        f"(mesh.model={model_size}), which splits {TENSOR_PARALLEL[name]} "
                        f"(array {path} of shape {tuple(shape)}); choose a mesh.model that "
                        f"divides {what}"
                    )
                spec[offset + i] = axis
            break
    fsdp_size = mesh.shape["fsdp"]
    if fsdp_size > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp_size == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: LogicalAxes | None = None) -> Any:
    """NamedShardings for every array leaf of `tree` (params, optimizer state, train state)."""
    rules = default_rules() if rules is None else rules

    def leaf(path, x):
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, partition_spec(path_str(path), shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def describe(shardings: Mapping[str, Any]) -> dict[str, str]:
    """`{path: spec}` for logging/tests."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {path_str(p): str(s.spec) for p, s in flat}


# ----------------------------------------------------------------------------- host <-> device


def put_sharded(tree: Any, shardings: Any) -> Any:
    """Host numpy arrays (identical on every process) -> global arrays with these shardings.

    Each process places only the shards its devices hold, so no process needs the others' data.
    """

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (gathering what other processes hold)."""

    def get(x):
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)
