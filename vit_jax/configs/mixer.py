"""Fine-tune an MLP-Mixer: `configs/mixer.py:MODEL,DATASET` (MODEL: Mixer-B_16, b16, b32, l16).

Same reference recipe as configs/vit.py; weights from `pretrained_dir/MODEL.npz`
(gs://mixer_models/imagenet21k or imagenet1k).
"""

import ml_collections

from vit_jax.configs import schema

__all__ = ["SHORT", "get_config"]

SHORT = {"b16": "Mixer-B_16", "b32": "Mixer-B_32", "l16": "Mixer-L_16"}


def get_config(arg: str = "b16,cifar10") -> ml_collections.ConfigDict:
    model, _, dataset = arg.partition(",")
    c = schema.get_config()
    schema.with_model(c, SHORT.get(model.lower(), model))
    schema.with_dataset(c, dataset or "cifar10")
    c.pretrained_dir = "."
    return c
