"""timm `VisionTransformer` state dicts (`.safetensors`, or weights-only `.bin`) <-> our ViT.

Keys (`TABLE`, run by `vit_jax.weights.table`): `cls_token`, `dist_token` (DeiT), `pos_embed`,
`patch_embed.proj.{weight,bias}`, `blocks.{i}.{norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1,
mlp.fc2, ls2}` (`ls1`/`ls2`: LayerScale, our `LayerScale_1`/`_3`), `norm`, `head`,
`head_dist`. The fused `attn.qkv` weight (3 * D, D) holds query, key and value rows in that
order. Models without a class token pool by averaging the final-normed tokens
(`global_pool='avg', fc_norm=False`, our classifier 'gap'); `pos_embed` without the class-token
slots (`no_embed_class=True`) reads as a zero slot, which computes the same.

A state dict does not say how many heads the model has, nor its image size, GELU kind or class
names. Reading takes them from, in order: the arguments, our JSON sidecar (`x.safetensors` ->
`x.json`, written by `to_timm`), a zoo model name, and a timm hub `config.json` beside the file
(`architecture`, `pretrained_cfg.input_size`, `label_names`, `model_args.init_values`); the
architecture's name gives the heads (its size word and the width) and the GELU (exact, but tanh
for the SigLIP architectures timm builds with `gelu_tanh`). timm uses LayerNorm epsilon 1e-6.
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
from vit_jax.weights import codec, files, npz, options
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import Converted, VitFacts
from vit_jax.weights.options import Can
from vit_jax.weights.table import (
    ATTENTION,
    BLOCK,
    CONV,
    DENSE,
    HEADS_BIAS,
    HEADS_IN,
    HEADS_OUT,
    IDENTITY,
    MAP,
    MAP_ATTENTION,
    Row,
    Table,
    pair,
)

__all__ = [
    "CAN",
    "CODEC",
    "HUB_WEIGHTS",
    "TABLE",
    "from_timm",
    "is_hub_dir",
    "read_state",
    "to_timm",
    "weights_file",
]

# What a timm hub folder holds beside its config.json, in the order they are looked for.
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


# Facts from timm 1.0.31's model definitions. Attention heads by (size word, width): the word
# alone is ambiguous (a giant is 1408 wide with 16 heads, DINOv2's 1536 with 24).
_HEADS = {
    ("tiny", 192): 3, ("xsmall", 256): 4, ("wee", 256): 4, ("dwee", 256): 4, ("pwee", 256): 4,
    ("dpwee", 256): 4, ("little", 320): 5, ("dlittle", 320): 5, ("small", 384): 6,
    ("medium", 512): 8, ("mediumd", 512): 8, ("betwixt", 640): 10, ("base", 768): 12,
    ("base", 896): 14, ("so150m2", 832): 13, ("so150m", 896): 14, ("large", 1024): 16,
    ("so400m", 1152): 16, ("huge", 1280): 16, ("giant", 1408): 16, ("giant", 1536): 24,
    ("giantopt", 1536): 16, ("gigantic", 1664): 16,
}  # fmt: skip
_HEADS_BY_ARCHITECTURE = {"vit_base_patch16_gap_224": 16}  # head_dim 48
# Architectures built with act_layer='gelu_tanh' (the others use exact GELU).
_GELU_TANH = frozenset(
    f"vit_{size}_{patch}_siglip{gap}_{res}"
    for size, patch, resolutions in (
        ("base", "patch32", (256,)),
        ("large", "patch16", (512,)),
        ("so400m", "patch16", (256, 384, 512)),
        ("giantopt", "patch16", (256, 384)),
    )
    for gap in ("", "_gap")
    for res in resolutions
)
_QKV = ("query", "key", "value")
# the table's optional parts that the keys of a state dict show (`Table.detect`)
_DETECTED = (
    "class_token", "distillation", "head", "head_dist", "registers", "map", "qk_norm", "layer_scale"
)  # fmt: skip
_UNSUPPORTED = {
    "norm_pre.": "a pre-norm (CLIP-style norm_pre)",
    "patch_embed.backbone.": "a CNN backbone (hybrid)",
    "patch_embed.norm.": "a patch-embedding norm",
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


def is_hub_dir(path: str | os.PathLike) -> bool:
    """A timm hub folder: its `config.json` names an `architecture` (and no transformers
    `model_type`)."""
    config = epath.Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        content = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(content, dict) and "architecture" in content and "model_type" not in content


def weights_file(path: str | os.PathLike) -> epath.Path:
    """The state-dict file of `path`: itself, or the weights of a timm hub folder."""
    path = epath.Path(path)
    if not path.is_dir():
        return path
    for name in HUB_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise ConversionError(
        f"{path}: a timm hub folder without weights; expected {' or '.join(HUB_WEIGHTS)}"
    )


def _timm_hub_config(path: epath.Path) -> dict[str, Any]:
    """The timm hub `config.json` beside the weights, if there is one."""
    candidate = path.parent / "config.json"
    if not candidate.exists():
        return {}
    files.check_regular(candidate)
    try:
        config = json.loads(candidate.read_text())
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) and "architecture" in config else {}


_L, _A, _M, _MA = BLOCK, ATTENTION, MAP, MAP_ATTENTION
_B = "blocks.{i}."


# timm's AttentionPoolLatent (`global_pool='map'`): a latent query, `q` and a fused `kv`.
_MAP_ROWS = (
    Row(f"{_M}probe", "attn_pool.latent", IDENTITY, "1 1 D", when="map"),
    *pair(f"{_MA}query", "attn_pool.q", HEADS_IN, "D H hd", when="map"),
    Row(tuple(f"{_MA}{n}/kernel" for n in _QKV[1:]), "attn_pool.kv.weight", HEADS_IN, "D H hd",
        when="map"),
    Row(tuple(f"{_MA}{n}/bias" for n in _QKV[1:]), "attn_pool.kv.bias", HEADS_BIAS, "H hd",
        when="map"),
    *pair(f"{_MA}out", "attn_pool.proj", HEADS_OUT, "H hd D", when="map"),
    *pair(f"{_M}LayerNorm_0", "attn_pool.norm", when="map"),
    *pair(f"{_M}MlpBlock_0/Dense_0", "attn_pool.mlp.fc1", DENSE, "D M", when="map"),
    *pair(f"{_M}MlpBlock_0/Dense_1", "attn_pool.mlp.fc2", DENSE, "M D", when="map"),
)  # fmt: skip

TABLE = Table(
    rows=(
        Row("embedding/kernel", "patch_embed.proj.weight", CONV, "ph pw 3 D"),
        Row("embedding/bias", "patch_embed.proj.bias", IDENTITY, "D", optional=True),
        Row("cls", "cls_token", IDENTITY, "1 1 D", when="class_token"),
        Row("dist", "dist_token", IDENTITY, "1 1 D", when="distillation"),
        Row("registers", "reg_token", IDENTITY, "1 NR D", when="registers"),
        Row(npz.POSEMB_KEY, "pos_embed", IDENTITY, "1 T D"),
        *pair("Transformer/encoder_norm", "norm"),
        *pair("head", "head", DENSE, "D N", when="head"),
        *pair("head_dist", "head_dist", DENSE, "D N", when="head_dist"),
        *_MAP_ROWS,
    ),
    block=(
        *pair(f"{_L}LayerNorm_0", f"{_B}norm1"),
        Row(tuple(f"{_A}{n}/kernel" for n in _QKV), f"{_B}attn.qkv.weight", HEADS_IN, "D H hd"),
        Row(tuple(f"{_A}{n}/bias" for n in _QKV), f"{_B}attn.qkv.bias", HEADS_BIAS, "H hd",
            optional=True),
        *pair(f"{_A}query_norm", f"{_B}attn.q_norm", shape="hd", when="qk_norm"),
        *pair(f"{_A}key_norm", f"{_B}attn.k_norm", shape="hd", when="qk_norm"),
        *pair(f"{_A}out", f"{_B}attn.proj", HEADS_OUT, "H hd D"),
        Row(f"{_L}LayerScale_1/scale", f"{_B}ls1.gamma", IDENTITY, "D", when="layer_scale"),
        *pair(f"{_L}LayerNorm_2", f"{_B}norm2"),
        *pair(f"{_L}MlpBlock_3/Dense_0", f"{_B}mlp.fc1", DENSE, "D M", when="gelu_mlp"),
        # SwiGLUPacked (DINOv2-g): fc1 holds [x1 | x2] rows, hidden = silu(x1) * x2
        *pair(f"{_L}MlpBlock_3/Dense_0", f"{_B}mlp.fc1", DENSE, "D M2", when="swiglu"),
        *pair(f"{_L}MlpBlock_3/Dense_1", f"{_B}mlp.fc2", DENSE, "M D"),
        Row(f"{_L}LayerScale_3/scale", f"{_B}ls2.gamma", IDENTITY, "D", when="layer_scale"),
    ),
)  # fmt: skip

# What timm's VisionTransformer expresses of our options: the key-table feature each turns on
# and the constructor argument (`VisionTransformer(**kwargs)`) that records it.
CAN = options.Capabilities(
    "timm VisionTransformer",
    classifiers=("token", "gap", "map"),
    rows=(
        Can("distillation_token", "distillation"),  # VisionTransformerDistilled
        Can("layer_scale", "layer_scale", "init_values",
            lambda f: float(f.config.transformer.get("layer_scale_init") or 1e-5)),
        Can("num_registers", "registers", "reg_tokens", lambda f: options.num_registers(f.config)),
        Can("qk_norm", "qk_norm", "qk_norm", lambda f: True),
        Can("swiglu", "swiglu", "mlp_layer", lambda f: "SwiGLUPacked", off="gelu_mlp"),
    ),
)  # fmt: skip


# timm's resample_abs_pos_embed (dynamic_img_size, checkpoint_filter_fn): bicubic, antialiased
_TIMM_RESAMPLE = "bicubic_antialias"


def from_timm(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> Converted:
    """Our parameters, model config, class names and image size from a timm ViT state dict (a
    file, or a timm hub folder holding one)."""
    path = weights_file(path)
    state = read_state(path)
    for marker, feature in _UNSUPPORTED.items():
        if any(marker in f".{k}" for k in state):
            raise ConversionError(f"{path}: the model has {feature}, which our ViT does not")
    meta = npz.read_metadata(path)
    hub = _timm_hub_config(path)
    parsed = _parse(path, state, meta, hub, model=model, num_heads=num_heads, size=image_size)
    return codec.read(CODEC, state, parsed, source=str(path), what="a timm VisionTransformer")


def _patch_and_depth(path, state) -> tuple[int, int, int, int]:
    """(width, patch height, patch width, blocks) of a timm ViT state dict; errors otherwise."""
    if "patch_embed.proj.weight" not in state:
        raise ConversionError(
            f"{path}: no patch_embed.proj.weight; not a timm VisionTransformer state dict "
            f"(keys: {', '.join(sorted(state)[:5])} ...)"
        )
    d, channels, ph, pw = (int(n) for n in state["patch_embed.proj.weight"].shape)
    if channels != 3:
        raise ConversionError(f"{path}: patch_embed takes {channels} channels, expected 3")
    layers = 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1
    )
    if not layers:
        raise ConversionError(f"{path}: no blocks.{{i}} entries; not a timm VisionTransformer")
    return d, ph, pw, layers


def _parse(path, state, meta, hub, *, model, num_heads, size) -> codec.Parsed:
    """The table's dims and features, the pooling, the image size and the class names of a
    timm state dict (with our sidecar `meta` and the hub config beside it).

    `pos_embed` without rows for the prefix tokens (`no_embed_class`) is our
    `posemb_covers_prefix=False`. Checks run in the order their errors are most useful.
    """
    stored = meta.get("model") or {}
    zoo = models.get_config(model) if model else None
    d, ph, pw, layers = _patch_and_depth(path, state)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    heads = _num_heads(path, num_heads, stored, zoo, hub, d)
    if zoo is not None and (zoo.hidden_size, zoo.transformer.num_layers) != (d, layers):
        raise ConversionError(
            f"{path}: holds a ViT of width {d} and {layers} layers, not {model} "
            f"({zoo.hidden_size}, {zoo.transformer.num_layers})"
        )
    prefix = sum(k in state for k in ("cls_token", "dist_token"))
    pooling = _classifier(
        path, stored, hub, has_class_token=bool(prefix), has_map="attn_pool.latent" in state
    )
    if "dist_token" in state and "cls_token" not in state:
        raise ConversionError(f"{path}: dist_token without cls_token")
    h, w = _image_size(path, state, meta, hub, size, prefix=prefix, d=d, patch=(ph, pw))
    grid_tokens = (h // ph) * (w // pw)
    registers = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    rows = state["pos_embed"].shape[1]
    if registers and rows == grid_tokens + prefix + registers:
        raise ConversionError(
            f"{path}: pos_embed {tuple(state['pos_embed'].shape)} has rows for the register "
            "tokens, which our position table (class token and patches) does not"
        )
    covers_prefix = not (prefix and rows == grid_tokens)  # no_embed_class: patches only
    fc2 = state.get("blocks.0.mlp.fc2.weight")
    mlp = 0 if fc2 is None else int(fc2.shape[1])
    swiglu = fc1 is not None and int(fc1.shape[0]) == 2 * mlp != 0
    dims = dict(D=d, H=heads, hd=d // heads, M=mlp, M2=2 * mlp, NR=registers)
    dims.update(ph=ph, pw=pw, T=grid_tokens + (prefix if covers_prefix else 0))
    features = TABLE.detect(state, _DETECTED) | {"swiglu" if swiglu else "gelu_mlp"}
    for head in ("head_dist", "head"):  # the class count: head's, else head_dist's
        if head in features:
            dims["N"] = int(state[f"{head}.weight"].shape[0])
    fields = dict(
        classifier=pooling,
        gelu_approximate=bool(stored.get("gelu_approximate", _architecture(hub) in _GELU_TANH)),
        layernorm_epsilon=float(stored.get("layernorm_epsilon", 1e-6)),
    )
    if not covers_prefix:
        fields["posemb_covers_prefix"] = False
    return codec.Parsed(
        name=str(stored.get("name") or model or hub.get("architecture") or path.stem),
        layers=layers,
        dims=dims,
        features=features,
        image_size=(h, w),
        resample=stored.get("posemb_resample", _TIMM_RESAMPLE),  # ours: as its sidecar says
        values=dict(layer_scale=_layer_scale_init(stored, meta, hub), num_registers=registers),
        fields=fields,
        class_names=_class_names(path, meta, hub, dims.get("N")),
    )


def _class_names(path, meta, hub, num_classes: int | None) -> list[str] | None:
    """From our sidecar or the hub config, when they fit the head."""
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
    return list(names) if names else None


def _image_size(path, state, meta, hub, size, *, prefix, d, patch) -> tuple[int, int]:
    """From the argument, our sidecar, the hub config, else the square grid of `pos_embed`."""
    posemb = state.get("pos_embed")
    if posemb is None or posemb.ndim != 3:
        raise ConversionError(f"{path}: no pos_embed of shape (1, tokens, {d})")
    hub_size = ((hub.get("pretrained_cfg") or {}).get("input_size") or [None])[1:]
    size = size or meta.get("image_size") or hub_size
    if size:
        return pt.pair(size if isinstance(size, int) else list(size), "image size")
    # square, with or without (no_embed_class) slots for the prefix tokens
    total = posemb.shape[1]
    grids = [n for n in (total - prefix, total) if n > 0]
    side = next((math.isqrt(n) for n in grids if math.isqrt(n) ** 2 == n), None)
    if side is None:
        raise ConversionError(
            f"{path}: pos_embed holds {total} tokens, not a square grid; pass the image size"
        )
    return side * patch[0], side * patch[1]


def _layer_scale_init(stored, meta, hub) -> float:
    """LayerScale's initial value (it matters only for training from scratch): as recorded by
    our sidecar or timm's `init_values`, else timm's usual 1e-5."""
    recorded = (
        (stored.get("transformer") or {}).get("layer_scale_init")
        or ((meta.get("timm") or {}).get("kwargs") or {}).get("init_values")
        or (hub.get("model_args") or {}).get("init_values")
    )
    return float(recorded) if recorded else 1e-5


def _classifier(path, stored, hub, *, has_class_token: bool, has_map: bool) -> str:
    """'token', 'gap' or 'map': from our sidecar, the hub config's global_pool, or the keys."""
    if stored.get("classifier"):
        pool = {"token": "token", "gap": "avg"}.get(stored["classifier"], stored["classifier"])
    elif hub.get("global_pool") is not None:
        pool = hub["global_pool"]
    else:
        pool = "map" if has_map else "token" if has_class_token else "avg"
        logging.info("%s: no pooling recorded; assuming global_pool=%r", path, pool)
    if pool == "map" and has_map and not has_class_token:
        return "map"
    if pool == "token" and has_class_token and not has_map:
        return "token"
    if pool == "avg" and not has_class_token and not has_map:
        return "gap"
    raise ConversionError(
        f"{path}: global_pool {pool!r} with class_token={has_class_token}, attn_pool={has_map}; "
        "our ViT supports "
        "'token' (class token), 'avg' without a class token and 'map' (attn_pool)"
    )


