"""Conversion between the per-layer and the scanned (stacked) parameter layouts.

Per-layer: `Transformer/encoderblock_{i}/...` (Mixer: `MixerBlock_{i}/...`), the published layout.
Scanned: `Transformer/encoderblock/...` with a leading depth axis on every leaf (big_vision's
layout, and what `scan=True` models hold). Both functions work on nested dicts of arrays and leave
everything else untouched, so any checkpoint loads into either kind of model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vit_jax.models.families import block_names

__all__ = ["block_names", "is_stacked", "stack_layers", "unstack_layers"]


def _numbered() -> re.Pattern:
    return re.compile(r"^({})_(\d+)$".format("|".join(map(re.escape, block_names()))))


def _stack(leaves: list[Any]) -> Any:
    return np.stack(leaves) if isinstance(leaves[0], np.ndarray) else jax.numpy.stack(leaves)


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer -> scanned: `X_0 ... X_{L-1}` become one `X` whose leaves have a leading L axis."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    numbered = _numbered()
    for key, value in params.items():
        m = numbered.match(key)
        if m:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = value
        elif isinstance(value, Mapping):
            out[key] = stack_layers(value)
        else:
            out[key] = value
    for name, layers in groups.items():
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{name}_i layers are not numbered 0..L-1: got {sorted(layers)}")
        if name in out:
            raise ValueError(f"params hold both {name!r} and {name}_0...; cannot stack")
        out[name] = jax.tree.map(
            lambda *a: _stack(list(a)), *[layers[i] for i in range(len(layers))]
        )
    return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned -> per-layer: a stacked `X` becomes `X_0 ... X_{L-1}`."""
    out: dict[str, Any] = {}
    names = block_names()
    for key, value in params.items():
        if key in names and isinstance(value, Mapping):
            depth = {leaf.shape[0] for leaf in jax.tree.leaves(value)}
            if len(depth) != 1:
                raise ValueError(
                    f"stacked {key!r} has leaves with different depths: {sorted(depth)}"
                )
            for i in range(depth.pop()):
                out[f"{key}_{i}"] = jax.tree.map(lambda a, i=i: a[i], value)
        elif isinstance(value, Mapping):
            out[key] = unstack_layers(value)
        else:
            out[key] = value
    return out


def is_stacked(params: Mapping[str, Any]) -> bool:
    """True when the tree holds scanned blocks (`encoderblock` / `MixerBlock` without a number)."""
    names = block_names()
    for key, value in params.items():
        if key in names:
            return True
        if isinstance(value, Mapping) and is_stacked(value):
            return True
    return False
