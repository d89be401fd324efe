"""Training losses on logits and (soft) label distributions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "LOSSES",
    "classification_loss",
]


LOSSES = ("softmax_xent", "sigmoid_xent")


def classification_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    kind: str = "softmax_xent",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Mean loss over the batch; `labels` are one-hot or mixed distributions (B, classes)."""
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    logits = logits.astype(jnp.float32)
    if kind == "softmax_xent":
        return jnp.mean(optax.softmax_cross_entropy(logits, labels))
    if kind == "sigmoid_xent":
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1))
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
