"""PyTorch interop: Hugging Face transformers ViT and timm VisionTransformer <-> our `.npz`.

    python -m vit_jax.convert SRC DST [--model NAME] [--image-size H[xW]] [--num-heads N]

The format of each side follows from its name: a directory is a transformers model
(`config.json` + `model.safetensors`), a `.safetensors` (or, reading only, a weights-only
`.bin` / `.pth`) file is a timm state dict, an `.npz` is ours (published layout) with a JSON
sidecar (`x.json`: model config, class names, image size). So a converted file carries what is
needed to rebuild the model: `vit_jax.checkpoint.load_with_metadata`, `load_pretrained`,
`python -m vit_jax.predict --checkpoint` read all three formats directly.

Python API: `from_hf(dir)`, `from_timm(file, ...)` and `load(path)` return a `Converted`
(params, model_config, class_names, image_size); `to_hf(params, model_config, dir, ...)`,
`to_timm(...)` and `save(converted, path)` write. Never unpickles: safetensors, or PyTorch
files through `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import math
import os
from typing import Any

from etils import epath

from vit_jax import checkpoint, models
from vit_jax.convert.hf import from_hf, is_hf_dir, to_hf
from vit_jax.convert.pytorch import ConversionError
from vit_jax.convert.spec import Converted
from vit_jax.convert.timm import from_timm, to_timm

__all__ = [
    "ConversionError",
    "Converted",
    "convert",
    "detect",
    "from_hf",
    "from_timm",
    "load",
    "load_any",
    "save",
    "to_hf",
    "to_timm",
]

_TORCH_FILES = (".safetensors", ".bin", ".pth", ".pt")


def detect(path: str | os.PathLike) -> str:
    """'hf' (a directory), 'timm' (.safetensors / .bin / .pth / .pt) or 'npz' (anything else)."""
    p = str(path)
    if p.endswith(_TORCH_FILES):
        return "timm"
    if p.endswith(".npz"):
        return "npz"
    return "hf" if is_hf_dir(p) or epath.Path(p).is_dir() else "npz"


def _npz(path: str, model, image_size) -> Converted:
    params = checkpoint.load(path)
    meta = checkpoint.read_metadata(path)
    if model is not None:
        config = models.get_config(model)
    elif meta.get("model"):
        config = models.get_config(meta["model"])
    else:
        raise ConversionError(
            f"{path}: the file does not say which model it holds (no JSON sidecar); "
            "pass --model NAME (e.g. ViT-B_16)"
        )
    size = image_size or meta.get("image_size") or _square_image_size(params, config)
    if isinstance(size, int):
        size = (size, size)
    return Converted(params, config, meta.get("class_names"), tuple(size) if size else None)


def _square_image_size(params, config) -> tuple[int, int] | None:
    """The square image size the position embeddings (or Mixer's token MLP) were made for."""
    flat = checkpoint.flatten(models.unstack_layers(params))
    if config.model_type == "Mixer":
        tokens = flat.get("MixerBlock_0/token_mixing/Dense_0/kernel")
        tokens = None if tokens is None else tokens.shape[0]
        stride = tuple(config.patches.size)
    else:
        posemb = flat.get("Transformer/posembed_input/pos_embedding")
        prefix = sum(k in flat for k in ("cls", "dist"))
        tokens = None if posemb is None else posemb.shape[1] - prefix
        stride = models.get_model(config, num_classes=None).stride()
    if not tokens or math.isqrt(tokens) ** 2 != tokens:
        return None
    side = math.isqrt(tokens)
    return side * stride[0], side * stride[1]


def load(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> Converted:
    """Any supported format as our params + model config + class names + image size.

    `model` (a zoo name) tells what an `.npz` without sidecar holds, or the head count of a timm
    state dict; `num_heads` / `image_size` override what a timm file lacks.
    """
    kind = detect(path)
    if kind == "hf":
        return from_hf(path)
    if kind == "timm":
        return from_timm(path, model=model, num_heads=num_heads, image_size=image_size)
    return _npz(str(path), model, image_size)


def load_any(path: str | os.PathLike):
    """(params, model config dict, class names) of a converted file: the shape
    `vit_jax.checkpoint.load_with_metadata` returns."""
    c = load(path)
    return c.params, c.model_config.to_dict(), c.class_names


def save(
    converted: Converted, path: str | os.PathLike, *, source: str = "params"
) -> tuple[epath.Path, str]:
    """Writes `converted` in the format `path` names; returns (path, 'hf' | 'timm' | 'npz').

    `source` names where the parameters came from in error messages."""
    p = str(path)
    if p.endswith(_TORCH_FILES):
        if not p.endswith(".safetensors"):
            raise ConversionError(f"{p}: write timm state dicts as .safetensors (never pickles)")
        kind = "timm"
    elif p.endswith(".npz"):
        kind = "npz"
    else:
        kind = "hf"
    args = dict(class_names=converted.class_names, image_size=converted.image_size, source=source)
    if kind == "hf":
        return to_hf(converted.params, converted.model_config, p, **args), kind
    if kind == "timm":
        return to_timm(converted.params, converted.model_config, p, **args), kind
    meta = converted.metadata()
    return checkpoint.save_npz(converted.params, p, metadata=meta), kind


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    model: str | None = None,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> tuple[Converted, epath.Path, str]:
    """Reads `src` and writes `dst` (formats from the names); returns (converted, path, kind)."""
    if os.path.abspath(str(src)) == os.path.abspath(str(dst)):
        raise ConversionError(f"{src}: source and destination are the same")
    converted = load(src, model=model, num_heads=num_heads, image_size=image_size)
    out, kind = save(converted, dst, source=str(src))
    return converted, out, kind


def describe(c: Converted) -> str:
    """One line naming the architecture facts of a conversion."""
    cfg: Any = c.model_config
    if cfg.model_type == "Mixer":
        dims = f"Mixer width {cfg.hidden_dim}, {cfg.num_blocks} blocks"
    else:
        t = cfg.transformer
        dims = f"width {cfg.hidden_size}, {t.num_layers} layers, {t.num_heads} heads"
    flat = checkpoint.flatten(c.params)
    classes = flat["head/kernel"].shape[-1] if "head/kernel" in flat else "no head"
    size = "x".join(map(str, c.image_size)) if c.image_size else "?"
    gelu = "tanh GELU" if cfg.gelu_approximate else "exact GELU"
    return (
        f"{cfg.name or cfg.model_type} ({dims}, patch {'x'.join(map(str, cfg.patches.size))}, "
        f"{size} px, {classes} classes, pooling {cfg.get('classifier', 'gap')}, {gelu}, "
        f"LayerNorm eps {cfg.layernorm_epsilon:g})"
    )
