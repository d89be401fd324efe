"""Hugging Face transformers DINOv2 (`Dinov2Model`, `Dinov2WithRegistersModel`) <-> our ViT.

Keys (hub names, which transformers 4 and 5 both save and load; transformers-5 in-memory names
`attention.q_proj`, `mlp.gate_proj` / `up_proj` / `down_proj` are renamed on reading):
`embeddings.{cls_token, register_tokens, position_embeddings, patch_embeddings.projection}`,
`encoder.layer.{i}.{norm1, attention.attention.{query,key,value}, attention.output.dense,
layer_scale1.lambda1, norm2, mlp.fc1/fc2 | mlp.weights_in/weights_out (SwiGLU), layer_scale2}`,
`layernorm`. `embeddings.mask_token` (masked-image pretraining) is left out when reading and
written as zeros (its initial value).

Our model: classifier 'token' (`pooler_output` is the normed class token: our `pre_logits`),
LayerScale (`LayerScale_1` / `_3`), `num_registers` register tokens after the class token (the
position table covers the class token and the patches only), exact GELU (`hidden_act` 'gelu'),
LayerNorm epsilon 1e-6. SwiGLU (`use_swiglu_ffn`): `weights_in` (2 M, D) holds the gate rows,
then the up rows — our packed `MlpBlock_3/Dense_0` [x1 | x2], silu(x1) * x2 — with transformers'
hidden width M = (int(int(D * mlp_ratio) * 2 / 3) + 7) // 8 * 8. `Dinov2ForImageClassification`
(a head on [cls, mean of the patches]) is refused by its `classifier.weight`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from vit_jax import models
from vit_jax.weights import hf_common, npz, options
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import (
    LAYER_SCALE_KEY,
    Converted,
    native_posemb,
    uses_layer_scale,
    vit_facts,
)
from vit_jax.weights.table import CONV, DENSE, IDENTITY, Row, Table
from vit_jax.weights.tree import unflatten

__all__ = ["MODEL_TYPES", "TABLE", "from_state", "mlp_width", "to_dir"]

MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_L, _E = hf_common.BLOCK, hf_common.LAYER
# transformers 5 in-memory names -> hub names
_V5_NAMES = (
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.down_proj\."), ".mlp.weights_out."),
)


def _pair(ours: str, theirs: str, transform=IDENTITY, shape: str = "D", **kw) -> tuple[Row, Row]:
    """(weight, bias) rows: LayerNorm `scale` or Dense `kernel`, and `bias`."""
    first = "scale" if transform is IDENTITY else "kernel"
    return (
        Row(f"{ours}/{first}", f"{theirs}.weight", transform, shape, **kw),
        Row(f"{ours}/bias", f"{theirs}.bias", IDENTITY, shape.split()[-1], **kw),
    )


TABLE = Table(
    rows=(
        Row("cls", "embeddings.cls_token", IDENTITY, "1 1 D"),
        Row("registers", "embeddings.register_tokens", IDENTITY, "1 NR D", when="registers"),
        Row(npz.POSEMB_KEY, "embeddings.position_embeddings", IDENTITY, "1 T D"),
        Row("embedding/kernel", "embeddings.patch_embeddings.projection.weight", CONV, "ph pw 3 D"),
        Row("embedding/bias", "embeddings.patch_embeddings.projection.bias", IDENTITY, "D"),
        *_pair("Transformer/encoder_norm", "layernorm"),
    ),
    block=(
        *_pair(f"{_L}LayerNorm_0", f"{_E}norm1"),
        *hf_common.attention_rows(),
        Row(f"{_L}LayerScale_1/scale", f"{_E}layer_scale1.lambda1", IDENTITY, "D"),
        *_pair(f"{_L}LayerNorm_2", f"{_E}norm2"),
        *_pair(f"{_L}MlpBlock_3/Dense_0", f"{_E}mlp.fc1", DENSE, "D M", when="mlp"),
        *_pair(f"{_L}MlpBlock_3/Dense_1", f"{_E}mlp.fc2", DENSE, "M D", when="mlp"),
        *_pair(f"{_L}MlpBlock_3/Dense_0", f"{_E}mlp.weights_in", DENSE, "D M2", when="swiglu"),
        *_pair(f"{_L}MlpBlock_3/Dense_1", f"{_E}mlp.weights_out", DENSE, "M D", when="swiglu"),
        Row(f"{_L}LayerScale_3/scale", f"{_E}layer_scale2.lambda1", IDENTITY, "D"),
    ),
)


def mlp_width(hidden: int, mlp_ratio: float, swiglu: bool) -> int:
    """transformers' MLP hidden width (SwiGLU: 2/3 of it, rounded up to a multiple of 8)."""
    width = int(hidden * mlp_ratio)
    return (int(width * 2 / 3) + 7) // 8 * 8 if swiglu else width


