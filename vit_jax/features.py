"""Frozen features of a dataset split, and the k-NN classifier on them.

One jitted forward pass per eval batch gives the model's representation before the head
(`pooled`: `out['pre_logits']`, a DeiT distillation model's two tokens averaged) or its per-token
output (`tokens`: `out['encoded']`), with the count of examples the model's own head gets right;
`extract` runs it over a split in split order. `knn_predict` is DINO's k-NN evaluation on such
features. `python -m vit_jax.probe` and the `knn` evaluator (`vit_jax.evaluators`) both use this
module, so the probe and the in-training evaluation compute the same numbers.

Imports only numpy at module level (the probe CLI imports it before start-up); JAX when used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["FEATURES", "Features", "extract", "feature_step", "knn_predict"]

FEATURES = ("pooled", "tokens")


@dataclasses.dataclass
class Features:
    """Features of one split: `features` [N, D] (or [N, T, D] tokens), `labels` [N] int,
    `head_correct` the number of examples the checkpoint's own head classifies correctly."""

    features: np.ndarray
    labels: np.ndarray
    head_correct: int


def feature_step(model: Any, kind: str = "pooled") -> Callable:
    """`(params, batch) -> (features f32, labels, mask, head_correct)` for `model` (to jit)."""
    import jax.numpy as jnp

    if kind not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {kind!r}")

    def step(params, batch):
        logits, out = model.apply({"params": params}, batch["image"], train=False)
        if kind == "pooled":
            feats = out["pre_logits"]
            feats = jnp.mean(feats, axis=1) if feats.ndim == 3 else feats  # cls + dist tokens
        else:
            feats = out["encoded"]
        correct = jnp.zeros((), jnp.int32)
        if logits.ndim == 2:
            hit = (jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]
            correct = jnp.sum(hit.astype(jnp.int32))
        return feats.astype(jnp.float32), batch["label"], batch["mask"], correct

    return step


def extract(step: Callable, params: Any, batches: Iterable[dict], split: str) -> Features:
    """Features of every example of `batches` (padded, masked eval batches of `split`, e.g.
    `vit_jax.data.eval_iterator`) by the jitted `step` (`feature_step`), in split order.

    Raises what reading the data raises (ValueError for a bad image, OSError) and ValueError when
    `split` yields no batch.
    """
    from vit_jax import sharding

    chunks, labels, correct = [], [], 0
    for batch in batches:
        feats, label, mask, hits = sharding.to_host(step(params, batch))
        chunks.append(feats[mask])
        labels.append(label[mask])
        correct += int(hits)
    if not chunks:
        raise ValueError(f"split {split!r} yielded no batch")
    return Features(np.concatenate(chunks), np.concatenate(labels).astype(np.int64), correct)


def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """k-NN labels of `test_features` among `train_features` by cosine similarity.

    Each of the k nearest votes for its label with weight exp(sim / temperature) (DINO's k-NN
    evaluation); temperature 0: one vote each (a tie goes to the smallest class index).
    Queries are processed `chunk` rows at a time (jitted similarity and top-k).
    """
    import jax
    import jax.numpy as jnp

    num_classes = int(num_classes or int(train_labels.max()) + 1)
    k = max(1, min(int(k), len(train_labels)))

    def normalise(x):
        x = jnp.asarray(x, jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    bank, bank_labels = normalise(train_features), jnp.asarray(train_labels, jnp.int32)

    @jax.jit
    def predict(queries):
        sims, idx = jax.lax.top_k(normalise(queries) @ bank.T, k)
        # exp((sim - best) / T): DINO's weights times a per-query constant (no overflow).
        weights = (
            jnp.exp((sims - sims[:, :1]) / temperature) if temperature > 0 else jnp.ones_like(sims)
        )
        votes = jax.nn.one_hot(bank_labels[idx], num_classes) * weights[..., None]
        return jnp.argmax(votes.sum(axis=1), axis=-1)

    n = len(test_features)
    out = [np.asarray(predict(test_features[i : i + chunk])) for i in range(0, n, chunk)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)
