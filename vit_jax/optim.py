"""The optax optimizer and learning-rate schedule a config asks for, as data.

Chain: clip by global norm -> the named optimizer's update direction (`OPTIMIZERS`: SGD with
momentum, Adam moments, Lion's signed momentum) -> decoupled weight decay -> learning-rate
schedule -> per-parameter learning-rate multipliers by regex (0 freezes a sub-tree, e.g.
everything but `head` for a linear probe).

Weight decay is `weight_decay * multiplier * param`, the multiplier of a parameter being the
first `wd_mults` rule whose regex matches its path ('a/b/kernel'); a parameter no rule matches
gets 0 when a `no_decay` regex matches it (by default `NO_DECAY_PATTERNS`: biases, norm scales,
position embeddings, the class / distillation token, the MAP probe) and 1 otherwise.

Config keys: `optimizer` (a name in `OPTIMIZERS`: 'sgd' | 'adamw' | 'lion'), `base_lr`,
`warmup_steps`, `total_steps`, `decay_type` ('cosine' | 'linear' | 'constant'), `grad_norm_clip`
(0/None = off), `momentum`, `momentum_dtype` ('float32' | 'bfloat16'), `adam_b1`, `adam_b2`,
`lion_b1`, `lion_b2`, `weight_decay`, `wd_mults`, `lr_mults` (tuples of (regex, multiplier);
the first match wins), `freeze` (tuple of regexes), `layer_decay`.

Layer-wise learning-rate decay (`layer_decay` = d in (0, 1]; 1 = off), the BEiT / DINOv2 / timm
fine-tuning recipe: with L blocks, block i (0-based) gets lr multiplier d^(L - i), the
embeddings (patch embedding or stem, class / distillation / register tokens, position table)
d^(L + 1), everything after the blocks (final norm, MAP head, pre-logits, head) 1: a parameter
of layer k (`vit_jax.models.family.layer_ids`) gets d^(L + 1 - k). It multiplies the `lr_mults` /
`freeze` multiplier. Blocks and embeddings are recognised by the model family's names in the
family table (`vit_jax.models.families`: `scan_block` -> `encoderblock_{i}`, `MixerBlock_{i}`;
`embedding`); in the scanned layout (`scan=True`, one `encoderblock` with a leading layer axis)
a leaf's multiplier is an array of shape (L, 1, ...) along that axis.

Adding an optimizer: a function `(config) -> list of optax transformations` (the update
direction, before weight decay and the learning rate) registered with `register(name, fn)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax.models import families, zoo
from vit_jax.models.family import layer_ids
from vit_jax.sharding import path_str

__all__ = [
    "NO_DECAY_PATTERNS",
    "OPTIMIZERS",
    "add_decayed_weights",
    "decay_multipliers",
    "layer_decay_multipliers",
    "learning_rate_schedule",
    "lr_multipliers",
    "make_optimizer",
    "register",
    "scale_by_multipliers",
]

# Parameters without weight decay, by the last component of their path.
NO_DECAY_PATTERNS: tuple[str, ...] = tuple(
    rf"(^|/){name}$" for name in ("bias", "scale", "pos_embedding", "cls", "dist", "probe")
)

Direction = Callable[[ml_collections.ConfigDict], list[optax.GradientTransformation]]


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `base_lr`, then cosine / linear decay to 0 at `total_steps`."""
    base, warmup, total = float(config.base_lr), int(config.warmup_steps), int(config.total_steps)
    if warmup >= total and total > 0:
        raise ValueError(f"warmup_steps={warmup} must be smaller than total_steps={total}")
    decay_steps = max(total - warmup, 1)
    decays = {
        "cosine": optax.cosine_decay_schedule(base, decay_steps),
        "linear": optax.linear_schedule(base, 0.0, decay_steps),
        "constant": optax.constant_schedule(base),
    }
    if config.decay_type not in decays:
        raise ValueError(f"decay_type must be one of {sorted(decays)}, got {config.decay_type!r}")
    if warmup == 0:
        return decays[config.decay_type]
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base, warmup), decays[config.decay_type]], [warmup]
    )


# ----------------------------------------------------------------------------- directions


def _momentum_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    return jnp.dtype(config.get("momentum_dtype", "float32"))


