"""Hugging Face transformers `SiglipModel` (both towers) <-> our `TwoTower`.

A `save_pretrained` directory of `model_type` 'siglip' holds `vision_model.*` (the image tower:
`hf_siglip`'s table under that prefix, read and written by `hf_siglip` itself), `text_model.*`
(the text tower, `TEXT_TABLE` here) and `logit_scale` / `logit_bias` (1,). Our parameters are
`{'img': ..., 'txt': ..., 'logit_scale', 'logit_bias'}` (`vit_jax.models.two_tower`).

Text tower keys (without `text_model.`): `embeddings.token_embedding.weight` (V, D) is our
`token_embedding/embedding`, `embeddings.position_embedding.weight` (max_len, D) our (1,
max_len, D) table, `encoder.layers.{i}.*` the same rows as the image tower's blocks (our block
names are shared), `final_layer_norm` our `Transformer/encoder_norm`, `head` (P, D) our `head`.
Safetensors only (a `.bin` is read weights-only by `hf_common`); never a pickle.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from etils import epath

from vit_jax.models.text import TextConfig
from vit_jax.weights import codec, hf_common, hf_siglip, npz
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.table import DENSE, IDENTITY, UNBATCHED, Row, Table, pair
from vit_jax.weights.tree import flatten, unflatten

__all__ = [
    "MODEL_TYPE",
    "TABLE",
    "TEXT_PREFIX",
    "TEXT_TABLE",
    "TwoTowerConverted",
    "from_state",
    "read",
    "text_config_from_hf",
    "text_config_to_hf",
    "write",
]

MODEL_TYPE = "siglip"
TEXT_PREFIX = "text_model."
IMG, TXT = "img", "txt"  # our two towers' parameter subtrees

# The text tower, keys without `text_model.`; the blocks are the image tower's rows.
TEXT_TABLE = Table(
    rows=(
        Row("token_embedding/embedding", "embeddings.token_embedding.weight", IDENTITY, "V D"),
        Row(npz.POSEMB_KEY, "embeddings.position_embedding.weight", UNBATCHED, "1 L D"),
        *pair("Transformer/encoder_norm", "final_layer_norm"),
        *pair("head", "head", DENSE, "D P"),
    ),
    block=hf_siglip.TABLE.block,
)


def _prefixed(rows: tuple[Row, ...], ours: str, theirs: str) -> tuple[Row, ...]:
    def fix(key: str | tuple[str, ...]) -> str | tuple[str, ...]:
        return f"{ours}{key}" if isinstance(key, str) else tuple(f"{ours}{k}" for k in key)

    return tuple(
        dataclasses.replace(r, ours=fix(r.ours), theirs=f"{theirs}{r.theirs}") for r in rows
    )


# Everything of a SiglipModel but its image tower: the text tower and the logit scale / bias.
TABLE = Table(
    rows=(
        *_prefixed(TEXT_TABLE.rows, f"{TXT}/", TEXT_PREFIX),
        Row("logit_scale", "logit_scale", IDENTITY, "1"),
        Row("logit_bias", "logit_bias", IDENTITY, "1"),
    ),
    block=_prefixed(TEXT_TABLE.block, f"{TXT}/", TEXT_PREFIX),
)


class TwoTowerConverted(NamedTuple):
    """A two-tower model read from a SiglipModel directory."""

    params: dict[str, Any]  # {'img', 'txt', 'logit_scale', 'logit_bias'}
    image_config: ml_collections.ConfigDict  # our ViT config of the image tower
    text_config: TextConfig
    image_size: tuple[int, int]


def text_config_from_hf(path: Any, text: Mapping[str, Any]) -> TextConfig:
    """Our `TextConfig` from a `text_config` (transformers `SiglipTextConfig`) dict."""
    d, heads = hf_common.check_channels_and_heads(path, text)
    try:
        return TextConfig(
            vocab_size=int(text.get("vocab_size", 32000)),
            hidden_size=d,
            mlp_dim=int(text.get("intermediate_size", 3072)),
            num_layers=int(text.get("num_hidden_layers", 12)),
            num_heads=heads,
            max_len=int(text.get("max_position_embeddings", 64)),
            layernorm_epsilon=float(text.get("layer_norm_eps", 1e-6)),
            projection_size=int(text.get("projection_size") or d),
            gelu_approximate=hf_common.gelu_approximate(path, text, "gelu_pytorch_tanh"),
        )
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: text_config: {e}") from None


def text_config_to_hf(c: TextConfig) -> dict[str, Any]:
    """The `text_config` entry of a SiglipModel `config.json` for `c`."""
    return {
        "model_type": "siglip_text_model",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "max_position_embeddings": c.max_len,
        "hidden_act": "gelu_pytorch_tanh" if c.gelu_approximate else "gelu",
        "layer_norm_eps": float(c.layernorm_epsilon),
        "attention_dropout": 0.0,
        "projection_size": c.head_width,
    }


def _dims(c: TextConfig) -> dict[str, int]:
    d = c.hidden_size
    hd = d // c.num_heads
    return dict(V=c.vocab_size, L=c.max_len, D=d, H=c.num_heads, hd=hd, M=c.mlp_dim,
                P=c.head_width)  # fmt: skip


def from_state(path: Any, config: Mapping[str, Any], raw: Mapping[str, Any]) -> TwoTowerConverted:
    """Our two-tower params and configs from a SiglipModel's config.json and state dict."""
    if config.get("model_type") != MODEL_TYPE:
        raise ConversionError(
            f"{path}: model_type {config.get('model_type')!r}; a two-tower SigLIP is "
            f"{MODEL_TYPE!r} (transformers SiglipModel)"
        )
    vision, text = config.get("vision_config"), config.get("text_config")
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise ConversionError(f"{path}: a 'siglip' config.json needs vision_config and text_config")
    prefix = hf_siglip.PREFIX
    image = hf_siglip.from_state(
        path,
        {
            **vision,
            "model_type": "siglip_vision_model",
            "_name_or_path": config.get("_name_or_path"),
        },
        {k: v for k, v in raw.items() if k.startswith(prefix)},
    )
    text_config = text_config_from_hf(path, text)
    keys = TABLE.at(layers=text_config.num_layers, dims=_dims(text_config))
    rest = {k: v for k, v in raw.items() if not k.startswith(prefix)}
    flat = keys.to_ours(rest, source=str(path), what="a transformers SiglipModel's text tower")
    params = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    params[IMG] = image.params
    return TwoTowerConverted(params, image.model_config, text_config, image.image_size)


