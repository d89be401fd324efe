"""Losses and evaluation arithmetic on hand-made logits."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import evaluators, losses


def test_softmax_xent_and_label_smoothing_by_hand():
    logits = jnp.array([[0.0, math.log(3.0)], [0.0, 0.0]])
    labels = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    # p(class 1 | row 0) = 3/4, p(class 0 | row 1) = 1/2
    want = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(losses.classification_loss(logits, labels)) == pytest.approx(want, rel=1e-6)
    # smoothing 0.2 over 2 classes: targets (0.1, 0.9) and (0.9, 0.1)
    smooth = (
        -(0.1 * math.log(0.25) + 0.9 * math.log(0.75)) - (0.9 * math.log(0.5) + 0.1 * math.log(0.5))
    ) / 2
    got = losses.classification_loss(logits, labels, label_smoothing=0.2)
    assert float(got) == pytest.approx(smooth, rel=1e-6)


def test_sigmoid_xent_sums_classes_and_averages_examples():
    logits = jnp.array([[0.0, 2.0], [-1.0, 0.0]])
    labels = jnp.array([[0.0, 1.0], [1.0, 1.0]])
    softplus = lambda x: math.log1p(math.exp(x))
    row0 = softplus(0.0) + softplus(-2.0)  # -log(1 - s(0)) - log s(2)
    row1 = softplus(1.0) + softplus(0.0)  # -log s(-1) - log s(0)
    got = losses.classification_loss(logits, labels, kind="sigmoid_xent")
    assert float(got) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        losses.classification_loss(logits, labels, kind="hinge")


class _Identity:
    """A 'model' whose logits are its input images: evaluation arithmetic in isolation."""

    def apply(self, variables, images, train):
        assert not train
        return images, {}


def test_top1_top5_loss_and_the_padding_mask_by_hand():
    eval_step = evaluators.make_eval_step(_Identity())
    six = lambda hot: np.eye(6, dtype=np.float32)[hot] * 5.0  # confident on class `hot`
    logits = np.stack(
        [
            six(0),  # label 0: top-1 right
            np.array([5, 4, 3, 2, 1, 0], np.float32),  # label 4: top-5 only
            np.array([5, 4, 3, 2, 1, 0], np.float32),  # label 5: neither
            six(2),  # padding row (mask 0), label 1: would be wrong and count
        ]
    )
    first = {
        "image": jnp.asarray(logits),
        "label": jnp.array([0, 4, 5, 1]),
        "mask": jnp.array([1, 1, 1, 0]),
    }
    last = {  # a partial last batch: one real example
        "image": jnp.asarray(np.stack([six(3), six(3), six(3), six(3)])),
        "label": jnp.array([3, 0, 0, 0]),
        "mask": jnp.array([1, 0, 0, 0]),
    }
    results = evaluators.evaluate(eval_step, {}, [first, last])
    assert results["test_examples"] == 4
    assert results["test_accuracy"] == pytest.approx(2 / 4)
    assert results["test_top5_accuracy"] == pytest.approx(3 / 4)
    xent = lambda row, label: float(
        -np.log(np.exp(row[label] - row.max()) / np.exp(row - row.max()).sum())
    )
    rows = [(six(0), 0), (logits[1], 4), (logits[2], 5), (six(3), 3)]
    want = sum(xent(r, lb) for r, lb in rows) / 4
    assert results["test_loss"] == pytest.approx(want, rel=1e-5)
