"""Offline transfer demo on `digits`: pre-train on digits 0-4, fine-tune on 5-9 with a new head.

    python -m vit_jax.train --config=configs/transfer.py:pretrain --workdir=runs/pre
    python -m vit_jax.train --config=configs/transfer.py:finetune --workdir=runs/ft \
        --config.pretrained_path=runs/pre
    python -m vit_jax.train --config=configs/transfer.py:scratch --workdir=runs/scratch

`finetune` and `scratch` share the step budget; BENCHMARKS.md compares their accuracy.
"""

import ml_collections

from vit_jax.configs import default

__all__ = ["get_config"]


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
    c = default.get_config()
    if arg == "pretrain":
        c.class_subset = (0, 1, 2, 3, 4)
        c.total_steps = 600
    elif arg in ("finetune", "scratch"):
        c.class_subset = (5, 6, 7, 8, 9)
        c.total_steps = 60
        c.warmup_steps = 10
        c.eval_every = 20
        c.checkpoint_every = 60
        c.progress_every = 20
        if arg == "finetune":
            c.base_lr = 1e-3
    else:
        raise ValueError(f"configs/transfer.py takes pretrain, finetune or scratch, got {arg!r}")
    return c
