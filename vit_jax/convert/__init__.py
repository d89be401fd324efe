"""Converting weights between formats: our `.npz`, Hugging Face transformers and timm.

    python -m vit_jax.convert SRC DST [--model NAME] [--resolution H[xW]] [--num-heads N]
        [--overwrite]

Reading and writing are `vit_jax.weights.open` and `vit_jax.weights.save`; the format of each
side follows from its name (`vit_jax.weights.format_of`): a directory is a transformers model
(`config.json` + `model.safetensors`) or a trainer run, a `.safetensors` (or, reading only, a
weights-only `.bin` / `.pth`) file is a timm state dict, an `.npz` is ours with a JSON sidecar
(`x.json`: model config, class names, image size). So a converted file carries what is needed
to rebuild the model. Never unpickles. Never clobbers: DST is written beside itself and renamed
into place whole, and an existing DST is refused unless `overwrite` (then replaced whole).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from etils import epath

# The weights layer (jax, TensorFlow) is imported inside the functions: `python -m
# vit_jax.convert` runs this package first, and parses its flags before anything heavy loads.

__all__ = ["convert", "describe"]


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    model: str | None = None,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    layout: str = "vit_jax",
    overwrite: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], epath.Path, str]:
    """Reads `src`, writes `dst`; returns (params, metadata, written path, its format).

    `dst` is written whole or not at all; an existing one is refused before `src` is read
    (`weights.DestinationExistsError`) unless `overwrite`, which replaces it whole.
    """
    from vit_jax import weights
    from vit_jax.weights.errors import ConversionError

    if os.path.abspath(str(src)) == os.path.abspath(str(dst)):
        raise ConversionError(f"{src}: source and destination are the same")
    weights.check_destination(dst, overwrite=overwrite)
    params, meta = weights.open(src, model=model, num_heads=num_heads, image_size=image_size)
    if not meta.get("model"):
        raise ConversionError(
            f"{src}: the file does not say which model it holds (no JSON sidecar); "
            "pass --model NAME (e.g. ViT-B_16)"
        )
    out, kind = weights.save(params, meta, dst, source=str(src), layout=layout, overwrite=overwrite)
    return params, meta, out, kind


def describe(params: dict[str, Any], metadata: dict[str, Any]) -> str:
    """One line naming the architecture facts of converted weights."""
    from vit_jax import models, weights

    cfg: Any = models.get_config(metadata["model"])
    count = sum(int(getattr(v, "size", 0)) for v in weights.flatten(params).values())
    dims = f"{cfg.model_type}, {count:,} parameters"
    flat = weights.flatten(params)
    classes = flat["head/kernel"].shape[-1] if "head/kernel" in flat else "no head"
    size = "x".join(map(str, metadata["image_size"])) if metadata.get("image_size") else "?"
    gelu = "tanh GELU" if cfg.gelu_approximate else "exact GELU"
    return (
        f"{cfg.name or cfg.model_type} ({dims}, patch {'x'.join(map(str, cfg.patches.size))}, "
        f"{size} px, {classes} classes, pooling {cfg.get('classifier', 'gap')}, {gelu}, "
        f"LayerNorm eps {cfg.layernorm_epsilon:g})"
    )
