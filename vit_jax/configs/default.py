"""The embedded default: a small ViT trained from scratch on `digits`, offline, in ~a minute.

    python -m vit_jax.train --config=configs/default.py --workdir=runs/default

The UCI handwritten digits ship with scikit-learn (8x8 grayscale, 10 classes), upscaled to 16x16;
a 4-layer ViT with 4x4 patches reaches >= 97% test accuracy (see BENCHMARKS.md).
"""

import ml_collections

from vit_jax import models
from vit_jax.configs import schema

__all__ = ["get_config"]


def get_config() -> ml_collections.ConfigDict:
    c = schema.get_config()
    c.model_name = "ViT-digits"
    c.model = ml_collections.ConfigDict(
        dict(
            name="ViT-digits",
            patches=dict(size=(4, 4)),
            hidden_size=64,
            transformer=dict(mlp_dim=128, num_heads=4, num_layers=4),
            classifier="token",
        )
    )
    c.model = models.get_config(c.model)
    c.dataset = "digits"
    c.pp.train, c.pp.test = "train", "test"
    c.pp.resize, c.pp.crop = 18, 16
    c.pp.flip = False  # a mirrored digit is another symbol
    c.optimizer = "adamw"
    c.base_lr = 2e-3
    c.weight_decay = 1e-4
    c.warmup_steps = 50
    c.total_steps = 600
    c.grad_norm_clip = 1.0
    c.batch = 128
    c.batch_eval = 256
    c.eval_every = 200
    c.progress_every = 50
    c.checkpoint_every = 200
    return c
