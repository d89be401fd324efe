"""A PyTorch format as data, with the one path that reads it and the one path that writes it.

A `Codec` is a format's key table (`table.Table`: which parameter is which), its capability
table (`options.Capabilities`: which model options it expresses, under what names) and the few
functions neither table can say: the format's own config (a transformers `config.json`, timm's
constructor arguments), its files, and any structural rows (a classifier, a class token).
`write` takes every format the same way: check the model against the capability table, turn
the options it has into key-table features, run the key table, add the config entries the
capability rows name, save. `read` is its mirror: a format's reader parses its config and keys
into a `Parsed` record (dimensions, features, options found, our other config fields) and
`read` runs the key table and builds our model config from it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
from etils import epath

from vit_jax import models
from vit_jax.weights import options
from vit_jax.weights.facts import Converted, VitFacts, class_names_for, native_posemb, vit_facts
from vit_jax.weights.table import Table
from vit_jax.weights.tree import unflatten

__all__ = ["Codec", "Parsed", "read", "write"]


def _none(f: VitFacts) -> Iterable[str]:
    return ()


@dataclasses.dataclass(frozen=True)
class Codec:
    """One format: its two tables and what they cannot say."""

    can: options.Capabilities
    table: Table
    # (facts, class names) -> the format's config, before the capability rows' entries
    config: Callable[[VitFacts, list[str] | None], dict[str, Any]]
    # (state, config, path, facts, class names, normalization=, image_size=, overwrite=) -> path
    save: Callable[..., epath.Path]
    features: Callable[[VitFacts], Iterable[str]] = _none  # key-table rows beyond the options
    state: Callable[[VitFacts, dict[str, Any]], dict[str, Any]] | None = None  # after the table


def write(
    codec: Codec,
    params: Mapping[str, Any],
    model_config: Any,
    path: Any,
    *,
    class_names: list[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
    source: str = "params",
    normalization: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes one of our ViTs in `codec`'s format; what it cannot express is one error."""
    f = vit_facts(params, model_config, image_size=image_size, can=codec.can)
    names = class_names_for(f.num_classes, class_names)
    on = {*options.features(codec.can, f.config, f.flat), *codec.features(f)}
    dims = {**f.dims, "M2": 2 * f.mlp, "NR": options.num_registers(f.config)}
    dims["R"] = int(f.config.get("representation_size") or 0)
    keys = codec.table.at(layers=f.layers, dims=dims, features=on)
    state = keys.to_theirs(f.flat, source=source, what=f"a {f.config.name or 'ViT'} of this config")
    if codec.state is not None:
        state = codec.state(f, state)
    config = {**codec.config(f, names), **options.their_config(codec.can, f)}
    return codec.save(
        state,
        config,
        path,
        f,
        names,
        normalization=normalization,
        image_size=image_size,
        overwrite=overwrite,
    )


class Parsed(NamedTuple):
    """What a format's reader found in its config and keys, for `read`."""

    name: str
    layers: int
    dims: dict[str, int]  # D H hd M ph pw T, and N R NR M2 where the rows need them
    features: set[str]  # the key table's optional rows present
    image_size: tuple[int, int]
    resample: str  # the library's own position-table interpolation (`posemb_resample`)
    values: Mapping[str, Any] = {}  # capability option -> its value (`options.our_config`)
    fields: Mapping[str, Any] = {}  # our other model-config fields (nested dicts merge)
    class_names: list[str] | None = None
    zeros: tuple[str, ...] = ()  # features their file leaves out and ours holds as zeros
    ignore: Mapping[str, Iterable[str]] | None = None  # {reason: their keys left unused}


def read(codec: Codec, state: Mapping[str, Any], p: Parsed, *, source: str, what: str) -> Converted:
    """Our parameters and model config from a format's state dict and what its reader parsed."""
    keys = codec.table.at(layers=p.layers, dims=p.dims, features=p.features, zeros=p.zeros)
    flat = keys.to_ours(state, source=source, what=what, ignore=p.ignore)
    patch = (p.dims["ph"], p.dims["pw"])
    spec: dict[str, Any] = dict(
        name=p.name,
        patches=dict(size=patch),
        hidden_size=p.dims["D"],
        transformer=dict(mlp_dim=p.dims["M"], num_heads=p.dims["H"], num_layers=p.layers),
        **native_posemb(p.image_size, patch, p.resample),
    )
    for extra in (p.fields, options.our_config(codec.can, p.features, p.values)):
        _merge(spec, extra)
    params = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    return Converted(params, models.get_config(spec), p.class_names, p.image_size)


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:  # a copy: the reader's record stays as it was
            into[key] = copy.deepcopy(value)
