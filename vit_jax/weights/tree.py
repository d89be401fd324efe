"""Parameter trees <-> flat '/'-joined dicts (the published `.npz` keys)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vit_jax.weights.errors import CheckpointError

__all__ = ["flatten", "unflatten"]


def flatten(tree: Mapping[str, Any], prefix: str = "", *, sep: str = "/") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x} (keys joined by `sep`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}{sep}", sep=sep))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}; a key that is both a leaf and a prefix is an error."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CheckpointError(
                    f"key {key!r} nests under the array {'/'.join(parents[: i + 1])!r}"
                )
        if leaf in node:
            raise CheckpointError(f"key {key!r} is both an array and a group of arrays")
        node[leaf] = value
    return tree
