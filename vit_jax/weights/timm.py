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
from vit_jax.weights import files, npz, options
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import (
    LAYER_SCALE_KEY,
    Converted,
    VitFacts,
    class_names_for,
    native_posemb,
    uses_layer_scale,
    vit_facts,
)
from vit_jax.weights.table import (
    CONV,
    DENSE,
    HEADS_BIAS,
    HEADS_IN,
    HEADS_OUT,
    IDENTITY,
    Row,
    Table,
)
from vit_jax.weights.tree import unflatten

__all__ = [
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
# table features -> the key whose presence in a state dict turns them on
_FEATURE_KEYS = {
    "class_token": "cls_token",
    "distillation": "dist_token",
    "head": "head.weight",
    "head_dist": "head_dist.weight",
    "registers": "reg_token",
    "map": "attn_pool.latent",
    "qk_norm": "blocks.0.attn.q_norm.weight",
}
_LAYER_SCALE = re.compile(r"^blocks\.\d+\.ls[12]\.gamma$")
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


_L = "Transformer/encoderblock_{i}/"
_A = f"{_L}MultiHeadDotProductAttention_1/"
_B = "blocks.{i}."
_M = "MAPHead_0/"
_MA = f"{_M}MultiHeadDotProductAttention_0/"


def _rows(ours: str, theirs: str, transform, shape: str, **kw) -> tuple[Row, Row]:
    """(weight, bias) rows: `kernel` (Dense / attention) or `scale` (norms), and `bias`."""
    first = "scale" if transform is IDENTITY else "kernel"
    bias = HEADS_BIAS if transform is HEADS_IN else IDENTITY
    bias_shape = "H hd" if transform is HEADS_IN else shape.split()[-1]
    return (
        Row(f"{ours}/{first}", f"{theirs}.weight", transform, shape, **kw),
        Row(f"{ours}/bias", f"{theirs}.bias", bias, bias_shape, **kw),
    )


# timm's AttentionPoolLatent (`global_pool='map'`): a latent query, `q` and a fused `kv`.
_MAP_ROWS = (
    Row(f"{_M}probe", "attn_pool.latent", IDENTITY, "1 1 D", when="map"),
    *_rows(f"{_MA}query", "attn_pool.q", HEADS_IN, "D H hd", when="map"),
    Row(
        tuple(f"{_MA}{n}/kernel" for n in ("key", "value")),
        "attn_pool.kv.weight",
        HEADS_IN,
        "D H hd",
        when="map",
    ),
    Row(
        tuple(f"{_MA}{n}/bias" for n in ("key", "value")),
        "attn_pool.kv.bias",
        HEADS_BIAS,
        "H hd",
        when="map",
    ),
    Row(f"{_MA}out/kernel", "attn_pool.proj.weight", HEADS_OUT, "H hd D", when="map"),
    Row(f"{_MA}out/bias", "attn_pool.proj.bias", IDENTITY, "D", when="map"),
    *_rows(f"{_M}LayerNorm_0", "attn_pool.norm", IDENTITY, "D", when="map"),
    *_rows(f"{_M}MlpBlock_0/Dense_0", "attn_pool.mlp.fc1", DENSE, "D M", when="map"),
    *_rows(f"{_M}MlpBlock_0/Dense_1", "attn_pool.mlp.fc2", DENSE, "M D", when="map"),
)

TABLE = Table(
    rows=(
        Row("embedding/kernel", "patch_embed.proj.weight", CONV, "ph pw 3 D"),
        Row("embedding/bias", "patch_embed.proj.bias", IDENTITY, "D", optional=True),
        Row("cls", "cls_token", IDENTITY, "1 1 D", when="class_token"),
        Row("dist", "dist_token", IDENTITY, "1 1 D", when="distillation"),
        Row("registers", "reg_token", IDENTITY, "1 NR D", when="registers"),
        Row(npz.POSEMB_KEY, "pos_embed", IDENTITY, "1 T D"),
        Row("Transformer/encoder_norm/scale", "norm.weight", IDENTITY, "D"),
        Row("Transformer/encoder_norm/bias", "norm.bias", IDENTITY, "D"),
        Row("head/kernel", "head.weight", DENSE, "D N", when="head"),
        Row("head/bias", "head.bias", IDENTITY, "N", when="head"),
        Row("head_dist/kernel", "head_dist.weight", DENSE, "D N", when="head_dist"),
        Row("head_dist/bias", "head_dist.bias", IDENTITY, "N", when="head_dist"),
        *_MAP_ROWS,
    ),
    block=(
        Row(f"{_L}LayerNorm_0/scale", f"{_B}norm1.weight", IDENTITY, "D"),
        Row(f"{_L}LayerNorm_0/bias", f"{_B}norm1.bias", IDENTITY, "D"),
        Row(tuple(f"{_A}{n}/kernel" for n in _QKV), f"{_B}attn.qkv.weight", HEADS_IN, "D H hd"),
        Row(
            tuple(f"{_A}{n}/bias" for n in _QKV),
            f"{_B}attn.qkv.bias",
            HEADS_BIAS,
            "H hd",
            optional=True,
        ),
        *_rows(f"{_A}query_norm", f"{_B}attn.q_norm", IDENTITY, "hd", when="qk_norm"),
        *_rows(f"{_A}key_norm", f"{_B}attn.k_norm", IDENTITY, "hd", when="qk_norm"),
        Row(f"{_A}out/kernel", f"{_B}attn.proj.weight", HEADS_OUT, "H hd D"),
        Row(f"{_A}out/bias", f"{_B}attn.proj.bias", IDENTITY, "D"),
        Row(f"{_L}LayerScale_1/scale", f"{_B}ls1.gamma", IDENTITY, "D", when="layer_scale"),
        Row(f"{_L}LayerNorm_2/scale", f"{_B}norm2.weight", IDENTITY, "D"),
        Row(f"{_L}LayerNorm_2/bias", f"{_B}norm2.bias", IDENTITY, "D"),
        *_rows(f"{_L}MlpBlock_3/Dense_0", f"{_B}mlp.fc1", DENSE, "D M", when="gelu_mlp"),
        # SwiGLUPacked (DINOv2-g): fc1 holds [x1 | x2] rows, hidden = silu(x1) * x2
        *_rows(f"{_L}MlpBlock_3/Dense_0", f"{_B}mlp.fc1", DENSE, "D M2", when="swiglu"),
        Row(f"{_L}MlpBlock_3/Dense_1/kernel", f"{_B}mlp.fc2.weight", DENSE, "M D"),
        Row(f"{_L}MlpBlock_3/Dense_1/bias", f"{_B}mlp.fc2.bias", IDENTITY, "D"),
        Row(f"{_L}LayerScale_3/scale", f"{_B}ls2.gamma", IDENTITY, "D", when="layer_scale"),
    ),
)


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
    f = _read_facts(path, state, meta, hub, model=model, num_heads=num_heads, size=image_size)
    keys = TABLE.at(layers=f["layers"], dims=f["dims"], features=f["features"])
    flat = keys.to_ours(f["state"], source=str(path), what="a timm VisionTransformer")

    dims, stored = f["dims"], meta.get("model") or {}
    transformer = dict(mlp_dim=dims["M"], num_heads=dims["H"], num_layers=f["layers"])
    if "layer_scale" in f["features"]:
        transformer["layer_scale_init"] = _layer_scale_init(stored, meta, hub)
    if "qk_norm" in f["features"]:
        transformer["qk_norm"] = True
    if "swiglu" in f["features"]:
        transformer["mlp_type"] = "swiglu"
    resample = stored.get("posemb_resample", _TIMM_RESAMPLE)  # ours: as its sidecar says
    extra = native_posemb(f["image_size"], (dims["ph"], dims["pw"]), resample)
    if dims["NR"]:
        extra["num_registers"] = dims["NR"]
    if not f["covers_prefix"]:
        extra["posemb_covers_prefix"] = False
    model_config = models.get_config(
        dict(
            **extra,
            name=str(stored.get("name") or model or hub.get("architecture") or path.stem),
            patches=dict(size=(dims["ph"], dims["pw"])),
            hidden_size=dims["D"],
            transformer=transformer,
            classifier=f["classifier"],
            distillation_token="distillation" in f["features"],
            gelu_approximate=bool(stored.get("gelu_approximate", _architecture(hub) in _GELU_TANH)),
            layernorm_epsilon=float(stored.get("layernorm_epsilon", 1e-6)),
        )
    )
    num_classes = dims.get("N")
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
    return Converted(params, model_config, list(names) if names else None, f["image_size"])


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


def _read_facts(path, state, meta, hub, *, model, num_heads, size) -> dict[str, Any]:
    """The table's dims and features, the pooling and the image size of a timm state dict.

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
    features = {name for name, key in _FEATURE_KEYS.items() if key in state}
    features.add("swiglu" if swiglu else "gelu_mlp")
    if any(_LAYER_SCALE.match(k) for k in state):
        features.add("layer_scale")
    for head in ("head_dist", "head"):  # the class count: head's, else head_dist's
        if head in features:
            dims["N"] = int(state[f"{head}.weight"].shape[0])
    return dict(
        state=state,
        dims=dims,
        layers=layers,
        features=features,
        classifier=pooling,
        image_size=(h, w),
        covers_prefix=covers_prefix,
    )


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
    *,
    class_names: list[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
    source: str = "params",
    normalization: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes a timm `VisionTransformer` state dict (`.safetensors`) and its JSON sidecar.

    The sidecar (`x.json`) holds our model config, class names, image size, `normalization`
    (when given) and the timm constructor arguments (`timm.create_model('vit_base_patch16_224',
    **kwargs)` or `VisionTransformer(**kwargs)`; `VisionTransformerDistilled` with a
    distillation token). Both appear complete or not at all; existing ones are refused unless
    `overwrite` (`weights.files.staged_files`).
    """
    f = vit_facts(
        params,
        model_config,
        image_size=image_size,
        target="timm VisionTransformer",
        classifiers=("token", "gap", "map"),
        features_representation=False,
        distillation=True,
        layer_scale=True,
    )
    options.check_options(
        f.config, "timm VisionTransformer", registers=True, query_key_norm=True, swiglu_mlp=True
    )
    names = class_names_for(f.num_classes, class_names)
    distilled = bool(f.config.distillation_token)
    layer_scale = uses_layer_scale(f.config) or LAYER_SCALE_KEY in f.flat
    on = _features_on(f, layer_scale=layer_scale)
    dims = {**f.dims, "M2": 2 * f.mlp, "NR": options.num_registers(f.config)}
    keys = TABLE.at(layers=f.layers, dims=dims, features=[k for k, v in on.items() if v])
    state = keys.to_theirs(f.flat, source=source, what=f"a {f.config.name or 'ViT'} of this config")
    kwargs = _timm_kwargs(f, layer_scale=layer_scale)
    if float(f.config.layernorm_epsilon) != 1e-6:
        logging.warning(
            "%s: the model uses LayerNorm epsilon %g; timm's VisionTransformer uses 1e-6 unless "
            "given norm_layer=partial(nn.LayerNorm, eps=%g)",
            path,
            f.config.layernorm_epsilon,
            f.config.layernorm_epsilon,
        )
    timm_class = "VisionTransformerDistilled" if distilled else "VisionTransformer"
    meta = Converted({}, f.config, names, f.image_size).metadata(
        timm={"class": timm_class, "kwargs": kwargs}
    )
    if normalization is not None:
        meta["normalization"] = normalization
    out = _write(path, state, meta, overwrite=overwrite)
    logging.info("wrote timm %s state dict to %s", timm_class, out)
    return out


def _write(
    path: str | os.PathLike, state: Mapping[str, Any], meta: dict[str, Any], *, overwrite: bool
) -> epath.Path:
    """The state dict (float32) and its sidecar, both or neither (`files.staged_files`)."""
    out = epath.Path(path)
    sidecar = npz.metadata_path(out).name
    with files.staged_files(out, [sidecar], overwrite=overwrite) as staging:
        pt.dump_safetensors({k: v.astype(np.float32) for k, v in state.items()}, staging / out.name)
        (staging / sidecar).write_text(json.dumps(meta, indent=2))
    return out


def _features_on(f: VitFacts, *, layer_scale: bool) -> dict[str, bool]:
    """Which of the table's optional rows a model of these facts has."""
    distilled = bool(f.config.distillation_token)
    swiglu = options.swiglu(f.config)
    return {
        "class_token": f.config.classifier == "token",
        "distillation": distilled,
        "head": bool(f.num_classes),
        "head_dist": bool(f.num_classes) and distilled,
        "layer_scale": layer_scale,
        "registers": bool(options.num_registers(f.config)),
        "map": f.config.classifier == "map",
        "qk_norm": options.qk_norm(f.config),
        "swiglu": swiglu,
        "gelu_mlp": not swiglu,
    }


def _timm_kwargs(f: VitFacts, *, layer_scale: bool) -> dict[str, Any]:
    """timm's constructor arguments for the model `f` describes."""
    (ph, pw), d = f.patch, f.hidden
    kwargs = {
        "img_size": list(f.image_size),
        "patch_size": ph if ph == pw else [ph, pw],
        "embed_dim": d,
        "depth": f.layers,
        "num_heads": f.heads,
        "mlp_ratio": f.mlp / d,
        "qkv_bias": True,
        "class_token": f.config.classifier == "token",
        "global_pool": {"token": "token", "gap": "avg"}.get(f.config.classifier, "map"),
        "fc_norm": False,
        "num_classes": f.num_classes or 0,
    }
    if f.config.gelu_approximate:
        kwargs["act_layer"] = "gelu_tanh"
    if layer_scale:
        kwargs["init_values"] = float(f.config.transformer.get("layer_scale_init") or 1e-5)
    if options.num_registers(f.config):
        kwargs["reg_tokens"] = options.num_registers(f.config)
    if not f.config.get("posemb_covers_prefix", True):
        kwargs["no_embed_class"] = True
    if options.qk_norm(f.config):
        kwargs["qk_norm"] = True
    if options.swiglu(f.config):
        kwargs["mlp_layer"] = "SwiGLUPacked"
        kwargs["mlp_ratio"] = f.mlp * 2 / d
    return kwargs
