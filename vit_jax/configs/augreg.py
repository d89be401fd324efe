"""Fine-tune an AugReg ("How to train your ViT") checkpoint: `configs/augreg.py:NAME[,DATASET]`.

NAME is an AugReg short model name (Ti_16, S_16, B_16, L_16, S_32, B_32, R_Ti_16, R26_S_32,
R50_L_32), resolved to its best imagenet21k checkpoint through the AugReg index, or a full
AugReg file name such as `B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0`.
"""

import ml_collections

from vit_jax import models
from vit_jax.configs import schema

__all__ = ["get_config"]


def get_config(arg: str = "B_16,cifar100") -> ml_collections.ConfigDict:
    name, _, dataset = arg.partition(",")
    short = name.split("-", 1)[0]
    c = schema.get_config()
    schema.with_model(c, models.AUGREG_NAMES.get(short, short))
    c.model_name = name  # the checkpoint name resolved under pretrained_dir
    schema.with_dataset(c, dataset or "cifar100")
    c.pretrained_dir = "gs://vit_models/augreg"
    c.base_lr = 0.01
    return c