def _architecture(hub: Mapping[str, Any]) -> str:
    """The hub config's timm architecture without a pretrained tag (`name.tag`)."""
    return str(hub.get("architecture") or "").split(".")[0]


def _size_word(architecture: str) -> str:
    """`vit_so400m_patch14_siglip_384` -> `so400m` (the word after the family's)."""
    parts = architecture.split("_")
    return parts[1] if len(parts) > 1 else ""


def _num_heads(path, num_heads, stored, zoo, hub, d) -> int:
    heads = num_heads or (stored.get("transformer") or {}).get("num_heads")
    if not heads and zoo is not None:
        heads = zoo.transformer.num_heads
    if not heads and hub:
        arch = _architecture(hub)
        heads = _HEADS_BY_ARCHITECTURE.get(arch) or _HEADS.get((_size_word(arch), d))
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
    **kwargs: Any,
) -> epath.Path:
    """Writes a timm `VisionTransformer` state dict (`.safetensors`) and its JSON sidecar
    (`codec.write`'s keyword arguments: class_names, image_size, source, normalization,
    overwrite).

    The sidecar (`x.json`) holds our model config, class names, image size, `normalization`
    (when given) and the timm constructor arguments (`timm.create_model('vit_base_patch16_224',
    **kwargs)` or `VisionTransformer(**kwargs)`; `VisionTransformerDistilled` with a
    distillation token). Both appear complete or not at all; existing ones are refused unless
    `overwrite` (`weights.files.staged_files`).
    """
    return codec.write(CODEC, params, model_config, path, **kwargs)


