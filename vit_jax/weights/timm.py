"""timm `VisionTransformer` state dicts (`.safetensors`, or weights-only `.bin`) <-> our ViT.

Keys: `cls_token`, `dist_token` (DeiT), `pos_embed`, `patch_embed.proj.{weight,bias}`,
`blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`,
`head_dist`. The fused `attn.qkv` weight (3 * D, D) holds query, key and value rows in that
order. Models without a class token pool by averaging the final-normed tokens
(`global_pool='avg', fc_norm=False`, our classifier 'gap'); `pos_embed` without the class-token
slots (`no_embed_class=True`) reads as a zero slot, which computes the same.

A state dict does not say how many heads the model has, nor its image size, GELU kind or class
names. Reading takes them from, in order: the arguments, our JSON sidecar (`x.safetensors` ->
`x.json`, written by `to_timm`), a zoo model name, and a timm hub `config.json` beside the file
(`architecture`, `pretrained_cfg.input_size`, `label_names`). timm uses exact GELU and LayerNorm
epsilon 1e-6.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from vit_jax import models
from vit_jax.weights import npz
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import Converted, class_names_for, vit_facts
from vit_jax.weights.tree import unflatten

# timm architecture size words -> heads (head_dim 64, ViT-H 80).
_HEADS_BY_SIZE = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}
_UNSUPPORTED = {
    "norm_pre.": "a pre-norm (CLIP-style norm_pre)",
    "reg_token": "register tokens",
    "attn_pool.": "attention pooling (attn_pool)",
    "patch_embed.backbone.": "a CNN backbone (hybrid)",
    "patch_embed.norm.": "a patch-embedding norm",
    ".ls1.": "LayerScale",
    ".q_norm.": "query/key norms",
    ".attn.norm.": "attention scale-norm",
    ".mlp.norm.": "MLP scale-norm",
    "fc_norm.": "a LayerNorm after pooling (fc_norm)",
    "head.fc.": "a multi-layer head",
}


def read_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a timm file, without a DDP `module.` prefix."""
    state = pt.read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _timm_hub_config(path: epath.Path) -> dict[str, Any]:
    """The timm hub `config.json` beside the weights, if there is one."""
    candidate = path.parent / "config.json"
    if not candidate.exists():
        return {}
    try:
        config = json.loads(candidate.read_text())
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) and "architecture" in config else {}


