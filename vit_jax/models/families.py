"""The model families, in one static table: per `model_type`, its builder and config schema and
everything family-specific the rest of the code reads (see `vit_jax.models.family.Family`):

- fitting a checkpoint (`weights.fit`, `weights.open`): `stride`, `num_prefix_tokens`,
  `num_posemb_prefix_tokens`, `tokens_param`;
- the parameter layout: `scan_block` (`vit_jax.models.layout`), `embedding` + `scan_block`
  (layer-wise lr decay, `vit_jax.optim`), `no_decay` (weight decay), `logical_axes`
  (`vit_jax.sharding`).

The table is built when this module is imported, from the family modules it imports (their
Flax code, defaults and builders); nothing registers itself. A family added at run time
(`register_family`) joins the same table. Adding a built-in family: its module (the Flax
model, `CONFIG_DEFAULTS`, `build`) and its row here.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

from vit_jax.models import mixer, vit
from vit_jax.models.family import Family, LogicalAxes

__all__ = [
    "FAMILIES",
    "block_names",
    "embedding_patterns",
    "get_family",
    "known_families",
    "logical_axes",
    "register_family",
]

_VIT = Family(
    name="ViT",
    defaults=vit.CONFIG_DEFAULTS,
    builder=vit.build,
    # Derived from the option declarations (`vit.SCHEMA`): the entries that may stay None,
    # their types, the hybrids' `resnet` template.
    optional=vit.SCHEMA.optional,
    optional_types=vit.SCHEMA.optional_types,
    templates=vit.SCHEMA.templates,
    stride=vit.config_stride,
    num_prefix_tokens=vit.config_num_prefix_tokens,
    num_posemb_prefix_tokens=vit.config_num_posemb_prefix_tokens,
    scan_block="encoderblock",
    # Before the blocks: patch embedding, the hybrids' ResNet stem, class / distillation /
    # register tokens, the position table.
    embedding=(
        r"^(embedding|conv_root|gn_root|block\d+|cls|dist|reg|registers?)(/|$)",
        r"(^|/)posembed_input/",
        r"(^|/)pos_embedding$",
    ),
    # Norm scales and biases (LayerNorm, GroupNorm, LayerScale), all biases, the position
    # embeddings and the learned tokens / MAP probe take no weight decay.
    no_decay=(
        r"(^|/)bias$",
        r"(^|/)scale$",
        r"(^|/)pos_embedding$",
        r"(^|/)cls$",
        r"(^|/)dist$",
        r"(^|/)registers$",
        r"(^|/)probe$",
    ),
    # `heads` and `mlp` are tensor-parallel.
    logical_axes=(
        (r"(query|key|value)/kernel$", ("embed", "heads", "kv")),
        (r"(query|key|value)/bias$", ("heads", "kv")),
        (r"MultiHeadDotProductAttention_\d+/out/kernel$", ("heads", "kv", "embed")),
        (r"MlpBlock_\d+/Dense_0/kernel$", ("embed", "mlp")),
        (r"MlpBlock_\d+/Dense_0/bias$", ("mlp",)),
        (r"MlpBlock_\d+/Dense_1/kernel$", ("mlp", "embed")),
    ),
)

_MIXER = Family(
    name="Mixer",
    defaults=mixer.CONFIG_DEFAULTS,
    builder=mixer.build,
    stride=mixer.config_stride,
    num_prefix_tokens=lambda config: 0,
    tokens_param="MixerBlock_0/token_mixing/Dense_0/kernel",  # (tokens, tokens_mlp_dim)
    scan_block="MixerBlock",
    embedding=(r"^stem(/|$)",),
    no_decay=(r"(^|/)bias$", r"(^|/)scale$"),  # LayerNorm scales, all biases
    # Token- and channel-mixing MLPs: their hidden dimension is tensor-parallel, as ViT's.
    logical_axes=(
        (r"(token|channel)_mixing/Dense_0/kernel$", ("embed", "mlp")),
        (r"(token|channel)_mixing/Dense_0/bias$", ("mlp",)),
        (r"(token|channel)_mixing/Dense_1/kernel$", ("mlp", "embed")),
    ),
)

# model_type -> Family; the default model_type (ViT) first. Read it through the functions
# below; `register_family` adds to it.
_TABLE: dict[str, Family] = {f.name: f for f in (_VIT, _MIXER)}
FAMILIES: Mapping[str, Family] = types.MappingProxyType(_TABLE)


def register_family(family: Family) -> Family:
    """Adds a user-defined `family` to the table under its `name` (the config's `model_type`);
    returns it. A name already taken by another family is an error."""
    if family.name in _TABLE and _TABLE[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    _TABLE[family.name] = family
    return family


def known_families() -> list[str]:
    """The `model_type`s in the table: the built-in ones (ViT first), then those registered."""
    return list(_TABLE)


def get_family(model_type: str) -> Family:
    """The family of `model_type`; an error listing the known ones."""
    if model_type not in _TABLE:
        known = ", ".join(repr(k) for k in _TABLE)
        raise ValueError(f"unknown model_type {model_type!r}; known: {known}")
    return _TABLE[model_type]


def block_names() -> tuple[str, ...]:
    """Every family's block name (`encoderblock`, `MixerBlock`, ...), in table order."""
    return tuple(f.scan_block for f in _TABLE.values())


def embedding_patterns() -> tuple[str, ...]:
    """Every family's `embedding` regexes (layer 0 of layer decay), in table order."""
    return tuple(p for f in _TABLE.values() for p in f.embedding)


def logical_axes() -> LogicalAxes:
    """Every family's (path regex, logical axes) sharding rules, in table order: their patterns
    name family-specific modules, so the union shards any family's parameters."""
    return tuple(rule for f in _TABLE.values() for rule in f.logical_axes)