def _sgd(config: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
    """Heavy-ball momentum `config.momentum` (none when 0: plain SGD)."""
    if not config.get("momentum"):
        return []
    return [optax.trace(decay=float(config.momentum), accumulator_dtype=_momentum_dtype(config))]


def _adamw(config: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
    """Adam moments (`adam_b1`, `adam_b2`); the decoupled weight decay follows in the chain."""
    return [
        optax.scale_by_adam(
            b1=float(config.get("adam_b1", 0.9)),
            b2=float(config.get("adam_b2", 0.999)),
            mu_dtype=_momentum_dtype(config),
        )
    ]


def _lion(config: ml_collections.ConfigDict) -> list[optax.GradientTransformation]:
    """Lion's signed interpolated momentum (`lion_b1`, `lion_b2`; Chen et al. 2023)."""
    return [
        optax.scale_by_lion(
            b1=float(config.get("lion_b1", 0.9)),
            b2=float(config.get("lion_b2", 0.99)),
            mu_dtype=_momentum_dtype(config),
        )
    ]


OPTIMIZERS: dict[str, Direction] = {"sgd": _sgd, "adamw": _adamw, "lion": _lion}


def register(name: str, direction: Direction) -> None:
    """Makes `config.optimizer = name` use `direction(config)` as the update direction."""
    OPTIMIZERS[name] = direction


# ----------------------------------------------------------------------------- per parameter


def _first_match(rules: Sequence[tuple[re.Pattern, float]], name: str) -> float | None:
    for pattern, value in rules:
        if pattern.search(name):
            return value
    return None


def _compile(rules: Any, key: str) -> list[tuple[re.Pattern, float]]:
    compiled = []
    for rule in rules or ():
        try:
            pattern, mult = rule
            compiled.append((re.compile(pattern), float(mult)))
        except (TypeError, ValueError, re.error) as e:
            raise ValueError(
                f"config.{key} holds (regex, multiplier) pairs; {rule!r} is not one: {e}"
            ) from None
    return compiled


def lr_multipliers(params: Any, config: ml_collections.ConfigDict) -> Any:
    """A tree of floats: 0 for `freeze` matches, else the first `lr_mults` match, else 1."""
    rules = [(re.compile(p), 0.0) for p in (config.get("freeze") or ())]
    rules += _compile(config.get("lr_mults"), "lr_mults")

    def mult(path, _):
        value = _first_match(rules, path_str(path))
        return 1.0 if value is None else value

    return jax.tree_util.tree_map_with_path(mult, params)


def _layer_decay(config: ml_collections.ConfigDict) -> float:
    """`config.layer_decay` checked to lie in (0, 1] (1: off)."""
    value = config.get("layer_decay", 1.0)
    try:
        decay = float(1.0 if value is None else value)
    except (TypeError, ValueError):
        decay = float("nan")
    if not 0.0 < decay <= 1.0:
        raise ValueError(
            f"config.layer_decay must be a number in (0, 1] (1.0: off; 0.65-0.9 are usual), "
            f"got {value!r}"
        )
    return decay


def _layer_rules(
    config: ml_collections.ConfigDict | None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(block names, embedding regexes) of `config.model`'s family; without a model (or with one
    the family table does not know), every family's."""
    model = config.get("model") if config is not None else None
    if model:
        try:
            family = families.get_family(zoo.get_config(model).model_type)
        except (ValueError, KeyError, AttributeError):
            pass
        else:
            return (family.scan_block,), family.embedding
    return families.block_names(), families.embedding_patterns()


def layer_decay_multipliers(
    params: Any,
    decay: float,
    *,
    block_names: Sequence[str] | None = None,
    embedding: Sequence[str] | None = None,
) -> Any:
    """Per-parameter lr multipliers of layer-wise decay (see the module docstring).

    `params`: arrays or shapes (paths and, for scanned blocks, leading sizes are read). A leaf
    of block `{name}_{i}` gets the float `decay ** (L - i)`; a leaf of a scanned block `{name}`
    an array `decay ** (L - arange(L))` shaped (L, 1, ...); an `embedding` match
    `decay ** (L + 1)`; anything else 1. L: the number of blocks found in `params`.
    `block_names`, `embedding`: default every family's in the family table.
    """
    every_block, every_embedding = _layer_rules(None)
    ids, num_layers = layer_ids(
        params,
        every_block if block_names is None else block_names,
        every_embedding if embedding is None else embedding,
    )

    def mult(layer):
        if isinstance(layer, int):
            return float(decay ** (num_layers + 1 - layer))
        per_layer = decay ** (num_layers + 1 - layer.astype(np.float64))
        return per_layer.astype(np.float32)

    return jax.tree.map(mult, ids)


def decay_multipliers(
    params: Any, config: ml_collections.ConfigDict, no_decay: Sequence[str] = NO_DECAY_PATTERNS
) -> Any:
    """A tree of floats: the first `wd_mults` match, else 0 for a `no_decay` match, else 1."""
    rules = _compile(config.get("wd_mults"), "wd_mults")
    rules += [(re.compile(p), 0.0) for p in no_decay]

    def mult(path, _):
        value = _first_match(rules, path_str(path))
        return 1.0 if value is None else value

    return jax.tree_util.tree_map_with_path(mult, params)


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
    """Multiplies each update by a fixed per-parameter factor (a tree of floats, or of arrays
    that broadcast against the parameter, e.g. per-layer factors of a scanned block)."""

    def scale(u, m):
        if isinstance(m, float):
            return u if m == 1.0 else u * m
        return u * jnp.asarray(m, u.dtype)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(scale, updates, multipliers), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def add_decayed_weights(weight_decay: float, multipliers: Any) -> optax.GradientTransformation:
    """`update + (weight_decay * m) * param` for each parameter's multiplier m; m = 0: untouched.

    Built as `optax.masked` (mask: m != 0), so its state, and with 0/1 multipliers its result,
    are exactly those of `optax.add_decayed_weights(weight_decay, mask)`.
    """
    mask = jax.tree.map(lambda m: m != 0.0, multipliers)
    scales = jax.tree.map(lambda m: weight_decay * m if m else optax.MaskedNode(), multipliers)

    def update(updates, state, params):
        if params is None:
            raise ValueError("weight decay needs the parameters: tx.update(grads, state, params)")
        return jax.tree.map(lambda g, p, s: g + s * p, updates, params, scales), state

    return optax.masked(optax.GradientTransformation(lambda _: optax.EmptyState(), update), mask)


def make_optimizer(
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    no_decay: Sequence[str] = NO_DECAY_PATTERNS,
) -> optax.GradientTransformation:
    """The optimizer for `params` (a tree of arrays or shapes: only paths are read).

    `no_decay`: regexes of parameter paths without weight decay unless `wd_mults` says otherwise
    (a model family's norms, biases and embeddings).
    """
    name = config.get("optimizer", "sgd")
    if name not in OPTIMIZERS:
        valid = ", ".join(repr(k) for k in sorted(OPTIMIZERS))
        raise ValueError(f"config.optimizer must be one of {valid}, got {name!r}")
    parts = []
    if config.get("grad_norm_clip"):
        parts.append(optax.clip_by_global_norm(float(config.grad_norm_clip)))
    parts += OPTIMIZERS[name](config)
    if config.get("weight_decay"):
        multipliers = decay_multipliers(params, config, no_decay)
        parts.append(add_decayed_weights(float(config.weight_decay), multipliers))
    parts.append(optax.scale_by_learning_rate(learning_rate_schedule(config)))
    layer_decay = _layer_decay(config)
    if config.get("freeze") or config.get("lr_mults") or layer_decay != 1.0:
        multipliers = lr_multipliers(params, config)
        if layer_decay != 1.0:
            block_names, embedding = _layer_rules(config)
            per_layer = layer_decay_multipliers(
                params, layer_decay, block_names=block_names, embedding=embedding
            )
            multipliers = jax.tree.map(_times, multipliers, per_layer)
        parts.append(scale_by_multipliers(multipliers))
    return optax.chain(*parts)


def _times(a: Any, b: Any) -> Any:
    """Product of two multipliers, a float while both are floats."""
    if isinstance(a, float) and isinstance(b, float):
        return a * b
    return (np.asarray(a, np.float32) * np.asarray(b, np.float32)).astype(np.float32)