def _features(f: VitFacts) -> set[str]:
    """The table's structural rows a model of these facts has (the options': `CAN`)."""
    heads = {"head", "head_dist"} if f.config.distillation_token else {"head"}
    return {
        *(["class_token"] if f.config.classifier == "token" else []),
        *(["map"] if f.config.classifier == "map" else []),
        *(heads if f.num_classes else []),
    }


def _timm_kwargs(f: VitFacts, names: list[str] | None) -> dict[str, Any]:
    """timm's constructor arguments for the model `f` describes (the options': `CAN`)."""
    del names  # the sidecar's
    (ph, pw), d = f.patch, f.hidden
    kwargs = {
        "img_size": list(f.image_size),
        "patch_size": ph if ph == pw else [ph, pw],
        "embed_dim": d,
        "depth": f.layers,
        "num_heads": f.heads,
        "mlp_ratio": f.mlp * (2 if options.swiglu(f.config) else 1) / d,
        "qkv_bias": True,
        "class_token": f.config.classifier == "token",
        "global_pool": {"token": "token", "gap": "avg"}.get(f.config.classifier, "map"),
        "fc_norm": False,
        "num_classes": f.num_classes or 0,
    }
    if f.config.gelu_approximate:
        kwargs["act_layer"] = "gelu_tanh"
    if not f.config.get("posemb_covers_prefix", True):
        kwargs["no_embed_class"] = True
    return kwargs


