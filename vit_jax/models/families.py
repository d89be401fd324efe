"""Model families: what turns a config into a model, and the layout facts the rest of the code uses.

A family (ViT with its hybrids, MLP-Mixer, ...) is registered once under its `model_type` and
declares, next to its builder and config defaults:

- `no_decay`: regexes over '/'-joined parameter paths that take no weight decay;
- `logical_axes`: (regex, logical axis names of the trailing dimensions) for `vit_jax.sharding`;
- what fitting a checkpoint needs: `stride(config)`, `num_prefix_tokens(config)` (tokens
  before the patches in the sequence), `num_posemb_prefix_tokens(config)` (rows of the position
  table before the grid; default: the same), `token_grid` and the name of the scanned block
  (`scan_block`).

Adding a family is one module that builds a `Family` and calls `register_family` on import (see
`vit_jax/models/vit.py` and `mixer.py`), plus its import in `vit_jax/models/__init__.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

__all__ = [
    "COMMON_DEFAULTS",
    "common_fields",
    "Family",
    "LogicalAxes",
    "get_family",
    "known_families",
    "pair",
    "register_family",
]

LogicalAxes = tuple[tuple[str, tuple[str | None, ...]], ...]

# Config fields shared by every family, with their defaults.
COMMON_DEFAULTS: dict[str, Any] = dict(
    name="",
    model_type="ViT",
    gelu_approximate=True,  # tanh GELU, as the published checkpoints were trained
    layernorm_epsilon=1e-6,  # HF transformers' ViT uses 1e-12
    head_bias_init=0.0,
    scan=False,  # nn.scan over the blocks: one compiled block, a stacked parameter layout
    remat=False,
    remat_policy="nothing_saveable",
    dtype="float32",  # compute dtype, e.g. "bfloat16"
    param_dtype="float32",
)


def common_fields(config: ml_collections.ConfigDict, num_classes: int | None) -> dict[str, Any]:
    """The module fields every family takes from its config: the `COMMON_DEFAULTS` (typed),
    the patch size and the number of classes."""
    return dict(
        num_classes=num_classes,
        patch_size=pair(config.patches.size, "patches.size"),
        gelu_approximate=bool(config.gelu_approximate),
        layernorm_epsilon=float(config.layernorm_epsilon),
        head_bias_init=float(config.head_bias_init),
        scan=bool(config.scan),
        remat=bool(config.remat),
        remat_policy=config.remat_policy,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
    )


def pair(value: Any, field: str) -> tuple[int, int]:
    """An int or an (h, w) pair as an (h, w) tuple; `field` names the value in the error."""
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"{field} must be an int or a pair (h, w), got {value!r}")
    return (int(value[0]), int(value[1]))


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its builder, config defaults and parameter-layout facts.

    `builder(config, num_classes, **overrides)` gets a complete config (`zoo.get_config`);
    `overrides` replace the module fields it derives from the config (e.g. `dtype=...`).
    `defaults` is the complete config template (`COMMON_DEFAULTS` plus the family's fields);
    `optional` the fields that may stay None; `templates` the defaults of nested fields that
    are None until set (the hybrids' `resnet`).
    """

    name: str
    defaults: Mapping[str, Any]
    builder: Callable[..., nn.Module]
    stride: Callable[[ml_collections.ConfigDict], tuple[int, int]]
    num_prefix_tokens: Callable[[ml_collections.ConfigDict], int]
    scan_block: str
    no_decay: tuple[str, ...]
    logical_axes: LogicalAxes
    optional: frozenset[str] = frozenset()
    # Types of the optional fields whose default is None, so `--config.model.X=...` can set them
    # (ml_collections overrides only typed fields).
    optional_types: Mapping[str, type] = dataclasses.field(default_factory=dict)
    templates: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    num_posemb_prefix_tokens: Callable[[ml_collections.ConfigDict], int] | None = None

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


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Registers `family` under its `name` (the config's `model_type`); returns it."""
    if family.name in _REGISTRY and _REGISTRY[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def known_families() -> list[str]:
    """The registered `model_type`s: the default one (ViT) first, then in registration order.

    A fixed order, whichever module was imported first (errors, sharding rules, layouts).
    """
    _load_builtin()
    default = COMMON_DEFAULTS["model_type"]
    return sorted(_REGISTRY, key=lambda name: name != default)


def get_family(model_type: str) -> Family:
    """The family registered as `model_type`; an error listing the known ones."""
    _load_builtin()
    if model_type not in _REGISTRY:
        known = ", ".join(repr(k) for k in known_families())
        raise ValueError(f"unknown model_type {model_type!r}; known: {known}")
    return _REGISTRY[model_type]


def _load_builtin() -> None:
    """Imports the built-in families (they register themselves on import)."""
    import vit_jax.models  # noqa: F401