def from_timm(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> Converted:
    """Our parameters, model config, class names and image size from a timm ViT state dict."""
    path = epath.Path(path)
    state = read_state(path)
    for marker, feature in _UNSUPPORTED.items():
        if any(marker in f".{k}" for k in state):
            raise ConversionError(f"{path}: the model has {feature}, which our ViT does not")
    meta = npz.read_metadata(path)
    stored = meta.get("model") or {}
    hub = _timm_hub_config(path)
    zoo = models.get_config(model) if model else None

    if "patch_embed.proj.weight" not in state:
        raise ConversionError(
            f"{path}: no patch_embed.proj.weight; not a timm VisionTransformer state dict "
            f"(keys: {', '.join(sorted(state)[:5])} ...)"
        )
    d, channels, ph, pw = state["patch_embed.proj.weight"].shape
    if channels != 3:
        raise ConversionError(f"{path}: patch_embed takes {channels} channels, expected 3")
    layers = 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1
    )
    if not layers:
        raise ConversionError(f"{path}: no blocks.{{i}} entries; not a timm VisionTransformer")
    mlp = state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 0
    heads = _num_heads(path, num_heads, stored, zoo, hub, d)
    if zoo is not None and (zoo.hidden_size, zoo.transformer.num_layers) != (d, layers):
        raise ConversionError(
            f"{path}: holds a ViT of width {d} and {layers} layers, not {model} "
            f"({zoo.hidden_size}, {zoo.transformer.num_layers})"
        )
    prefix_names = [k for k in ("cls_token", "dist_token") if k in state]
    prefix = len(prefix_names)
    classifier = _classifier(path, stored, hub, has_class_token=bool(prefix))
    if "dist_token" in state and "cls_token" not in state:
        raise ConversionError(f"{path}: dist_token without cls_token")
    posemb = state.get("pos_embed")
    if posemb is None or posemb.ndim != 3:
        raise ConversionError(f"{path}: no pos_embed of shape (1, tokens, {d})")
    hub_size = ((hub.get("pretrained_cfg") or {}).get("input_size") or [None])[1:]
    size = image_size or meta.get("image_size") or hub_size
    if size:
        h, w = pt.pair(size if isinstance(size, int) else list(size), "image size")
    else:  # square, with or without (no_embed_class) slots for the prefix tokens
        total = posemb.shape[1]
        grids = [n for n in (total - prefix, total) if n > 0]
        side = next((math.isqrt(n) for n in grids if math.isqrt(n) ** 2 == n), None)
        if side is None:
            raise ConversionError(
                f"{path}: pos_embed holds {total} tokens, not a square grid; pass the image size"
            )
        h, w = side * ph, side * pw
    grid_tokens = (h // ph) * (w // pw)
    if prefix and posemb.shape[1] == grid_tokens:  # no_embed_class: no slot for the prefix
        posemb = np.concatenate([np.zeros((1, prefix, d), posemb.dtype), posemb], axis=1)
        state = {**state, "pos_embed": posemb}

    r = pt.Reader(str(path), state)
    flat: dict[str, np.ndarray] = {
        "embedding/kernel": pt.conv_from_torch(r.take("patch_embed.proj.weight", (d, 3, ph, pw))),
        "Transformer/posembed_input/pos_embedding": r.take(
            "pos_embed", (1, grid_tokens + prefix, d)
        ),
    }
    bias = r.optional("patch_embed.proj.bias", (d,))
    flat["embedding/bias"] = np.zeros(d, np.float32) if bias is None else bias
    if prefix_names:
        flat["cls"] = r.take("cls_token", (1, 1, d))
    if "dist_token" in state:
        flat["dist"] = r.take("dist_token", (1, 1, d))
    hd = d // heads
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            flat[f"{dst}{ours}/scale"] = r.take(f"{src}{theirs}.weight", (d,))
            flat[f"{dst}{ours}/bias"] = r.take(f"{src}{theirs}.bias", (d,))
        attn = f"{dst}MultiHeadDotProductAttention_1/"
        qkv = r.take(f"{src}attn.qkv.weight", (3 * d, d))
        qkv_bias = r.optional(f"{src}attn.qkv.bias", (3 * d,))
        if qkv_bias is None:
            qkv_bias = np.zeros(3 * d, np.float32)
        for j, name in enumerate(("query", "key", "value")):
            flat[f"{attn}{name}/kernel"] = pt.qkv_from_torch(qkv[j * d : (j + 1) * d], heads)
            flat[f"{attn}{name}/bias"] = qkv_bias[j * d : (j + 1) * d].reshape(heads, hd)
        flat[f"{attn}out/kernel"] = pt.out_from_torch(
            r.take(f"{src}attn.proj.weight", (d, d)), heads
        )
        flat[f"{attn}out/bias"] = r.take(f"{src}attn.proj.bias", (d,))
        for j, theirs in enumerate(("fc1", "fc2")):
            shape = (mlp, d) if j == 0 else (d, mlp)
            flat[f"{dst}MlpBlock_3/Dense_{j}/kernel"] = pt.dense_from_torch(
                r.take(f"{src}mlp.{theirs}.weight", shape)
            )
            flat[f"{dst}MlpBlock_3/Dense_{j}/bias"] = r.take(f"{src}mlp.{theirs}.bias", shape[:1])
    flat["Transformer/encoder_norm/scale"] = r.take("norm.weight", (d,))
    flat["Transformer/encoder_norm/bias"] = r.take("norm.bias", (d,))
    num_classes = None
    for ours, theirs in (("head", "head"), ("head_dist", "head_dist")):
        if f"{theirs}.weight" in r:
            n = int(state[f"{theirs}.weight"].shape[0])
            num_classes = num_classes or n
            flat[f"{ours}/kernel"] = pt.dense_from_torch(
                r.take(f"{theirs}.weight", (num_classes, d))
            )
            flat[f"{ours}/bias"] = r.take(f"{theirs}.bias", (num_classes,))
    r.finish("a timm VisionTransformer")

    model_config = models.get_config(
        dict(
            name=str(stored.get("name") or model or hub.get("architecture") or path.stem),
            patches=dict(size=(int(ph), int(pw))),
            hidden_size=int(d),
            transformer=dict(mlp_dim=int(mlp), num_heads=heads, num_layers=layers),
            classifier=classifier,
            distillation_token="dist_token" in state,
            gelu_approximate=bool(stored.get("gelu_approximate", False)),
            layernorm_epsilon=float(stored.get("layernorm_epsilon", 1e-6)),
        )
    )
    names = (
        meta.get("class_names")
        or hub.get("label_names")
        or (hub.get("pretrained_cfg") or {}).get("label_names")
    )
    if names is not None and (num_classes is None or len(names) != num_classes):
        logging.warning(
            "%s: %d class names for %s classes; ignoring them", path, len(names), num_classes
        )
        names = None
    params = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    return Converted(params, model_config, list(names) if names else None, (h, w))


def _classifier(path, stored, hub, *, has_class_token: bool) -> str:
    """'token' or 'gap': from our sidecar, the hub config's global_pool, or the class token."""
    if stored.get("classifier"):
        pool = {"token": "token", "gap": "avg"}.get(stored["classifier"], stored["classifier"])
    elif hub.get("global_pool") is not None:
        pool = hub["global_pool"]
    else:
        pool = "token" if has_class_token else "avg"
        logging.info("%s: no pooling recorded; assuming global_pool=%r", path, pool)
    if pool == "token" and has_class_token:
        return "token"
    if pool == "avg" and not has_class_token:
        return "gap"
    raise ConversionError(
        f"{path}: global_pool {pool!r} with class_token={has_class_token}; our ViT supports "
        "'token' (class token) and 'avg' without a class token"
    )


def _num_heads(path, num_heads, stored, zoo, hub, d) -> int:
    heads = num_heads or (stored.get("transformer") or {}).get("num_heads")
    if not heads and zoo is not None:
        heads = zoo.transformer.num_heads
    if not heads and hub:
        size = next((s for s in _HEADS_BY_SIZE if f"_{s}_" in f"_{hub['architecture']}_"), None)
        heads = _HEADS_BY_SIZE.get(size)
    if not heads:
        raise ConversionError(
            f"{path}: a timm state dict does not record its number of attention heads; "
            "pass --model NAME (a zoo model of this shape) or --num-heads N"
        )
    if d % int(heads):
        raise ConversionError(f"{path}: width {d} is not divisible by {heads} heads")
    return int(heads)


def to_timm(
    params: Mapping[str, Any],
    model_config: Any,
    path: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
    source: str = "params",
) -> epath.Path:
    """Writes a timm `VisionTransformer` state dict (`.safetensors`) and its JSON sidecar.

    The sidecar (`x.json`) holds our model config, class names, image size and the timm
    constructor arguments (`timm.create_model('vit_base_patch16_224', **kwargs)` or
    `VisionTransformer(**kwargs)`; `VisionTransformerDistilled` with a distillation token).
    """
    f = vit_facts(
        params,
        model_config,
        image_size=image_size,
        target="timm VisionTransformer",
        classifiers=("token", "gap"),
        features_representation=False,
        distillation=True,
    )
    names = class_names_for(f.num_classes, class_names)
    d, (ph, pw), hd = f.hidden, f.patch, f.hidden // f.heads
    r = pt.Reader(source, f.flat)  # names the file in errors
    state = {
        "pos_embed": r.take(
            "Transformer/posembed_input/pos_embedding",
            (1, f.grid[0] * f.grid[1] + f.num_prefix_tokens, d),
        ),
        "patch_embed.proj.weight": pt.conv_to_torch(r.take("embedding/kernel", (ph, pw, 3, d))),
        "patch_embed.proj.bias": r.take("embedding/bias", (d,)),
    }
    if f.num_prefix_tokens:
        state["cls_token"] = r.take("cls", (1, 1, d))
    if f.config.distillation_token:
        state["dist_token"] = r.take("dist", (1, 1, d))
    for i in range(f.layers):
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            state[f"{dst}{theirs}.weight"] = r.take(f"{src}{ours}/scale", (d,))
            state[f"{dst}{theirs}.bias"] = r.take(f"{src}{ours}/bias", (d,))
        attn = f"{src}MultiHeadDotProductAttention_1/"
        state[f"{dst}attn.qkv.weight"] = np.concatenate(
            [
                pt.qkv_to_torch(r.take(f"{attn}{n}/kernel", (d, f.heads, hd)))
                for n in ("query", "key", "value")
            ]
        )
        state[f"{dst}attn.qkv.bias"] = np.concatenate(
            [
                r.take(f"{attn}{n}/bias", (f.heads, hd)).reshape(-1)
                for n in ("query", "key", "value")
            ]
        )
        state[f"{dst}attn.proj.weight"] = pt.out_to_torch(
            r.take(f"{attn}out/kernel", (f.heads, hd, d))
        )
        state[f"{dst}attn.proj.bias"] = r.take(f"{attn}out/bias", (d,))
        for j, theirs in enumerate(("fc1", "fc2")):
            shape = (d, f.mlp) if j == 0 else (f.mlp, d)
            state[f"{dst}mlp.{theirs}.weight"] = pt.dense_to_torch(
                r.take(f"{src}MlpBlock_3/Dense_{j}/kernel", shape)
            )
            state[f"{dst}mlp.{theirs}.bias"] = r.take(f"{src}MlpBlock_3/Dense_{j}/bias", shape[1:])
    state["norm.weight"] = r.take("Transformer/encoder_norm/scale", (d,))
    state["norm.bias"] = r.take("Transformer/encoder_norm/bias", (d,))
    if f.num_classes:
        for ours in ("head", "head_dist") if f.config.distillation_token else ("head",):
            state[f"{ours}.weight"] = pt.dense_to_torch(
                r.take(f"{ours}/kernel", (d, f.num_classes))
            )
            state[f"{ours}.bias"] = r.take(f"{ours}/bias", (f.num_classes,))
    r.finish(f"a {f.config.name or 'ViT'} of this config")

    kwargs = {
        "img_size": list(f.image_size),
        "patch_size": ph if ph == pw else [ph, pw],
        "embed_dim": d,
        "depth": f.layers,
        "num_heads": f.heads,
        "mlp_ratio": f.mlp / d,
        "qkv_bias": True,
        "class_token": bool(f.num_prefix_tokens),
        "global_pool": "token" if f.num_prefix_tokens else "avg",
        "fc_norm": False,
        "num_classes": f.num_classes or 0,
    }
    if f.config.gelu_approximate:
        kwargs["act_layer"] = "gelu_tanh"
    if float(f.config.layernorm_epsilon) != 1e-6:
        logging.warning(
            "%s: the model uses LayerNorm epsilon %g; timm's VisionTransformer uses 1e-6 unless "
            "given norm_layer=partial(nn.LayerNorm, eps=%g)",
            path,
            f.config.layernorm_epsilon,
            f.config.layernorm_epsilon,
        )
    out = pt.write_safetensors({k: v.astype(np.float32) for k, v in state.items()}, path)
    timm_class = (
        "VisionTransformerDistilled" if f.config.distillation_token else "VisionTransformer"
    )
    meta = Converted({}, f.config, names, f.image_size).metadata(
        timm={"class": timm_class, "kwargs": kwargs}
    )
    npz.metadata_path(out).write_text(json.dumps(meta, indent=2))
    logging.info("wrote timm %s state dict to %s", timm_class, out)
    return out
