"""What a conversion carries besides the weights: the facts needed to rebuild the model.

`Converted` is the result of reading any supported format: our parameters plus a complete model
config (`vit_jax.models.get_config` fields: hidden size, heads, layers, patch, GELU kind,
LayerNorm epsilon, pooling), the class names and the image size the position embeddings were
made for. `vit_facts` checks, against the format's capability table (`options`), that one of
our ViTs can be expressed in a PyTorch format and reads off its dimensions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from vit_jax import models
from vit_jax.weights import options
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.tree import flatten

__all__ = [
    "class_names_for",
    "Converted",
    "native_posemb",
    "vit_facts",
    "VitFacts",
]


class Converted(NamedTuple):
    """Parameters with everything needed to rebuild and use the model."""

    params: dict[str, Any]
    model_config: ml_collections.ConfigDict
    class_names: list[str] | None
    image_size: tuple[int, int] | None

    def metadata(self, **extra: Any) -> dict[str, Any]:
        """The JSON sidecar (`vit_jax.checkpoint` format) describing these parameters."""
        return {
            "model": self.model_config.to_dict(),
            "class_names": list(self.class_names) if self.class_names else None,
            "image_size": list(self.image_size) if self.image_size else None,
            **extra,
        }


def native_posemb(
    image_size: tuple[int, int], patch: tuple[int, int], resample: str
) -> dict[str, Any]:
    """The model-config fields of a converted learned position table: its native grid
    (`posemb_grid`, so the model runs at any size divisible by the patch, resampling the table
    on the fly) and the source library's own interpolation (`posemb_resample`)."""
    grid = (int(image_size[0]) // int(patch[0]), int(image_size[1]) // int(patch[1]))
    return dict(posemb_grid=grid, posemb_resample=resample)


@dataclasses.dataclass(frozen=True)
class VitFacts:
    """Dimensions of one of our ViTs, read from its config and parameters."""

    config: ml_collections.ConfigDict
    flat: dict[str, np.ndarray]  # per-layer layout, '/'-joined keys
    hidden: int
    heads: int
    layers: int
    mlp: int
    patch: tuple[int, int]
    image_size: tuple[int, int] | None
    num_prefix_tokens: int
    num_classes: int | None  # None: no head

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid at `image_size` ((0, 0) when none is known: no position table)."""
        if self.image_size is None:
            return 0, 0
        return self.image_size[0] // self.patch[0], self.image_size[1] // self.patch[1]

    @property
    def dims(self) -> dict[str, int]:
        """The dimensions a key table (`vit_jax.weights.table`) is instantiated with."""
        d, (ph, pw) = self.hidden, self.patch
        tokens = self.grid[0] * self.grid[1] + self.num_prefix_tokens
        n = self.num_classes or 0
        return dict(D=d, H=self.heads, hd=d // self.heads, M=self.mlp, ph=ph, pw=pw, T=tokens, N=n)


def vit_facts(
    params: Mapping[str, Any],
    model_config: Any,
    *,
    image_size: int | tuple[int, int] | None,
    can: options.Capabilities,
) -> VitFacts:
    """Checks that the format whose capability table is `can` expresses the model (one error
    naming every option it cannot) and returns the model's dimensions. `image_size` defaults
    to the square grid the position embeddings hold; a model without a learned table (posemb
    'rope', 'sincos2d', 'none') runs at any size, and its `image_size` stays None unless given."""
    config = models.get_config(model_config)
    flat = {k: np.asarray(v) for k, v in flatten(models.unstack_layers(params)).items()}
    num_classes = int(flat["head/kernel"].shape[-1]) if "head/kernel" in flat else None
    options.check(can, config, flat)
    patch = tuple(int(p) for p in config.patches.size)
    hidden = int(config.hidden_size)
    prefix = models.num_posemb_prefix_tokens(config)
    posemb = flat.get("Transformer/posembed_input/pos_embedding")
    if posemb is not None:
        image_size = _image_size(image_size, posemb.shape[1] - prefix, patch)
    elif config.get("posemb", "learn") == "learn":
        raise ConversionError("params have no Transformer/posembed_input/pos_embedding")
    elif image_size is not None:
        image_size = _any_image_size(image_size, patch)
    if can.square and (image_size[0] != image_size[1] or patch[0] != patch[1]):
        options.check(
            can,
            config,
            flat,
            [f"image {image_size} / patch {patch} not square ({can.short} takes square ones)"],
        )
    t = config.transformer
    return VitFacts(
        config=config,
        flat=flat,
        hidden=hidden,
        heads=int(t.num_heads),
        layers=int(t.num_layers),
        mlp=int(t.mlp_dim),
        patch=patch,
        image_size=image_size,
        num_prefix_tokens=prefix,
        num_classes=num_classes,
    )


def _image_size(
    image_size: int | tuple[int, int] | None, tokens: int, patch: tuple[int, int]
) -> tuple[int, int]:
    """`image_size` as (h, w), checked against the grid tokens; None: the square grid."""
    if image_size is None:
        side = int(round(np.sqrt(tokens)))
        if side * side != tokens:
            raise ConversionError(
                f"the position embeddings hold {tokens} grid tokens, not a square grid: "
                "pass the image size (h, w)"
            )
        image_size = (side * patch[0], side * patch[1])
    elif isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = (int(image_size[0]), int(image_size[1]))
    grid = (image_size[0] // patch[0], image_size[1] // patch[1])
    if image_size[0] % patch[0] or image_size[1] % patch[1] or grid[0] * grid[1] != tokens:
        raise ConversionError(
            f"image size {image_size} with patch {patch} does not match the position embeddings' "
            f"{tokens} grid tokens"
        )
    return image_size


def _any_image_size(image_size: int | tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """`image_size` as (h, w) for a model without a position table: divisible by the patch."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    h, w = int(h), int(w)
    if h % patch[0] or w % patch[1]:
        raise ConversionError(f"image size {(h, w)} is not divisible by the patch {patch}")
    return h, w


def class_names_for(num_classes: int | None, class_names: Any) -> list[str] | None:
    """Checks that `class_names` fit the head; None when not given."""
    if class_names is None:
        return None
    names = [str(n) for n in class_names]
    if num_classes is not None and len(names) != num_classes:
        raise ConversionError(f"{len(names)} class names for a head of {num_classes} classes")
    return names
