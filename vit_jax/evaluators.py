"""What a run measures at its eval steps: the `Evaluator` protocol and the registry `config.evals`
picks from (big_vision's `config.evals`).

`config.evals` maps a name to one evaluator's options, `type` naming its kind (default: the
name):

    config.evals.classification = dict(type="classification")    # the default, alone
    config.evals.knn = dict(type="knn", k=20, temperature=0.07)  # k-NN on frozen features

Each runs at every `eval_every` step and at the end, in name order with `classification`
entries first; their metrics share one row of `metrics.jsonl` (and TensorBoard). A config without
`evals` runs classification alone. `evals` may change when a run restarts (`run_config`).

An evaluator has a `name` (its key in `config.evals`), `run(params) -> {metric: value}` over the
current parameters (sharded as the run holds them) and `describe(metrics)`, its console line.
Metric names carry the evaluator's `prefix`: classification's `test_` (`test_accuracy`,
`test_top5_accuracy`, `test_loss`, `test_examples`), k-NN's `{name}_` (`knn_accuracy`). A
metric whose name ends in `_examples` is a count, returned but not written to the metrics log.

Adding an evaluator: a class with `name`, `run` and `describe` whose constructor
`(model, config, mesh, param_shardings, *, name, **options)` builds its jitted functions once
(its keyword arguments are the options `config.evals.NAME` may set; any other is refused by
name), and `register(type, cls)` (or add it to `EVALUATORS`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import data, sharding
from vit_jax import features as feature_lib

__all__ = [
    "COUNT_SUFFIX",
    "DEFAULT_EVALS",
    "EVALUATORS",
    "ClassificationEvaluator",
    "Evaluator",
    "KnnEvaluator",
    "build_all",
    "evals_of",
    "evaluate",
    "logged",
    "make_eval_step",
    "register",
]

COUNT_SUFFIX = "_examples"  # metrics that are counts: returned, not logged
DEFAULT_EVALS: dict[str, dict[str, Any]] = {"classification": {"type": "classification"}}


@runtime_checkable
class Evaluator(Protocol):
    """Measures the model at an eval step (see the module docstring)."""

    name: str

    def run(self, params: Any) -> dict[str, float]:
        """Metrics of `params` (their names prefixed); raises what reading the data raises."""
        ...

    def describe(self, metrics: Mapping[str, float]) -> str:
        """One console line of `run`'s metrics."""
        ...


# An evaluator class, or any callable `(model, config, mesh, param_shardings, *, name,
# **options) -> Evaluator`: `config.evals.NAME`'s entries other than `type` are its keywords.
Builder = Callable[..., Evaluator]


