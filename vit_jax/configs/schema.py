"""Every trainer key with its default, the reference datasets' presets, and readers of a config.

Key names follow the reference vit_jax configs (`batch`, `base_lr`, `total_steps`, `pp`, ...).
This is the one definition: the user-facing recipes (top-level `configs/*.py`), the benchmark and
the tests start from `get_config()` and override what they need.
"""

from __future__ import annotations

import ml_collections

from vit_jax import models

__all__ = ["DATASET_PRESETS", "get_config", "image_size", "with_dataset", "with_model"]

# Reference fine-tuning presets: splits, steps and resolution per tfds dataset.
DATASET_PRESETS = {
    "cifar10": dict(total_steps=10_000, train="train[:98%]", test="test", resize=448, crop=384),
    "cifar100": dict(total_steps=10_000, train="train[:98%]", test="test", resize=448, crop=384),
    "imagenet2012": dict(
        total_steps=20_000, train="train[:99%]", test="validation", resize=448, crop=384
    ),
    "oxford_iiit_pet": dict(
        total_steps=500, train="train[:90%]", test="test", resize=448, crop=384
    ),
    "oxford_flowers102": dict(
        total_steps=500, train="train[:90%]", test="test", resize=448, crop=384
    ),
}


def get_config() -> ml_collections.ConfigDict:
    """Every trainer key with its default; named configs override what they need.

    Long: one assignment per key, in one place, is what makes this the schema.
    """
    c = ml_collections.ConfigDict()
    # Model: a zoo name and its full config (overridable field by field).
    c.model_name = "ViT-B_16"
    c.model = models.get_config("ViT-B_16")
    c.num_classes = -1  # -1: from the dataset
    # Pretrained start: a .npz / converted file / trainer workdir, or pretrained_dir + model_name.
    c.pretrained_path = ""
    c.pretrained_dir = ""
    # Data (vit_jax.data).
    c.dataset = "digits"
    c.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
    c.tfds_manual_dir = ml_collections.FieldReference(None, field_type=str)
    c.class_subset = ml_collections.FieldReference(None, field_type=tuple)
    c.skip_bad_images = False
    c.prefetch = 2
    c.pp = ml_collections.ConfigDict(
        dict(
            train="train",
            test="test",
            resize=448,
            crop=384,
            inception_crop=False,
            flip=True,
            mixup_alpha=0.0,
            randaugment_layers=0,
            randaugment_magnitude=10,
            # Eval/predict downscaling averages the pixels it covers (PIL-like); False: the
            # reference pipeline's plain bilinear, with which the published numbers were measured.
            antialias=True,
            # The model's input normalisation, (pixel / 255 - mean) / std per channel: 0.5 / 0.5
            # is the published checkpoints' [-1, 1]; ImageNet's mean/std for DINOv2 / DeiT.
            # Recorded in checkpoints; predict, probe, serve and export apply what was recorded.
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        )
    )
    # Optimisation (vit_jax.optim): the reference fine-tuning recipe. optimizer: sgd | adamw | lion.
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.momentum_dtype = "float32"
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.lion_b1 = 0.9
    c.lion_b2 = 0.99
    c.weight_decay = 0.0
    c.wd_mults = ()  # ((regex, multiplier), ...): the first match wins; else the no-decay rule
    c.base_lr = 0.03
    c.warmup_steps = 500
    c.decay_type = "cosine"
    c.total_steps = 10_000
    c.grad_norm_clip = 1.0
    c.accum_steps = 1
    c.freeze = ()
    c.lr_mults = ()
    # Layer-wise lr decay in (0, 1] (1.0 = off): block i of L gets layer_decay ** (L - i).
    c.layer_decay = 1.0
    # What the step minimises (vit_jax.objectives): classification | distillation.
    c.objective = "classification"
    c.loss = "softmax_xent"  # or sigmoid_xent
    c.label_smoothing = 0.0
    c.batch = 512
    c.batch_eval = 512
    c.seed = 0
    # Devices: -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    # Schedule of side jobs (in steps); eval and checkpoint also run at the end.
    c.eval_every = 500
    # What each eval step measures (vit_jax.evaluators): name -> dict(type=..., options), e.g.
    # `c.evals.knn = dict(type="knn", k=20, temperature=0.07)` adds k-NN accuracy of the frozen
    # features (`knn_accuracy`). The default: the head's test accuracy / top-5 / loss alone.
    c.evals = ml_collections.ConfigDict(dict(classification=dict(type="classification")))
    c.progress_every = 50
    c.checkpoint_every = 500
    c.max_to_keep = 2
    c.async_checkpointing = True
    c.write_final_npz = True
    return c


def with_model(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Sets `model_name` and `model` to the zoo model `name`."""
    config.model_name = name
    config.model = models.get_config(name)
    return config


def with_dataset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Applies a reference preset; other tfds names / folders keep the defaults."""
    config.dataset = name
    preset = DATASET_PRESETS.get(name)
    if preset:
        config.total_steps = preset["total_steps"]
        config.pp.train, config.pp.test = preset["train"], preset["test"]
        config.pp.resize, config.pp.crop = preset["resize"], preset["crop"]
    return config


def image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(height, width) of the model's input: the preprocessing's final crop (`pp.crop`)."""
    return (int(config.pp.crop), int(config.pp.crop))
