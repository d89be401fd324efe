"""Hugging Face transformers DINOv3 (`DINOv3ViTModel`, model_type 'dinov3_vit') <-> our ViT.

Keys (hub names, as `save_pretrained` writes them; the transformers-5 in-memory names
`model.layer.{i}.` read the same): `embeddings.{cls_token, mask_token, register_tokens,
patch_embeddings}`, `layer.{i}.{norm1, attention.{q_proj, k_proj, v_proj, o_proj},
layer_scale1.lambda1, norm2, mlp.{up_proj, down_proj} | mlp.{gate_proj, up_proj, down_proj}
(gated), layer_scale2.lambda1}`, `norm`. There is no position table: the model rotates the
blocks' queries and keys by 2-D RoPE (our `posemb='rope'`, `rope_theta`; transformers
normalises the coordinates per axis, `rope_normalize_coords='separate'`, and its training-time
`pos_embed_shift` / `_jitter` / `_rescale` are our `rope_train_shift` / `_jitter` / `_rescale`).
`embeddings.mask_token` (masked-image pretraining) is left out when reading and written as
zeros (its initial value), as for DINOv2.

Our model: classifier 'token' (`pooler_output` is the normed class token: our `pre_logits`;
`last_hidden_state` our `encoded`, registers included), LayerScale, `num_registers` registers
after the class token, LayerNorm epsilon `layer_norm_eps` (1e-5). The biases transformers can
leave out (`query_bias`, `key_bias`, `value_bias`, `proj_bias`, `mlp_bias`) are our
`transformer.query_bias` / `key_bias` / `value_bias` / `attention_out_bias` / `mlp_bias`: a bias
that is off has no parameter on either side. The gated MLP (`use_gated_mlp`, `hidden_act`
'silu') is our SwiGLU: `gate_proj` and `up_proj` (each (M, D), M = `intermediate_size`) are our
packed `MlpBlock_3/Dense_0` (D, 2 M) [gate | up], silu(gate) * up, and `mlp_dim` = M; on the way
through the key table they travel as one array under the name `mlp.gate_up_proj` (never in a
file). The plain MLP's `hidden_act` 'gelu' is exact GELU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from vit_jax.weights import codec, hf_common, options
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import Converted, VitFacts
from vit_jax.weights.options import Can
from vit_jax.weights.table import (
    ATTENTION,
    BLOCK,
    CONV,
    DENSE,
    HEADS_IN,
    HEADS_OUT,
    IDENTITY,
    Row,
    Table,
    pair,
)

__all__ = ["CODEC", "MODEL_TYPES", "TABLE", "from_state"]

MODEL_TYPES = ("dinov3_vit",)
_L, _E = BLOCK, "layer.{i}."
_MLP = f"{BLOCK}MlpBlock_3/"
_GATE_UP = "mlp.gate_up_proj"  # gate_proj and up_proj stacked: our packed SwiGLU Dense_0
# our bias option -> transformers' config key
_BIAS_KEYS = {
    "query_bias": "query_bias",
    "key_bias": "key_bias",
    "value_bias": "value_bias",
    "attention_out_bias": "proj_bias",
    "mlp_bias": "mlp_bias",
}
_SILU = ("silu", "swish")


def _weight_and_bias(ours: str, theirs: str, transform, shape: str, bias_when: str, **kw):
    """A layer's rows, its bias present only with the feature `bias_when`."""
    weight, bias = pair(ours, theirs, transform, shape, **kw)
    return weight, Row(bias.ours, bias.theirs, bias.transform, bias.shape, when=bias_when)


TABLE = Table(
    rows=(
        Row("cls", "embeddings.cls_token", IDENTITY, "1 1 D"),
        Row("registers", "embeddings.register_tokens", IDENTITY, "1 NR D", when="registers"),
        *pair("embedding", "embeddings.patch_embeddings", CONV, "ph pw 3 D"),
        *pair("Transformer/encoder_norm", "norm"),
    ),
    block=(
        *pair(f"{_L}LayerNorm_0", f"{_E}norm1"),
        *_weight_and_bias(
            f"{ATTENTION}query", f"{_E}attention.q_proj", HEADS_IN, "D H hd", "query_bias"
        ),
        *_weight_and_bias(
            f"{ATTENTION}key", f"{_E}attention.k_proj", HEADS_IN, "D H hd", "key_bias"
        ),
        *_weight_and_bias(
            f"{ATTENTION}value", f"{_E}attention.v_proj", HEADS_IN, "D H hd", "value_bias"
        ),
        *_weight_and_bias(
            f"{ATTENTION}out", f"{_E}attention.o_proj", HEADS_OUT, "H hd D", "attention_out_bias"
        ),
        Row(f"{_L}LayerScale_1/scale", f"{_E}layer_scale1.lambda1", IDENTITY, "D"),
        *pair(f"{_L}LayerNorm_2", f"{_E}norm2"),
        # plain MLP: up_proj, act, down_proj
        Row(f"{_MLP}Dense_0/kernel", f"{_E}mlp.up_proj.weight", DENSE, "D M", when="mlp"),
        Row(f"{_MLP}Dense_0/bias", f"{_E}mlp.up_proj.bias", IDENTITY, "M", when="up_bias"),
        # gated MLP: [gate_proj | up_proj] packed, silu(gate) * up, down_proj
        Row(f"{_MLP}Dense_0/kernel", f"{_E}{_GATE_UP}.weight", DENSE, "D M2", when="gated"),
        Row(f"{_MLP}Dense_0/bias", f"{_E}{_GATE_UP}.bias", IDENTITY, "M2", when="gate_up_bias"),
        *_weight_and_bias(f"{_MLP}Dense_1", f"{_E}mlp.down_proj", DENSE, "M D", "mlp_bias"),
        Row(f"{_L}LayerScale_3/scale", f"{_E}layer_scale2.lambda1", IDENTITY, "D"),
    ),
)

