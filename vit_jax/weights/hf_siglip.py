"""Hugging Face transformers SigLIP image towers (`SiglipVisionModel`) <-> our ViT.

Reads `model_type` 'siglip_vision_model' (keys with or without `vision_model.`, as
transformers 4 / 5 save them) and the image tower of a full 'siglip' checkpoint (its
`vision_config`, keys `vision_model.*`; the text tower and `logit_scale` / `logit_bias` are
left out with one log line). Writes `SiglipVisionModel` directories with `vision_model.` keys,
which transformers 4 and 5 both load.

Our model: no class token, learned position embeddings over the patch grid (`nn.Embedding`
`position_embedding.weight` (N, D) is our (1, N, D) table), the blocks, `post_layernorm` as
`Transformer/encoder_norm`, classifier 'map': the head's torch `nn.MultiheadAttention`
(`in_proj_weight` (3D, D): query, key, value rows; `out_proj`), `probe`, `layernorm` and
`mlp.fc1/fc2` are `MAPHead_0/{MultiHeadDotProductAttention_0, probe, LayerNorm_0, MlpBlock_0}`.
`hidden_act` 'gelu_pytorch_tanh' is our tanh GELU; LayerNorm epsilon `layer_norm_eps` (1e-6).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from vit_jax import models
from vit_jax.weights import hf_common, npz, options
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import Converted, native_posemb, vit_facts
from vit_jax.weights.table import (
    CONV,
    DENSE,
    HEADS_BIAS,
    HEADS_IN,
    HEADS_OUT,
    IDENTITY,
    UNBATCHED,
    Row,
    Table,
)
from vit_jax.weights.tree import unflatten

__all__ = ["MODEL_TYPES", "PREFIX", "TABLE", "from_state", "to_dir"]

MODEL_TYPES = ("siglip_vision_model", "siglip")
PREFIX = "vision_model."
_QKV = ("query", "key", "value")
_L = "Transformer/encoderblock_{i}/"
_A = f"{_L}MultiHeadDotProductAttention_1/"
_E = "encoder.layers.{i}."
_M = "MAPHead_0/"
_MA = f"{_M}MultiHeadDotProductAttention_0/"


def _norm(ours: str, theirs: str) -> tuple[Row, Row]:
    return (
        Row(f"{ours}/scale", f"{theirs}.weight", IDENTITY, "D"),
        Row(f"{ours}/bias", f"{theirs}.bias", IDENTITY, "D"),
    )


def _dense(ours: str, theirs: str, shape: str) -> tuple[Row, Row]:
    return (
        Row(f"{ours}/kernel", f"{theirs}.weight", DENSE, shape),
        Row(f"{ours}/bias", f"{theirs}.bias", IDENTITY, shape.split()[-1]),
    )


def _projection(ours: str, theirs: str) -> tuple[Row, Row]:
    return (
        Row(f"{_A}{ours}/kernel", f"{_E}self_attn.{theirs}.weight", HEADS_IN, "D H hd"),
        Row(f"{_A}{ours}/bias", f"{_E}self_attn.{theirs}.bias", HEADS_BIAS, "H hd"),
    )


# Hub names without `vision_model.`.
TABLE = Table(
    rows=(
        Row("embedding/kernel", "embeddings.patch_embedding.weight", CONV, "ph pw 3 D"),
        Row("embedding/bias", "embeddings.patch_embedding.bias", IDENTITY, "D"),
        Row(npz.POSEMB_KEY, "embeddings.position_embedding.weight", UNBATCHED, "1 T D"),
        *_norm("Transformer/encoder_norm", "post_layernorm"),
        Row(f"{_M}probe", "head.probe", IDENTITY, "1 1 D"),
        Row(
            tuple(f"{_MA}{n}/kernel" for n in _QKV),
            "head.attention.in_proj_weight",
            HEADS_IN,
            "D H hd",
        ),
        Row(
            tuple(f"{_MA}{n}/bias" for n in _QKV), "head.attention.in_proj_bias", HEADS_BIAS, "H hd"
        ),
        Row(f"{_MA}out/kernel", "head.attention.out_proj.weight", HEADS_OUT, "H hd D"),
        Row(f"{_MA}out/bias", "head.attention.out_proj.bias", IDENTITY, "D"),
        *_norm(f"{_M}LayerNorm_0", "head.layernorm"),
        *_dense(f"{_M}MlpBlock_0/Dense_0", "head.mlp.fc1", "D M"),
        *_dense(f"{_M}MlpBlock_0/Dense_1", "head.mlp.fc2", "M D"),
    ),
    block=(
        *_norm(f"{_L}LayerNorm_0", f"{_E}layer_norm1"),
        *_projection("query", "q_proj"),
        *_projection("key", "k_proj"),
        *_projection("value", "v_proj"),
        Row(f"{_A}out/kernel", f"{_E}self_attn.out_proj.weight", HEADS_OUT, "H hd D"),
        Row(f"{_A}out/bias", f"{_E}self_attn.out_proj.bias", IDENTITY, "D"),
        *_norm(f"{_L}LayerNorm_2", f"{_E}layer_norm2"),
        *_dense(f"{_L}MlpBlock_3/Dense_0", f"{_E}mlp.fc1", "D M"),
        *_dense(f"{_L}MlpBlock_3/Dense_1", f"{_E}mlp.fc2", "M D"),
    ),
)


def _vision_state(path: Any, config: Mapping[str, Any], raw: Mapping[str, Any]):
    """(the vision config, the vision tower's state without `vision_model.`)."""
    if config.get("model_type") == "siglip":
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise ConversionError(f"{path}: a 'siglip' config.json without a vision_config")
        rest = sorted(k for k in raw if not k.startswith(PREFIX))
        if rest:
            logging.info(
                "%s: reading the image tower; leaving out %d entries of the text tower and the "
                "logit scale / bias (e.g. %s)",
                path,
                len(rest),
                rest[0],
            )
        raw = {k: v for k, v in raw.items() if k.startswith(PREFIX)}
        return vision, hf_common.strip_prefix(path, raw, PREFIX)
    return dict(config), hf_common.strip_prefix(path, raw, PREFIX)


def from_state(path: Any, config: Mapping[str, Any], raw: Mapping[str, Any]) -> Converted:
    """Our MAP-pooled ViT (params, config, image size) from a SigLIP image tower."""
    vision, state = _vision_state(path, config, raw)
    if not vision.get("vision_use_head", True):
        raise ConversionError(
            f"{path}: vision_use_head false: a SigLIP tower without its MAP head (our SigLIP "
            "models pool with it, classifier 'map')"
        )
    d, heads = hf_common.check_channels_and_heads(path, vision)
    ph, pw = pt.pair(vision.get("patch_size", 16), "patch_size")
    h, w = pt.pair(vision.get("image_size", 224), "image_size")
    layers, mlp = int(vision["num_hidden_layers"]), int(vision["intermediate_size"])
    dims = dict(D=d, H=heads, hd=d // heads, M=mlp, ph=ph, pw=pw, T=(h // ph) * (w // pw))
    flat = TABLE.at(layers=layers, dims=dims).to_ours(
        state, source=str(path), what="a transformers SiglipVisionModel of this config.json"
    )
    model_config = models.get_config(
        dict(
            name=str(config.get("_name_or_path") or epath.Path(path).name),
            patches=dict(size=(ph, pw)),
            hidden_size=d,
            transformer=dict(
                mlp_dim=mlp,
                num_heads=heads,
                num_layers=layers,
                attention_dropout_rate=float(vision.get("attention_dropout", 0.0)),
            ),
            classifier="map",
            posemb="learn",
            gelu_approximate=hf_common.gelu_approximate(path, vision, "gelu_pytorch_tanh"),
            layernorm_epsilon=float(vision.get("layer_norm_eps", 1e-6)),
            # transformers SiglipVisionEmbeddings.interpolate_pos_encoding: plain bicubic
            **native_posemb((h, w), (ph, pw), "bicubic"),
        )
    )
    params = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    return Converted(params, model_config, None, (h, w))


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
    """Writes a `SiglipVisionModel` directory (square images only, as transformers has them;
    `hf_common.write_dir`). It has no place for a classifier `head` (e.g. big_vision's
    `img/head` projection): such models are refused, naming it."""
    del class_names  # SiglipVisionModel has no classifier
    target = "transformers SiglipVisionModel"
    f = vit_facts(
        params,
        model_config,
        image_size=image_size,
        target=target,
        classifiers=("map",),
        features_representation=False,
        distillation=False,
        layer_scale=False,
    )
    options.check_options(f.config, target)
    if f.num_classes:
        raise ConversionError(
            f"{target} has no classifier: {f.config.name or 'the model'} has head/kernel "
            f"{tuple(f.flat['head/kernel'].shape)}; convert it without its head"
        )
    (ph, pw), (h, w) = f.patch, f.image_size
    if ph != pw or h != w:
        raise ConversionError(
            f"{target} takes square images and patches; got image {h}x{w}, patch {ph}x{pw}"
        )
    state = TABLE.at(layers=f.layers, dims=f.dims).to_theirs(
        f.flat, source=source, what=f"a {f.config.name or 'SigLIP'} of this config"
    )
    config = {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": f.hidden,
        "intermediate_size": f.mlp,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "num_channels": 3,
        "image_size": h,
        "patch_size": ph,
        "hidden_act": "gelu_pytorch_tanh" if f.config.gelu_approximate else "gelu",
        "layer_norm_eps": float(f.config.layernorm_epsilon),
        "attention_dropout": float(f.config.transformer.attention_dropout_rate),
        "vision_use_head": True,
        "dtype": "float32",
    }
    written = dict(normalization=normalization, image_size=image_size, overwrite=overwrite)
    state = {f"{PREFIX}{k}": v for k, v in state.items()}
    return hf_common.write_dir(state, config, path, **written)
