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

from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath

from vit_jax.weights import codec, hf_common, npz, options
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import Converted, VitFacts
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
    UNBATCHED,
    Row,
    Table,
    pair,
)

__all__ = ["CAN", "CODEC", "MODEL_TYPES", "PREFIX", "TABLE", "from_state"]

MODEL_TYPES = ("siglip_vision_model", "siglip")
PREFIX = "vision_model."
_QKV = ("query", "key", "value")
_L, _A, _M, _MA = BLOCK, ATTENTION, MAP, MAP_ATTENTION
_E = "encoder.layers.{i}."


# Hub names without `vision_model.`.
TABLE = Table(
    rows=(
        *pair("embedding", "embeddings.patch_embedding", CONV, "ph pw 3 D"),
        Row(npz.POSEMB_KEY, "embeddings.position_embedding.weight", UNBATCHED, "1 T D"),
        *pair("Transformer/encoder_norm", "post_layernorm"),
        Row(f"{_M}probe", "head.probe", IDENTITY, "1 1 D"),
        Row(tuple(f"{_MA}{n}/kernel" for n in _QKV), "head.attention.in_proj_weight", HEADS_IN,
            "D H hd"),
        Row(tuple(f"{_MA}{n}/bias" for n in _QKV), "head.attention.in_proj_bias", HEADS_BIAS,
            "H hd"),
        *pair(f"{_MA}out", "head.attention.out_proj", HEADS_OUT, "H hd D"),
        *pair(f"{_M}LayerNorm_0", "head.layernorm"),
        *pair(f"{_M}MlpBlock_0/Dense_0", "head.mlp.fc1", DENSE, "D M"),
        *pair(f"{_M}MlpBlock_0/Dense_1", "head.mlp.fc2", DENSE, "M D"),
    ),
    block=(
        *pair(f"{_L}LayerNorm_0", f"{_E}layer_norm1"),
        *pair(f"{_A}query", f"{_E}self_attn.q_proj", HEADS_IN, "D H hd"),
        *pair(f"{_A}key", f"{_E}self_attn.k_proj", HEADS_IN, "D H hd"),
        *pair(f"{_A}value", f"{_E}self_attn.v_proj", HEADS_IN, "D H hd"),
        *pair(f"{_A}out", f"{_E}self_attn.out_proj", HEADS_OUT, "H hd D"),
        *pair(f"{_L}LayerNorm_2", f"{_E}layer_norm2"),
        *pair(f"{_L}MlpBlock_3/Dense_0", f"{_E}mlp.fc1", DENSE, "D M"),
        *pair(f"{_L}MlpBlock_3/Dense_1", f"{_E}mlp.fc2", DENSE, "M D"),
    ),
)  # fmt: skip

# SiglipVisionModel expresses none of our options: MAP pooling, no classifier head (e.g.
# big_vision's `img/head` projection is refused, naming it), square images and patches.
CAN = options.Capabilities(
    "transformers SiglipVisionModel", classifiers=("map",), head=False, square=True
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
        return vision, hf_common.hub_state(path, raw, (PREFIX,), "siglip")
    return dict(config), hf_common.hub_state(path, raw, (PREFIX,), "siglip")


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
    mlp = int(vision["intermediate_size"])
    parsed = codec.Parsed(
        name=str(config.get("_name_or_path") or epath.Path(path).name),
        layers=int(vision["num_hidden_layers"]),
        dims=dict(D=d, H=heads, hd=d // heads, M=mlp, ph=ph, pw=pw, T=(h // ph) * (w // pw)),
        features=set(),
        image_size=(h, w),
        resample="bicubic",  # SiglipVisionEmbeddings.interpolate_pos_encoding: plain bicubic
        fields=dict(
            transformer=dict(attention_dropout_rate=float(vision.get("attention_dropout", 0.0))),
            classifier="map",
            posemb="learn",
            gelu_approximate=hf_common.gelu_approximate(path, vision, "gelu_pytorch_tanh"),
            layernorm_epsilon=float(vision.get("layer_norm_eps", 1e-6)),
        ),
    )
    what = "a transformers SiglipVisionModel of this config.json"
    return codec.read(CODEC, state, parsed, source=str(path), what=what)


def _config(f: VitFacts, names: Any) -> dict[str, Any]:
    """The `config.json` of the SigLIP image tower `f` describes."""
    del names  # SiglipVisionModel has no classifier
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": f.hidden,
        "intermediate_size": f.mlp,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "num_channels": 3,
        "image_size": f.image_size[0],
        "patch_size": f.patch[0],
        "hidden_act": "gelu_pytorch_tanh" if f.config.gelu_approximate else "gelu",
        "layer_norm_eps": float(f.config.layernorm_epsilon),
        "attention_dropout": float(f.config.transformer.attention_dropout_rate),
        "vision_use_head": True,
        "dtype": "float32",
    }


CODEC = codec.Codec(
    CAN,
    TABLE,
    config=_config,
    save=hf_common.save,
    state=lambda f, state: {f"{PREFIX}{k}": v for k, v in state.items()},
)