# What DINOv3 expresses of our options and the config.json key recording each: LayerScale
# (always), the gated MLP, register tokens. No classifier head; RoPE is its only position
# embedding, with per-axis coordinates; each of the blocks' biases may be left out.
_ROWS = (
    Can("layer_scale", None, "layerscale_value",
        lambda f: float(f.config.transformer.get("layer_scale_init") or 1.0), required=True),
    Can("swiglu", "gated", "use_gated_mlp", lambda f: True, off="mlp"),
    Can("num_registers", "registers", "num_register_tokens",
        lambda f: options.num_registers(f.config)),
)  # fmt: skip


def _mlp_features(gated: bool, mlp_bias: bool) -> set[str]:
    """The MLP's key-table features beyond the gated / plain rows: its biases."""
    return {"mlp_bias", "gate_up_bias" if gated else "up_bias"} if mlp_bias else set()


def _hub_state(path: Any, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Hub names (`model.layer.{i}.` -> `layer.{i}.`), gate_proj / up_proj packed."""
    state: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.removeprefix("model.") if key.startswith("model.layer.") else key
        if name in state:
            raise ConversionError(f"{path}: {key!r} and another key both mean {name!r}")
        state[name] = value
    for key in [k for k in state if ".mlp.gate_proj." in k]:
        up = key.replace(".gate_proj.", ".up_proj.")
        if up in state:
            packed = np.concatenate([state.pop(key), state.pop(up)])
            state[key.replace("mlp.gate_proj.", f"{_GATE_UP}.")] = packed
    return state


def _activation(path: Any, config: Mapping[str, Any], gated: bool) -> bool:
    """Our `gelu_approximate` (plain MLP), after checking a gated MLP's activation is SiLU."""
    if not gated:
        return hf_common.gelu_approximate(path, config, "gelu")
    act = config.get("hidden_act", "gelu")
    if act not in _SILU:
        raise ConversionError(
            f"{path}: use_gated_mlp with hidden_act {act!r}: our gated MLP is SwiGLU "
            f"(hidden_act {' or '.join(map(repr, _SILU))})"
        )
    return False


def _augmentation(config: Mapping[str, Any], key: str, off: float) -> float:
    """Our `rope_train_*` value of transformers' `pos_embed_*` (None: `off`)."""
    value = config.get(key)
    return off if value is None else float(value)


def from_state(path: Any, config: Mapping[str, Any], raw: Mapping[str, Any]) -> Converted:
    """Our RoPE LayerScale ViT (with registers) from a DINOv3 model directory's config and
    state."""
    state = _hub_state(path, raw)
    d, heads = hf_common.check_channels_and_heads(path, config)
    ph, pw = pt.pair(config.get("patch_size", 16), "patch_size")
    h, w = pt.pair(config.get("image_size", 224), "image_size")
    gated = bool(config.get("use_gated_mlp", False))
    mlp = int(config.get("intermediate_size", 1536))
    registers = int(config.get("num_register_tokens", 0))
    biases = {ours: bool(config.get(theirs, True)) for ours, theirs in _BIAS_KEYS.items()}
    biases["key_bias"] = bool(config.get("key_bias", False))  # transformers' default
    dims = dict(D=d, H=heads, hd=d // heads, M=mlp, M2=2 * mlp, ph=ph, pw=pw, NR=registers)
    features = {
        "gated" if gated else "mlp",
        *(["registers"] if registers else []),
        *(name for name, on in biases.items() if on and name != "mlp_bias"),
        *_mlp_features(gated, biases["mlp_bias"]),
    }
    ignore = {"the masked-image-modeling mask token": ["embeddings.mask_token"]}
    if not registers and "embeddings.register_tokens" in state:  # (1, 0, D)
        ignore["no register tokens"] = ["embeddings.register_tokens"]
    gelu_approximate = _activation(path, config, gated)
    parsed = codec.Parsed(
        name=str(config.get("_name_or_path") or epath.Path(path).name),
        layers=int(config["num_hidden_layers"]),
        dims=dims,
        features=features,
        ignore=ignore,
        image_size=(h, w),
        resample="linear_align_corners",  # no table: the default, unused
        values=dict(
            layer_scale=float(config.get("layerscale_value", 1.0)), num_registers=registers
        ),
        fields=dict(
            transformer=dict(
                attention_dropout_rate=float(config.get("attention_dropout", 0.0)),
                stochastic_depth_rate=float(config.get("drop_path_rate", 0.0)),
                **biases,
            ),
            classifier="token",
            posemb="rope",
            posemb_grid=None,  # no table: any grid
            rope_theta=float(config.get("rope_theta", 100.0)),
            rope_normalize_coords="separate",
            rope_train_shift=_augmentation(config, "pos_embed_shift", 0.0),
            rope_train_jitter=_augmentation(config, "pos_embed_jitter", 1.0),
            rope_train_rescale=_augmentation(config, "pos_embed_rescale", 1.0),
            gelu_approximate=gelu_approximate,
            layernorm_epsilon=float(config.get("layer_norm_eps", 1e-5)),
        ),
    )
    what = f"a {CODEC.can.target} of this config.json"
    return codec.read(CODEC, state, parsed, source=str(path), what=what)


def _features(f: VitFacts) -> set[str]:
    """The bias rows a model has (the MLP's by its kind)."""
    t = f.config.transformer
    on = {name for name in _BIAS_KEYS if name != "mlp_bias" and t.get(name, True) is not False}
    return on | _mlp_features(options.swiglu(f.config), t.get("mlp_bias", True) is not False)


def _config(f: VitFacts, names: Any) -> dict[str, Any]:
    """The transformers `config.json` of the DINOv3 model `f` describes (the capability rows
    add LayerScale, the gated MLP and the registers)."""
    del names  # no classifier
    c, t = f.config, f.config.transformer
    h, w = f.image_size or (224, 224)  # unused by the model (RoPE): its default
    ph, pw = f.patch

    def augmentation(key: str, off: float) -> float | None:  # transformers: None is off
        value = float(c.get(key, off))
        return None if value == off else value

    return {
        "architectures": [CODEC.can.short],
        "model_type": MODEL_TYPES[0],
        "hidden_size": f.hidden,
        "intermediate_size": f.mlp,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "hidden_act": "silu"
        if options.swiglu(c)
        else ("gelu_pytorch_tanh" if c.gelu_approximate else "gelu"),
        "attention_dropout": float(t.attention_dropout_rate),
        "drop_path_rate": float(t.stochastic_depth_rate),
        "layer_norm_eps": float(c.layernorm_epsilon),
        "initializer_range": 0.02,
        "rope_theta": float(c.get("rope_theta", 100.0)),
        "pos_embed_shift": augmentation("rope_train_shift", 0.0),
        "pos_embed_jitter": augmentation("rope_train_jitter", 1.0),
        "pos_embed_rescale": augmentation("rope_train_rescale", 1.0),
        "image_size": h if h == w else [h, w],
        "patch_size": ph if ph == pw else [ph, pw],
        "num_channels": 3,
        **{theirs: t.get(ours, True) is not False for ours, theirs in _BIAS_KEYS.items()},
        "use_gated_mlp": False,
        "num_register_tokens": 0,
        "dtype": "float32",
    }


def _state(f: VitFacts, state: dict[str, Any]) -> dict[str, Any]:
    """The packed gate / up projections split again; `embeddings.mask_token` as zeros (its
    initial value) and, without registers, the empty `embeddings.register_tokens` transformers
    saves."""
    out = {"embeddings.mask_token": np.zeros((1, 1, f.hidden), np.float32)}
    if not options.num_registers(f.config):
        out["embeddings.register_tokens"] = np.zeros((1, 0, f.hidden), np.float32)
    for key, value in state.items():
        if f".{_GATE_UP}." in key:
            gate, up = np.split(value, 2)
            out[key.replace(f"{_GATE_UP}.", "mlp.gate_proj.")] = gate
            out[key.replace(f"{_GATE_UP}.", "mlp.up_proj.")] = up
        else:
            out[key] = value
    return out


CODEC = codec.Codec(
    options.Capabilities(
        "transformers DINOv3ViTModel",
        rows=_ROWS,
        head=False,
        posembs=("rope",),
        rope_coords=("separate",),
        bias_free=tuple(_BIAS_KEYS),
    ),
    TABLE,
    config=_config,
    save=hf_common.save,
    features=_features,
    state=_state,
)
