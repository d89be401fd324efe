"""Knowledge distillation: a student learns from the labels and from a frozen teacher's logits.

`config.objective = 'distillation'` (or, the older way, a set `config.teacher.checkpoint`)
makes `vit_jax.objectives.build` call `build` here, which returns a `DistillationObjective`.
The loss on a batch, with student logits z_s, the distillation head's logits z_d (= z_s unless
the student has a DeiT distillation token) and the teacher's logits z_t:

    soft:  alpha * CE(labels, z_s) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_d / T))
    hard:  alpha * CE(labels, z_s) + (1 - alpha) * CE(onehot(argmax z_t), z_d)

(Hinton et al. 2015; DeiT, Touvron et al. 2021). `alpha = 1` is plain training on the labels
(the teacher is then not even loaded). The T^2 factor keeps the soft term's gradients at the same
scale for every temperature; as T grows it tends to matching the centred logits (see
`soft_distillation`).

The teacher is any checkpoint `vit_jax.inference.load_model` reads (trainer workdir, published or
trainer-written `.npz`, converted PyTorch file). Its parameters enter the jitted, sharded train
step as the objective's `frozen` tree (sharded by the same rules as the student's), it runs in
eval mode (no dropout) under `jax.lax.stop_gradient`, optionally in bfloat16.

Config keys: `objective` ('distillation'), `teacher.checkpoint`, `teacher.model` (zoo name or
model config for checkpoints that don't record their model; '' = from the checkpoint),
`teacher.dtype` ('' = as stored, or e.g. 'bfloat16'), `alpha`, `temperature`, `distill_type`
('soft' | 'hard').
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vit_jax import configs, data, inference, losses, models, sharding, weights

__all__ = [
    "DISTILL_TYPES",
    "DistillationObjective",
    "build",
    "check_settings",
    "distillation_loss",
    "hard_distillation",
    "load_teacher",
    "soft_distillation",
]

DISTILL_TYPES = ("soft", "hard")

Params = Any


# ----------------------------------------------------------------------------- losses


def soft_distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
) -> jax.Array:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    For large T this tends to (1 / 2C) * ||(z_s - mean z_s) - (z_t - mean z_t)||^2 over the C
    classes (matching centred logits), with gradient (1 / C) * ((z_s - mean z_s) - (z_t - mean
    z_t)) with respect to the student logits.
    """
    t = float(temperature)
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return t * t * jnp.mean(kl)


def hard_distillation(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Cross-entropy of the student against the teacher's top-1 class, averaged over the batch."""
    target = jnp.argmax(teacher_logits, axis=-1)
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, target[:, None], axis=-1))


def distillation_loss(
    logits: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array | None,
    *,
    alpha: float,
    temperature: float = 1.0,
    distill_type: str = "soft",
    dist_logits: jax.Array | None = None,
    loss_kind: str = "softmax_xent",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """`alpha * CE(labels, logits) + (1 - alpha) * distillation term` (see the module docstring).

    `labels` are one-hot or mixed (B, C); the distillation term reads `dist_logits` (a
    distillation token's head) when given, else `logits`.
    """
    if distill_type not in DISTILL_TYPES:
        raise ValueError(f"distill_type must be one of {DISTILL_TYPES}, got {distill_type!r}")
    ce = losses.classification_loss(logits, labels, kind=loss_kind, label_smoothing=label_smoothing)
    if alpha == 1.0:
        return ce
    student = logits if dist_logits is None else dist_logits
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    if distill_type == "soft":
        distill = soft_distillation(student, teacher_logits, temperature)
    else:
        distill = hard_distillation(student, teacher_logits)
    return alpha * ce + (1.0 - alpha) * distill


# ----------------------------------------------------------------------------- teacher


def check_settings(config: ml_collections.ConfigDict) -> None:
    """Errors naming the config key for an out-of-range alpha, temperature or distill_type."""
    missing = [k for k in ("alpha", "temperature", "distill_type") if k not in config]
    if missing:
        raise ValueError(
            f"config has a teacher but no {', '.join(missing)}: a distillation config defines "
            "teacher.{checkpoint,model,dtype}, alpha, temperature and distill_type "
            "(see configs/distill.py)"
        )
    if not 0.0 <= float(config.alpha) <= 1.0:
        raise ValueError(f"config.alpha must be in [0, 1], got {config.alpha}")
    if float(config.temperature) <= 0.0:
        raise ValueError(f"config.temperature must be > 0, got {config.temperature}")
    if config.distill_type not in DISTILL_TYPES:
        raise ValueError(
            f"config.distill_type must be one of {DISTILL_TYPES}, got {config.distill_type!r}"
        )
    dtype = config.teacher.get("dtype")
    if dtype and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"config.teacher.dtype must be '', 'float32', 'bfloat16' or 'float16', got {dtype!r}"
        )