def logged(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a run writes to its metrics log: all but the counts (`*_examples`)."""
    return {k: v for k, v in metrics.items() if not k.endswith(COUNT_SUFFIX)}


# ----------------------------------------------------------------------------- classification


def make_eval_step(model: nn.Module) -> Callable:
    """`(params, batch) -> sums` of loss, top-1, top-5 and count over unmasked examples."""

    def eval_fn(params, batch):
        logits, _ = model.apply({"params": params}, batch["image"], train=False)
        label, mask = batch["label"], batch["mask"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        k = min(5, logits.shape[-1])
        topk = jax.lax.top_k(logits, k)[1]
        top1 = (topk[:, 0] == label).astype(jnp.float32)
        top5 = jnp.any(topk == label[:, None], axis=-1).astype(jnp.float32)
        return {
            "loss": jnp.sum(loss * mask),
            "top1": jnp.sum(top1 * mask),
            "top5": jnp.sum(top5 * mask),
            "count": jnp.sum(mask),
        }

    return eval_fn


def evaluate(
    eval_step: Callable, params: Any, batches: Iterable, prefix: str = "test_"
) -> dict[str, float]:
    """Accuracy, top-5 accuracy, loss and example count over finite padded, masked batches."""
    totals = None
    for batch in batches:
        sums = eval_step(params, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("the evaluation split yielded no batch")
    totals = jax.tree.map(float, totals)
    n = max(totals["count"], 1.0)
    return {
        f"{prefix}accuracy": totals["top1"] / n,
        f"{prefix}top5_accuracy": totals["top5"] / n,
        f"{prefix}loss": totals["loss"] / n,
        f"{prefix}examples": int(totals["count"]),
    }


class ClassificationEvaluator:
    """Top-1 / top-5 accuracy and cross-entropy of the model's head on `config.pp.test` (the eval
    preprocessing: resize, central crop; padded, masked batches of `config.batch_eval`)."""

    def __init__(
        self,
        model: nn.Module,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        param_shardings: Any,
        *,
        name: str = "classification",
        prefix: str = "test_",
        split: str | None = None,
    ):
        self.name, self.prefix, self.config, self.split = name, prefix, config, split
        self.batch_sh = sharding.batch_sharding(mesh)
        self.step = jax.jit(
            make_eval_step(model),
            in_shardings=(param_shardings, self.batch_sh),
            out_shardings=sharding.replicated(mesh),
        )

    def batches(self):
        """The eval batches (a config error, e.g. an unknown split, is raised here)."""
        return data.eval_iterator(self.config, self.batch_sh, split=self.split)

    def measure(self, params: Any, batches: Iterable) -> dict[str, float]:
        """`run` over given batches (reading failures raised while iterating)."""
        return evaluate(self.step, params, batches, self.prefix)

    def run(self, params: Any) -> dict[str, float]:
        return self.measure(params, self.batches())

    def describe(self, metrics: Mapping[str, float]) -> str:
        p = self.prefix
        return (
            f"{p.replace('_', ' ')}accuracy {metrics[p + 'accuracy']:.4f}, top-5 "
            f"{metrics[p + 'top5_accuracy']:.4f}, loss {metrics[p + 'loss']:.4f} "
            f"({metrics[p + 'examples']} examples)"
        )


class KnnEvaluator:
    """k-NN accuracy of frozen features (`vit_jax.features`, as the probe: cosine similarity,
    DINO's exp(sim / T) votes): the pooled representation before the head (`pre_logits`) of
    every example of `train_split` (default `config.pp.train`) is the bank, those of
    `test_split` (default `config.pp.test`) the queries; both with the eval preprocessing."""

    def __init__(
        self,
        model: nn.Module,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        param_shardings: Any,
        *,
        name: str = "knn",
        prefix: str | None = None,
        k: int = 20,
        temperature: float = 0.07,
        train_split: str | None = None,
        test_split: str | None = None,
    ):
        self.name, self.config = name, config
        self.prefix = f"{name}_" if prefix is None else prefix
        self.k, self.temperature = int(k), float(temperature)
        self.splits = (train_split or str(config.pp.train), test_split or str(config.pp.test))
        self.batch_sh = sharding.batch_sharding(mesh)
        self.step = jax.jit(
            feature_lib.feature_step(model, "pooled"),
            in_shardings=(param_shardings, self.batch_sh),
            out_shardings=sharding.replicated(mesh),
        )

    def features(self, params: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features [N, D] float32, labels [N]) of every example of `split`, in split order."""
        batches = data.eval_iterator(self.config, self.batch_sh, split=split)
        f = feature_lib.extract(self.step, params, batches, split)
        return f.features, f.labels

    def run(self, params: Any) -> dict[str, float]:
        (x_train, y_train), (x_test, y_test) = (self.features(params, s) for s in self.splits)
        pred = feature_lib.knn_predict(
            x_train, y_train, x_test, k=self.k, temperature=self.temperature
        )
        return {
            f"{self.prefix}accuracy": float(np.mean(pred == y_test)),
            f"{self.prefix}train{COUNT_SUFFIX}": len(y_train),
            f"{self.prefix}test{COUNT_SUFFIX}": len(y_test),
        }

    def describe(self, metrics: Mapping[str, float]) -> str:
        p = self.prefix
        return (
            f"{self.name} k-NN accuracy {metrics[p + 'accuracy']:.4f} (k={self.k}, "
            f"T={self.temperature:g}; {metrics[p + 'train_examples']} train, "
            f"{metrics[p + 'test_examples']} test examples)"
        )


# ----------------------------------------------------------------------------- registry


EVALUATORS: dict[str, Builder] = {
    "classification": ClassificationEvaluator,
    "knn": KnnEvaluator,
}


def register(type_name: str, builder: Builder) -> None:
    """Makes `config.evals.NAME = dict(type=type_name, ...)` build with `builder`."""
    EVALUATORS[type_name] = builder


def evals_of(config: ml_collections.ConfigDict) -> list[tuple[str, dict[str, Any]]]:
    """(name, options) of each evaluator `config.evals` asks for, in the order they run:
    classification first, the others by name. No `evals`: classification alone."""
    evals = config.get("evals")
    if evals is None:
        evals = DEFAULT_EVALS
    items = []
    for name in sorted(evals.keys()):
        options = evals[name]
        options = dict(options.to_dict() if hasattr(options, "to_dict") else options or {})
        kind = str(options.pop("type", None) or name)
        if kind not in EVALUATORS:
            valid = ", ".join(repr(k) for k in sorted(EVALUATORS))
            raise ValueError(f"config.evals.{name}.type must be one of {valid}, got {kind!r}")
        _check_options(name, kind, options)
        items.append((name, {**options, "type": kind}))
    return sorted(items, key=lambda item: (item[1]["type"] != "classification", item[0]))


def build_all(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
) -> list[Evaluator]:
    """The evaluators `config.evals` names, built for `model` with parameters placed as
    `param_shardings` (their jitted functions compiled on first use)."""
    evaluators = []
    for name, options in evals_of(config):
        build = EVALUATORS[options.pop("type")]
        evaluators.append(build(model, config, mesh, param_shardings, name=name, **options))
    return evaluators


def _check_options(name: str, kind: str, options: Mapping[str, Any]) -> None:
    """ValueError naming `config.evals.NAME.KEY` when `kind`'s builder takes no such keyword."""
    parameters = inspect.signature(EVALUATORS[kind]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    takes = [n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in takes or key == "name":
            valid = ", ".join(t for t in takes if t != "name")
            raise ValueError(
                f"config.evals.{name}.{key}: not an option of the {kind!r} evaluator "
                f"(it takes type, {valid})"
            )
