"""Fine-tune a zoo ViT on a dataset with the reference recipe: `configs/vit.py:MODEL,DATASET`.

    python -m vit_jax.train --config=configs/vit.py:b16,cifar10 --workdir=DIR \
        --config.pretrained_dir=gs://vit_models/imagenet21k

MODEL: a zoo name (ViT-B_16, R50+ViT-B_16, ...) or a short form (ti16, s16, b16, l16, h14, b8,
s32, b32, l32, r50_b16, ...). DATASET: cifar10, cifar100, imagenet2012, oxford_iiit_pet,
oxford_flowers102 (reference presets), any other tfds name, or a folder with train/ and test/.
Recipe (reference): SGD momentum 0.9, lr 0.03, batch 512, warmup 500, cosine, grad clip 1,
resolution 384, initialised from `pretrained_dir/MODEL.npz` (head replaced, posemb resampled).
"""

import ml_collections

from vit_jax import models
from vit_jax.configs import schema

__all__ = ["SHORT", "get_config", "model_name"]

SHORT = {
    "ti16": "ViT-Ti_16",
    "s16": "ViT-S_16",
    "b16": "ViT-B_16",
    "l16": "ViT-L_16",
    "h14": "ViT-H_14",
    "b8": "ViT-B_8",
    "s32": "ViT-S_32",
    "b32": "ViT-B_32",
    "l32": "ViT-L_32",
    "r_ti16": "R+ViT-Ti_16",
    "r26_s32": "R26+ViT-S_32",
    "r50_b16": "R50+ViT-B_16",
    "r50_l32": "R50+ViT-L_32",
}


def model_name(arg: str) -> str:
    name = SHORT.get(arg.lower(), arg)
    models.get_config(name)  # unknown names fail here, with suggestions
    return name


def get_config(arg: str = "b16,cifar10") -> ml_collections.ConfigDict:
    model, _, dataset = arg.partition(",")
    c = schema.get_config()
    schema.with_model(c, model_name(model))
    schema.with_dataset(c, dataset or "cifar10")
    c.pretrained_dir = "."
    return c