def load_teacher(
    teacher_config: ml_collections.ConfigDict,
    *,
    image_size: tuple[int, int],
    num_classes: int,
) -> tuple[nn.Module, Params, list[str]]:
    """(module, host params, class names) of the teacher, fitted to the student's input size.

    Position embeddings are resampled when the teacher was trained at another resolution; a
    different class count, or any other shape that does not fit, is an error naming the file.
    """
    path = str(teacher_config.checkpoint)
    model_name = teacher_config.get("model") or None
    try:
        loaded = inference.load_model(path, model=model_name)
    except (FileNotFoundError, ValueError) as e:
        where = "config.teacher.checkpoint" + ("" if str(e).startswith(path) else f"={path}")
        hint = ""
        if isinstance(e, FileNotFoundError):
            hint = " (train a teacher first, e.g. --config=configs/distill.py:teacher)"
        raise type(e)(f"{where}: {e}{hint}") from None
    head = loaded.params.get("head") or {}
    teacher_classes = int(head["kernel"].shape[-1]) if "kernel" in head else 0
    if teacher_classes != num_classes:
        raise ValueError(
            f"config.teacher.checkpoint={path}: the teacher predicts {teacher_classes} classes, "
            f"the student {num_classes}; both must classify the same classes"
        )
    overrides = {}
    if teacher_config.get("dtype"):
        overrides = dict(dtype=teacher_config.dtype, param_dtype=teacher_config.dtype)
    module = models.get_model(loaded.model_config, num_classes=num_classes, **overrides)
    params = _fit_to(module, loaded.params, image_size, path, loaded.model_config)
    if overrides:
        dtype = jnp.dtype(teacher_config.dtype)
        params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    return module, params, list(loaded.class_names)


def _fit_to(
    module: nn.Module, params: Params, image_size: tuple[int, int], path: str, config: Any
) -> Params:
    """`params` with position embeddings resampled to `image_size`; other mismatches raise."""
    return weights.fit(
        params,
        {},
        config,
        models.init_shapes(module, image_size),
        image_size=image_size,
        what=f"config.teacher.checkpoint={path}",
    )


# ----------------------------------------------------------------------------- objective


class DistillationObjective:
    """The train step's loss with a teacher: see the module docstring.

    Holds ready values only (`build` reads the teacher and places it on the mesh): `frozen` is
    `{'teacher': params}` (global arrays sharded like the student's parameters), or `{}` with
    no teacher (`alpha = 1`).
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        frozen: Any,
        *,
        alpha: float,
        temperature: float = 1.0,
        distill_type: str = "soft",
        loss: str = "softmax_xent",
        label_smoothing: float = 0.0,
    ):
        self.model, self.teacher, self.frozen = model, teacher, frozen
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.distill_type = str(distill_type)
        self.loss_kind, self.label_smoothing = str(loss), float(label_smoothing)
        self.has_distillation_head = bool(getattr(model, "distillation_token", False))

    def teacher_logits(self, images: jax.Array, frozen: Any) -> jax.Array:
        """The teacher's eval-mode float32 logits, without gradient."""
        logits, _ = self.teacher.apply({"params": frozen["teacher"]}, images, train=False)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))

    def loss(self, params, images, labels, rng, frozen) -> jax.Array:
        logits, out = self.model.apply(
            {"params": params}, images, train=True, rngs={"dropout": rng}
        )
        dist_logits = None
        if self.has_distillation_head:  # DeiT: cls head learns the labels, head_dist the teacher
            logits, dist_logits = out["logits_cls"], out["logits_dist"]
        teacher = None if self.alpha == 1.0 else self.teacher_logits(images, frozen)
        return distillation_loss(
            logits,
            labels,
            teacher,
            alpha=self.alpha,
            temperature=self.temperature,
            distill_type=self.distill_type,
            dist_logits=dist_logits,
            loss_kind=self.loss_kind,
            label_smoothing=self.label_smoothing,
        )


def build(config: ml_collections.ConfigDict, model: nn.Module, mesh) -> DistillationObjective:
    """The objective for `config` (`objectives.build` calls it): checks the settings, reads
    the teacher (unless `alpha = 1`), compares class names and shards it over `mesh`."""
    check_settings(config)
    settings = dict(
        alpha=float(config.alpha),
        temperature=float(config.temperature),
        distill_type=str(config.distill_type),
        loss=config.loss,
        label_smoothing=config.label_smoothing,
    )
    if settings["alpha"] == 1.0:
        logging.info("alpha = 1: training on the labels only; the teacher is not loaded")
        return DistillationObjective(model, None, {}, **settings)
    if not config.teacher.get("checkpoint"):
        raise ValueError(
            f"config.objective='distillation' with alpha={settings['alpha']} needs "
            "config.teacher.checkpoint (a workdir, .npz or converted file); for training on the "
            "labels only set alpha=1 or objective='classification'"
        )
    num_classes = int(model.num_classes)
    teacher, host, teacher_names = load_teacher(
        config.teacher, image_size=configs.image_size(config), num_classes=num_classes
    )
    names = data.get_info(config).class_names[:num_classes]
    placeholders = [f"class_{i}" for i in range(len(teacher_names))]
    if teacher_names not in (list(names), placeholders):
        logging.warning(
            "teacher class names %s differ from the dataset's %s: check both use the same "
            "class order",
            teacher_names[:5],
            names[:5],
        )
    frozen = {"teacher": sharding.put_sharded(host, sharding.tree_shardings(host, mesh))}
    objective = DistillationObjective(model, teacher, frozen, **settings)
    n_teacher = sum(int(np.size(x)) for x in jax.tree.leaves(host))
    logging.info(
        "teacher %s: %s parameters; alpha %.3g, %s distillation, temperature %.3g%s",
        config.teacher.checkpoint,
        f"{n_teacher:,}",
        objective.alpha,
        objective.distill_type,
        objective.temperature,
        ", into the distillation token's head" if objective.has_distillation_head else "",
    )
    return objective