def read(path: str | os.PathLike) -> TwoTowerConverted:
    """A transformers `SiglipModel` directory (`save_pretrained`) as our two towers."""
    config, raw = hf_common.read_files(path)
    return from_state(path, config, raw)


def _capture(state: Any, config: Any, path: Any, facts: Any, names: Any, **kw: Any) -> Any:
    """A `codec.Codec` save that hands back (state, config) instead of writing them."""
    del path, facts, names, kw
    return state, config


def write(
    params: Mapping[str, Any],
    image_config: Any,
    text_config: TextConfig,
    path: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] | None = None,
    normalization: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes our two towers as a directory `SiglipModel.from_pretrained` loads.

    The image tower goes through `hf_siglip`'s codec (its capability checks: MAP pooling, no
    classifier head, ...); what either tower cannot express, or any key missing, misshapen or
    left over, is one `ConversionError`. No tokenizer is written.
    """
    if IMG not in params or TXT not in params:
        raise ConversionError(f"{path}: two-tower params need {IMG!r} and {TXT!r}, got "
                              f"{sorted(params)}")  # fmt: skip
    vision_state, vision_config = codec.write(
        dataclasses.replace(hf_siglip.CODEC, save=_capture),
        params[IMG],
        image_config,
        path,
        image_size=image_size,
        source=f"params[{IMG!r}]",
    )
    rest = {k: v for k, v in params.items() if k != IMG}
    flat = {k: np.asarray(v) for k, v in flatten(rest).items()}
    keys = TABLE.at(layers=text_config.num_layers, dims=_dims(text_config))
    text_state = keys.to_theirs(flat, source="params", what="a SigLIP text tower of this config")
    vision_config = {k: v for k, v in vision_config.items() if k not in ("architectures", "dtype")}
    config = {
        "architectures": ["SiglipModel"],
        "model_type": MODEL_TYPE,
        "text_config": text_config_to_hf(text_config),
        "vision_config": vision_config,
        "dtype": "float32",
    }
    return hf_common.write_dir(
        {**vision_state, **text_state},
        config,
        path,
        normalization=normalization,
        image_size=image_size,
        overwrite=overwrite,
    )
