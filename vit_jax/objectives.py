"""What the train step minimises: the `Objective` protocol and the registry that picks one.

An objective is `loss(params, images, labels, rng, frozen) -> scalar` plus `frozen`, the tree of
global arrays the loss reads but does not train (a distillation teacher's parameters, already
placed on the mesh; `{}` when there are none). `frozen` enters the jitted step as an argument,
not as compiled-in constants, and is never donated or updated.

`config.objective` names the objective ('classification' by default). A config that sets
`teacher.checkpoint` but leaves `objective` at its default means 'distillation' (the older way of
asking for it). `build(config, model, mesh)` runs the registered builder, which does any file
reading and sharding; the objective's constructor only stores ready values.

Adding an objective: write a class with `loss` and `frozen`, a builder
`(config, model, mesh) -> objective`, and `register(name, builder)` (or add it to `OBJECTIVES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import ml_collections

from vit_jax import losses

__all__ = [
    "DEFAULT",
    "OBJECTIVES",
    "ClassificationObjective",
    "Objective",
    "build",
    "build_classification",
    "objective_name",
    "register",
]

DEFAULT = "classification"


@runtime_checkable
class Objective(Protocol):
    """The train step's loss and the frozen inputs it reads (see the module docstring)."""

    frozen: Any

    def loss(
        self, params: Any, images: jax.Array, labels: jax.Array, rng: jax.Array, frozen: Any
    ) -> jax.Array:
        """The mean loss over the batch; `labels` are one-hot or mixed (batch, classes)."""
        ...


Builder = Callable[[ml_collections.ConfigDict, nn.Module, Any], Objective]


class ClassificationObjective:
    """Cross-entropy (`config.loss`, `config.label_smoothing`) of the model's logits."""

    def __init__(self, model: nn.Module, *, loss: str = "softmax_xent", label_smoothing=0.0):
        self.model = model
        self.loss_kind, self.label_smoothing = str(loss), float(label_smoothing)
        self.frozen: Any = {}

    def loss(self, params, images, labels, rng, frozen) -> jax.Array:
        del frozen
        logits, _ = self.model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
        return losses.classification_loss(
            logits, labels, kind=self.loss_kind, label_smoothing=self.label_smoothing
        )


def build_classification(
    config: ml_collections.ConfigDict, model: nn.Module, mesh: Any = None
) -> ClassificationObjective:
    """Plain training on the labels."""
    del mesh
    return ClassificationObjective(
        model,
        loss=config.get("loss", "softmax_xent"),
        label_smoothing=config.get("label_smoothing", 0.0),
    )


def _build_distillation(config: ml_collections.ConfigDict, model: nn.Module, mesh: Any):
    from vit_jax import distill  # reads checkpoints (PyTorch formats too): loaded when asked for

    return distill.build(config, model, mesh)


OBJECTIVES: dict[str, Builder] = {
    "classification": build_classification,
    "distillation": _build_distillation,
}


def register(name: str, builder: Builder) -> None:
    """Makes `config.objective = name` build its objective with `builder(config, model, mesh)`."""
    OBJECTIVES[name] = builder


def objective_name(config: ml_collections.ConfigDict) -> str:
    """`config.objective`, or 'distillation' for a config that only sets `teacher.checkpoint`."""
    name = str(config.get("objective") or DEFAULT)
    teacher = config.get("teacher")
    if name == DEFAULT and teacher is not None and teacher.get("checkpoint"):
        return "distillation"
    return name


def build(config: ml_collections.ConfigDict, model: nn.Module, mesh: Any) -> Objective:
    """The objective `config` names, built for `model` with its frozen inputs on `mesh`."""
    name = objective_name(config)
    if name not in OBJECTIVES:
        valid = ", ".join(repr(k) for k in sorted(OBJECTIVES))
        raise ValueError(f"config.objective must be one of {valid}, got {name!r}")
    return OBJECTIVES[name](config, model, mesh)