def _mlp_ratio(hidden: int, mlp: int, swiglu: bool) -> int:
    """The integer `mlp_ratio` (transformers 5 types it int) for which transformers builds an
    MLP of width `mlp`, else an error."""
    guess = round((mlp * 3 / 2 if swiglu else mlp) / hidden)
    for ratio in (guess, guess - 1, guess + 1):
        if ratio > 0 and mlp_width(hidden, ratio, swiglu) == mlp:
            return ratio
    kind = "SwiGLU " if swiglu else ""
    raise ConversionError(
        f"transformers DINOv2 cannot build a {kind}MLP of width {mlp} for width {hidden}: its "
        "width is hidden_size x an integer mlp_ratio (SwiGLU: 2/3 of it, a multiple of 8)"
    )


def _hub_state(path: Any, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Hub names: transformers-5 in-memory names renamed, gate/up projections packed."""
    state: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.removeprefix("dinov2.").removeprefix("dinov2_with_registers.")
        for pattern, replacement in _V5_NAMES:
            name = pattern.sub(replacement, name)
        if name in state:
            raise ConversionError(f"{path}: {key!r} and another key both mean {name!r}")
        state[name] = value
    for key in [k for k in state if ".mlp.gate_proj." in k]:
        up = key.replace(".gate_proj.", ".up_proj.")
        if up in state:
            packed = np.concatenate([state.pop(key), state.pop(up)])
            state[key.replace(".gate_proj.", ".weights_in.")] = packed
    return state


def _facts(path: Any, config: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """The table's dims and features from a DINOv2 `config.json`."""
    if "classifier.weight" in state:
        raise ConversionError(
            f"{path}: classifier.weight: Dinov2ForImageClassification classifies from the class "
            "token and the mean patch token together, which our ViT cannot express; "
            "Dinov2Model / Dinov2WithRegistersModel convert"
        )
    d, heads = hf_common.check_channels_and_heads(path, config)
    swiglu = bool(config.get("use_swiglu_ffn", False))
    ph, pw = pt.pair(config.get("patch_size", 14), "patch_size")
    h, w = pt.pair(config.get("image_size", 224), "image_size")
    mlp = mlp_width(d, float(config.get("mlp_ratio", 4)), swiglu)
    registers = int(config.get("num_register_tokens", 4)) if _registers(config) else 0
    dims = dict(D=d, H=heads, hd=d // heads, M=mlp, M2=2 * mlp, ph=ph, pw=pw, NR=registers)
    dims["T"] = (h // ph) * (w // pw) + 1
    features = {"swiglu" if swiglu else "mlp"}
    features.update(["registers"] if registers else [])
    qkv_bias = bool(config.get("qkv_bias", True))
    features.update(["qkv_bias"] if qkv_bias else [])
    return dict(
        dims=dims,
        features=features,
        zeros=() if qkv_bias else ("qkv_bias",),
        layers=int(config["num_hidden_layers"]),
        image_size=(h, w),
        swiglu=swiglu,
    )


def _registers(config: Mapping[str, Any]) -> bool:
    return config.get("model_type") == "dinov2_with_registers"


def from_state(path: Any, config: Mapping[str, Any], raw: Mapping[str, Any]) -> Converted:
    """Our LayerScale ViT (with registers) from a DINOv2 model directory's config and state."""
    state = _hub_state(path, raw)
    f = _facts(path, config, state)
    dims = f["dims"]
    keys = TABLE.at(layers=f["layers"], dims=dims, features=f["features"], zeros=f["zeros"])
    what = f"a transformers {'Dinov2WithRegistersModel' if _registers(config) else 'Dinov2Model'}"
    flat = keys.to_ours(
        state,
        source=str(path),
        what=f"{what} of this config.json",
        ignore={"the masked-image-modeling mask token": ["embeddings.mask_token"]},
    )
    transformer = dict(
        mlp_dim=dims["M"],
        num_heads=dims["H"],
        num_layers=f["layers"],
        dropout_rate=float(config.get("hidden_dropout_prob", 0.0)),
        attention_dropout_rate=float(config.get("attention_probs_dropout_prob", 0.0)),
        stochastic_depth_rate=float(config.get("drop_path_rate", 0.0)),
        layer_scale_init=float(config.get("layerscale_value", 1.0)),
    )
    if f["swiglu"]:
        transformer["mlp_type"] = "swiglu"
    spec = dict(
        name=str(config.get("_name_or_path") or epath.Path(path).name),
        patches=dict(size=(dims["ph"], dims["pw"])),
        hidden_size=dims["D"],
        transformer=transformer,
        classifier="token",
        gelu_approximate=hf_common.gelu_approximate(path, config, "gelu"),
        layernorm_epsilon=float(config.get("layer_norm_eps", 1e-6)),
    )
    # transformers' interpolate_pos_encoding: bicubic, antialiased in Dinov2WithRegisters
    resample = "bicubic_antialias" if dims["NR"] else "bicubic"
    spec.update(native_posemb(f["image_size"], (dims["ph"], dims["pw"]), resample))
    if dims["NR"]:
        spec.update(num_registers=dims["NR"])
    params = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    return Converted(params, models.get_config(spec), None, f["image_size"])


def to_dir(
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
    """Writes a `Dinov2Model` / `Dinov2WithRegistersModel` (with register tokens) directory.

    The model needs LayerScale and the class token and no classifier head (transformers'
    DINOv2 classifier reads [cls, mean patch]); square images (transformers resamples a square
    position table).
    """
    del class_names  # no classifier
    config = models.get_config(model_config)
    registers = options.num_registers(config)
    arch = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
    f = vit_facts(
        params,
        config,
        image_size=image_size,
        target=f"transformers {arch}",
        classifiers=("token",),
        features_representation=False,
        distillation=False,
        layer_scale=True,
    )
    options.check_options(config, f"transformers {arch}", registers=True, swiglu_mlp=True)
    problems = []
    if not (uses_layer_scale(config) or LAYER_SCALE_KEY in f.flat):
        problems.append("no LayerScale (DINOv2 blocks always scale their branches)")
    if f.num_classes:
        problems.append(f"a classifier head/kernel {tuple(f.flat['head/kernel'].shape)}")
    if f.image_size[0] != f.image_size[1] or f.patch[0] != f.patch[1]:
        problems.append(f"image {f.image_size} / patch {f.patch} not square")
    if problems:
        raise ConversionError(
            f"transformers {arch} cannot express {config.name}: " + "; ".join(problems)
        )
    swiglu = options.swiglu(config)
    dims = {**f.dims, "M2": 2 * f.mlp, "NR": registers}
    features = {"qkv_bias", "swiglu" if swiglu else "mlp", *(["registers"] if registers else [])}
    state = TABLE.at(layers=f.layers, dims=dims, features=features).to_theirs(
        f.flat, source=source, what=f"a {config.name or 'DINOv2'} of this config"
    )
    state["embeddings.mask_token"] = np.zeros((1, f.hidden), np.float32)
    written = dict(normalization=normalization, image_size=image_size, overwrite=overwrite)
    return hf_common.write_dir(state, _config(f, arch, registers, swiglu), path, **written)


def _config(f: Any, arch: str, registers: int, swiglu: bool) -> dict[str, Any]:
    """The transformers `config.json` of the DINOv2 model `f` describes."""
    t = f.config.transformer
    config = {
        "architectures": [arch],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": f.hidden,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "mlp_ratio": _mlp_ratio(f.hidden, f.mlp, swiglu),
        "hidden_act": "gelu_pytorch_tanh" if f.config.gelu_approximate else "gelu",
        "hidden_dropout_prob": float(t.dropout_rate),
        "attention_probs_dropout_prob": float(t.attention_dropout_rate),
        "drop_path_rate": float(t.stochastic_depth_rate),
        "layer_norm_eps": float(f.config.layernorm_epsilon),
        "layerscale_value": float(t.get("layer_scale_init") or 1.0),
        "image_size": f.image_size[0],
        "patch_size": f.patch[0],
        "num_channels": 3,
        "qkv_bias": True,
        "use_swiglu_ffn": swiglu,
        "use_mask_token": True,
        "dtype": "float32",
    }
    if registers:
        config["num_register_tokens"] = registers
    return config
