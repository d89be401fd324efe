"""The optax optimizer and learning-rate schedule a config asks for.

Chain: clip by global norm -> SGD-momentum or Adam moments -> decoupled weight decay (kernels
only: not biases, norms, position embeddings, the class or distillation token, the MAP probe)
-> learning-rate schedule -> per-parameter multipliers by regex (0 freezes a sub-tree, e.g.
everything but `head` for a linear probe).

Config keys: `optimizer` ('sgd' | 'adamw'), `base_lr`, `warmup_steps`, `total_steps`,
`decay_type` ('cosine' | 'linear' | 'constant'), `grad_norm_clip` (0/None = off), `momentum`,
`momentum_dtype` ('float32' | 'bfloat16'), `adam_b1`, `adam_b2`, `weight_decay`,
`lr_mults` (tuple of (regex, multiplier); the first match wins), `freeze` (tuple of regexes).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax.sharding import path_str

NO_DECAY_NAMES = ("bias", "scale", "pos_embedding", "cls", "dist", "probe")


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


def _multipliers(params: Any, config: ml_collections.ConfigDict) -> Any:
    rules = [(re.compile(p), 0.0) for p in (config.get("freeze") or ())]
    rules += [(re.compile(p), float(m)) for p, m in (config.get("lr_mults") or ())]

    def mult(path, _):
        name = path_str(path)
        for pattern, value in rules:
            if pattern.search(name):
                return value
        return 1.0

    return jax.tree_util.tree_map_with_path(mult, params)


def _decay_mask(params: Any) -> Any:
    def decays(path, _):
        return path_str(path).split("/")[-1] not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
    """Multiplies each update by a fixed per-parameter factor (a tree of floats)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    """The optimizer for `params` (a tree of arrays or shapes: only paths are read)."""
    parts = []
    if config.get("grad_norm_clip"):
        parts.append(optax.clip_by_global_norm(float(config.grad_norm_clip)))
    name = config.get("optimizer", "sgd")
    if name == "sgd":
        if config.get("momentum"):
            parts.append(
                optax.trace(
                    decay=float(config.momentum),
                    accumulator_dtype=jnp.dtype(config.get("momentum_dtype", "float32")),
                )
            )
    elif name == "adamw":
        parts.append(
            optax.scale_by_adam(
                b1=float(config.get("adam_b1", 0.9)),
                b2=float(config.get("adam_b2", 0.999)),
                mu_dtype=jnp.dtype(config.get("momentum_dtype", "float32")),
            )
        )
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
    if config.get("weight_decay"):
        parts.append(optax.add_decayed_weights(float(config.weight_decay), _decay_mask(params)))
    parts.append(optax.scale_by_learning_rate(learning_rate_schedule(config)))
    if config.get("freeze") or config.get("lr_mults"):
        parts.append(scale_by_multipliers(_multipliers(params, config)))
    return optax.chain(*parts)
