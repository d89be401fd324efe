"""Knowledge distillation on `digits`: a small ViT student learns from a larger ViT teacher.

    python -m vit_jax.train --config=configs/distill.py:teacher --workdir=runs/distill/teacher
    python -m vit_jax.train --config=configs/distill.py --workdir=runs/distill/student
    python -m vit_jax.train --config=configs/distill.py:scratch --workdir=runs/distill/scratch

`student` (the default) distils from `teacher.checkpoint` (by default the teacher run's workdir
above; any checkpoint `vit_jax.inference.load_model` reads works); `scratch` is the same student
and budget with `alpha=1` (labels only: the baseline); `token` gives the student a DeiT
distillation token whose head learns from the teacher (DeiT's hard distillation, alpha 0.5).
BENCHMARKS.md compares them, with all the training labels and with a tenth of them
(`--config.pp.train='train[:10%]'`), where the teacher's soft targets help most. The loss is
documented in `vit_jax/distill.py`.
"""

import ml_collections

from vit_jax import models
from vit_jax.configs import default

__all__ = ["TEACHER_WORKDIR", "get_config", "student_model", "teacher_model"]

TEACHER_WORKDIR = "runs/distill/teacher"


def teacher_model() -> ml_collections.ConfigDict:
    """A wider and deeper relative of the default model (~0.8M parameters)."""
    return models.get_config(
        dict(
            name="ViT-digits-teacher",
            patches=dict(size=(4, 4)),
            hidden_size=128,
            transformer=dict(mlp_dim=256, num_heads=4, num_layers=6),
        )
    )


def student_model(distillation_token: bool = False) -> ml_collections.ConfigDict:
    """~40x smaller than the teacher: 2 blocks of width 32."""
    return models.get_config(
        dict(
            name="ViT-digits-student",
            patches=dict(size=(4, 4)),
            hidden_size=32,
            transformer=dict(mlp_dim=64, num_heads=2, num_layers=2),
            distillation_token=distillation_token,
        )
    )


def get_config(arg: str = "student") -> ml_collections.ConfigDict:
    c = default.get_config()
    c.teacher = ml_collections.ConfigDict(
        dict(
            checkpoint="",  # workdir / .npz / converted file (objective 'distillation' needs one)
            model="",  # zoo name for files that don't say which model they hold
            dtype="",  # '' = as stored; 'bfloat16' halves the teacher's memory and compute
        )
    )
    c.alpha = 0.5  # weight of the label loss; 1 - alpha weighs the distillation loss
    c.temperature = 4.0
    c.distill_type = "soft"  # soft (KL to the teacher's tempered softmax) | hard (its argmax)
    if arg == "teacher":
        c.model_name, c.model = "ViT-digits-teacher", teacher_model()
        return c
    if arg not in ("student", "scratch", "token"):
        raise ValueError(
            f"configs/distill.py takes teacher, student, scratch or token, got {arg!r}"
        )
    c.model_name = "ViT-digits-student"
    c.model = student_model(distillation_token=arg == "token")
    if arg == "scratch":
        c.alpha = 1.0
    else:
        c.objective = "distillation"
        c.teacher.checkpoint = TEACHER_WORKDIR
    if arg == "token":
        c.distill_type = "hard"
    return c