def _save(state, kwargs, path, f: VitFacts, names, *, normalization, image_size, overwrite):
    """The state dict (float32) and its sidecar, both or neither (`files.staged_files`)."""
    del image_size  # the facts'
    if float(f.config.layernorm_epsilon) != 1e-6:
        logging.warning(
            "%s: the model uses LayerNorm epsilon %g; timm's VisionTransformer uses 1e-6 unless "
            "given norm_layer=partial(nn.LayerNorm, eps=%g)",
            path,
            f.config.layernorm_epsilon,
            f.config.layernorm_epsilon,
        )
    timm_class = (
        "VisionTransformerDistilled" if f.config.distillation_token else "VisionTransformer"
    )
    meta = Converted({}, f.config, names, f.image_size).metadata(
        timm={"class": timm_class, "kwargs": kwargs}
    )
    if normalization is not None:
        meta["normalization"] = normalization
    out = epath.Path(path)
    sidecar = npz.metadata_path(out).name
    with files.staged_files(out, [sidecar], overwrite=overwrite) as staging:
        pt.dump_safetensors({k: v.astype(np.float32) for k, v in state.items()}, staging / out.name)
        (staging / sidecar).write_text(json.dumps(meta, indent=2))
    logging.info("wrote timm %s state dict to %s", timm_class, out)
    return out


CODEC = codec.Codec(CAN, TABLE, config=_timm_kwargs, save=_save, features=_features)
