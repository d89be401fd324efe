"""What a model family is: the `Family` record and the layer-decay rule that reads a family's
block and embedding names. A family's options are declared once, on its module
(`vit_jax.models.typed_config`), and its config template and builder derived from them.

The families themselves (ViT with its hybrids, MLP-Mixer, and any registered at run time) are
listed in one static table, `vit_jax.models.families`. This module imports no family, so the
family modules (`vit.py`, `mixer.py`) build on it and the table imports them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

__all__ = [
    "Family",
    "LogicalAxes",
    "layer_ids",
    "pair",
]

LogicalAxes = tuple[tuple[str, tuple[str | None, ...]], ...]


def pair(value: Any, field: str) -> tuple[int, int]:
    """An int or an (h, w) pair as an (h, w) tuple; `field` names the value in the error."""
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"{field} must be an int or a pair (h, w), got {value!r}")
    return (int(value[0]), int(value[1]))


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its builder, config schema and parameter-layout facts.

    Config: `builder(config, num_classes, **overrides)` gets a complete config
    (`zoo.get_config`); `overrides` replace the module fields it derives from the config (e.g.
    `dtype=...`). `defaults` is the complete config template; `optional` the fields that may
    stay None; `optional_types` the types of those whose default is None (so
    `--config.model.X=...` can set them: ml_collections overrides only typed fields);
    `templates` the defaults of nested fields that are None until set (the hybrids' `resnet`).
    The built-in families derive all four from their option declarations
    (`typed_config.Schema`).

    Fitting a checkpoint (`weights.fit`): `stride(config)` (input pixels per token),
    `num_prefix_tokens(config)` (tokens before the patches in the sequence),
    `num_posemb_prefix_tokens(config)` (rows of the position table before the grid; None: the
    same), `tokens_param` (a parameter whose first dimension is the number of patch tokens,
    for a family without a position table: Mixer's token-mixing kernel).

    Parameter layout ('/'-joined paths): `scan_block` (blocks are `{scan_block}_{i}`, or one
    `{scan_block}` with a leading depth axis when scanned); `embedding` (regexes of what comes
    before the first block: layer 0 of layer-wise lr decay); `no_decay` (regexes of what takes
    no weight decay); `logical_axes` ((regex, logical names of the trailing dimensions) for
    `vit_jax.sharding`).
    """

    name: str
    defaults: Mapping[str, Any]
    builder: Callable[..., nn.Module]
    stride: Callable[[ml_collections.ConfigDict], tuple[int, int]]
    num_prefix_tokens: Callable[[ml_collections.ConfigDict], int]
    scan_block: str
    no_decay: tuple[str, ...]
    logical_axes: LogicalAxes
    embedding: tuple[str, ...] = ()
    optional: frozenset[str] = frozenset()
    optional_types: Mapping[str, type] = dataclasses.field(default_factory=dict)
    templates: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    num_posemb_prefix_tokens: Callable[[ml_collections.ConfigDict], int] | None = None
    tokens_param: str | None = None

    def posemb_prefix_tokens(self, config: ml_collections.ConfigDict) -> int:
        """Rows of the position table before the grid (`num_prefix_tokens` unless declared)."""
        if self.num_posemb_prefix_tokens is None:
            return self.num_prefix_tokens(config)
        return self.num_posemb_prefix_tokens(config)

    def build(
        self, config: ml_collections.ConfigDict, num_classes: int | None, **overrides: Any
    ) -> nn.Module:
        """The Flax module for a complete config; `num_classes` None/0: no head."""
        if config.model_type != self.name:
            raise ValueError(
                f"config has model_type {config.model_type!r}; family {self.name!r} builds only "
                f"its own"
            )
        return self.builder(config, num_classes, **overrides)

    def token_grid(
        self, config: ml_collections.ConfigDict, image_size: int | tuple[int, int]
    ) -> tuple[int, int]:
        """(grid_h, grid_w) of patch tokens for `image_size`; an error when not divisible."""
        h, w = pair(image_size, "image_size")
        sh, sw = self.stride(config)
        if h % sh or w % sw:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch stride {sh}x{sw} of model "
                f"{config.get('name') or self.name!r}"
            )
        return h // sh, w // sw

    def layer_ids(self, params: Any) -> tuple[Any, int]:
        """`layer_ids(params, (self.scan_block,), self.embedding)`."""
        return layer_ids(params, (self.scan_block,), self.embedding)


def layer_ids(params: Any, block_names: Sequence[str], embedding: Sequence[str]) -> tuple[Any, int]:
    """(tree of layer indices, L): the layer-wise lr decay layer of every parameter.

    `params`: arrays or shapes (paths and, for scanned blocks, leading sizes are read). With L
    blocks, an `embedding` match is layer 0, a leaf of block `{name}_{i}` layer i + 1 (an int),
    a leaf of a scanned block `{name}` the int array 1..L shaped (L, 1, ...), anything else
    (final norm, heads) layer L + 1. L: the number of blocks found in `params`.
    """
    alternatives = "|".join(re.escape(n) for n in block_names)
    numbered = re.compile(rf"(^|/)({alternatives})_(\d+)/")
    stacked = re.compile(rf"(^|/)({alternatives})/")
    embedding_rules = [re.compile(p) for p in embedding]
    depths = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if m := numbered.search(name):
            depths.add(int(m.group(3)) + 1)
        elif stacked.search(name):
            depths.add(int(leaf.shape[0]))
    num_layers = max(depths, default=0)

    def layer(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if m := numbered.search(name):
            return int(m.group(3)) + 1
        if stacked.search(name):
            n = int(leaf.shape[0])
            return np.arange(1, n + 1).reshape((n,) + (1,) * (len(leaf.shape) - 1))
        if any(rule.search(name) for rule in embedding_rules):
            return 0
        return num_layers + 1

    return jax.tree_util.tree_map_with_path(layer, params), num_layers
