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

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from vit_jax.weights import codec, hf_common, npz, options
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import Converted, VitFacts
from vit_jax.weights.options import Can
from vit_jax.weights.table import BLOCK, CONV, DENSE, IDENTITY, Row, Table, pair

__all__ = ["CODECS", "MODEL_TYPES", "TABLE", "from_state", "mlp_width"]

MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_L, _E = BLOCK, hf_common.LAYER

TABLE = Table(
    rows=(
        Row("cls", "embeddings.cls_token", IDENTITY, "1 1 D"),
        Row("registers", "embeddings.register_tokens", IDENTITY, "1 NR D", when="registers"),
        Row(npz.POSEMB_KEY, "embeddings.position_embeddings", IDENTITY, "1 T D"),
        *pair("embedding", "embeddings.patch_embeddings.projection", CONV, "ph pw 3 D"),
        *pair("Transformer/encoder_norm", "layernorm"),
    ),
    block=(
        *pair(f"{_L}LayerNorm_0", f"{_E}norm1"),
        *hf_common.attention_rows(),
        Row(f"{_L}LayerScale_1/scale", f"{_E}layer_scale1.lambda1", IDENTITY, "D"),
        *pair(f"{_L}LayerNorm_2", f"{_E}norm2"),
        *pair(f"{_L}MlpBlock_3/Dense_0", f"{_E}mlp.fc1", DENSE, "D M", when="gelu_mlp"),
        *pair(f"{_L}MlpBlock_3/Dense_1", f"{_E}mlp.fc2", DENSE, "M D", when="gelu_mlp"),
        *pair(f"{_L}MlpBlock_3/Dense_0", f"{_E}mlp.weights_in", DENSE, "D M2", when="swiglu"),
        *pair(f"{_L}MlpBlock_3/Dense_1", f"{_E}mlp.weights_out", DENSE, "M D", when="swiglu"),
        Row(f"{_L}LayerScale_3/scale", f"{_E}layer_scale2.lambda1", IDENTITY, "D"),
    ),
)

# What DINOv2 expresses of our options and the config.json key recording each: LayerScale
# (always), SwiGLU and, in Dinov2WithRegistersModel, register tokens. No classifier head
# (Dinov2ForImageClassification reads [cls, mean patch]); square images and patches.
_ROWS = (
    Can("layer_scale", None, "layerscale_value",
        lambda f: float(f.config.transformer.get("layer_scale_init") or 1.0), required=True),
    Can("swiglu", "swiglu", "use_swiglu_ffn", lambda f: True, off="gelu_mlp"),
)  # fmt: skip
_REGISTERS = Can(
    "num_registers", "registers", "num_register_tokens", lambda f: options.num_registers(f.config)
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
    state = hf_common.hub_state(path, raw, tuple(f"{t}." for t in MODEL_TYPES), MODEL_TYPES[0])
    for key in [k for k in state if ".mlp.gate_proj." in k]:
        up = key.replace(".gate_proj.", ".up_proj.")
        if up in state:
            packed = np.concatenate([state.pop(key), state.pop(up)])
            state[key.replace(".gate_proj.", ".weights_in.")] = packed
    return state


def from_state(path: Any, config: Mapping[str, Any], raw: Mapping[str, Any]) -> Converted:
    """Our LayerScale ViT (with registers) from a DINOv2 model directory's config and state."""
    state = _hub_state(path, raw)
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
    with_registers = config.get("model_type") == "dinov2_with_registers"
    registers = int(config.get("num_register_tokens", 4)) if with_registers else 0
    dims = dict(D=d, H=heads, hd=d // heads, M=mlp, M2=2 * mlp, ph=ph, pw=pw, NR=registers)
    dims["T"] = (h // ph) * (w // pw) + 1
    features = {"swiglu" if swiglu else "gelu_mlp", *(["registers"] if registers else [])}
    qkv_bias = bool(config.get("qkv_bias", True))
    parsed = codec.Parsed(
        name=str(config.get("_name_or_path") or epath.Path(path).name),
        layers=int(config["num_hidden_layers"]),
        dims=dims,
        features=features | ({"qkv_bias"} if qkv_bias else set()),
        zeros=() if qkv_bias else ("qkv_bias",),
        ignore={"the masked-image-modeling mask token": ["embeddings.mask_token"]},
        image_size=(h, w),
        # transformers' interpolate_pos_encoding: bicubic, antialiased in Dinov2WithRegisters
        resample="bicubic_antialias" if registers else "bicubic",
        values=dict(
            layer_scale=float(config.get("layerscale_value", 1.0)), num_registers=registers
        ),
        fields=dict(
            transformer=dict(
                dropout_rate=float(config.get("hidden_dropout_prob", 0.0)),
                attention_dropout_rate=float(config.get("attention_probs_dropout_prob", 0.0)),
                stochastic_depth_rate=float(config.get("drop_path_rate", 0.0)),
            ),
            classifier="token",
            gelu_approximate=hf_common.gelu_approximate(path, config, "gelu"),
            layernorm_epsilon=float(config.get("layer_norm_eps", 1e-6)),
        ),
    )
    c = CODECS[with_registers]
    return codec.read(
        c, state, parsed, source=str(path), what=f"a {c.can.target} of this config.json"
    )


def _config(f: VitFacts, names: Any) -> dict[str, Any]:
    """The transformers `config.json` of the DINOv2 model `f` describes (its options' entries:
    the capability rows)."""
    del names  # no classifier
    t, registers = f.config.transformer, bool(options.num_registers(f.config))
    return {
        "architectures": [CODECS[registers].can.short],
        "model_type": MODEL_TYPES[registers],
        "hidden_size": f.hidden,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "mlp_ratio": _mlp_ratio(f.hidden, f.mlp, options.swiglu(f.config)),
        "hidden_act": "gelu_pytorch_tanh" if f.config.gelu_approximate else "gelu",
        "hidden_dropout_prob": float(t.dropout_rate),
        "attention_probs_dropout_prob": float(t.attention_dropout_rate),
        "drop_path_rate": float(t.stochastic_depth_rate),
        "layer_norm_eps": float(f.config.layernorm_epsilon),
        "image_size": f.image_size[0],
        "patch_size": f.patch[0],
        "num_channels": 3,
        "qkv_bias": True,
        "use_swiglu_ffn": False,
        "use_mask_token": True,
        "dtype": "float32",
    }


def _with_mask_token(f: VitFacts, state: dict[str, Any]) -> dict[str, Any]:
    """`embeddings.mask_token` (masked-image pretraining) as zeros, its initial value."""
    return {**state, "embeddings.mask_token": np.zeros((1, f.hidden), np.float32)}


# `Dinov2Model`, and `Dinov2WithRegistersModel` for models with register tokens.
CODECS = tuple(
    codec.Codec(
        options.Capabilities(f"transformers {arch}", rows=rows, head=False, square=True),
        TABLE,
        config=_config,
        save=hf_common.save,
        features=lambda f: {"qkv_bias"},
        state=_with_mask_token,
    )
    for arch, rows in (("Dinov2Model", _ROWS), ("Dinov2WithRegistersModel", (*_ROWS, _REGISTERS)))
)
