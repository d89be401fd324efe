"""A trained model ready to run: module, parameters, class names and eval preprocessing.

`load_model(path)` accepts a training workdir (or its Orbax checkpoint), a published `.npz`, or
a file converted from PyTorch; `preprocess_file` turns an image file into the model's input the
way the eval pipeline does (resize, central crop, [-1, 1]).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tensorflow as tf
from etils import epath

from vit_jax import models
from vit_jax import workdir as workdir_lib
from vit_jax.data import preprocess


@dataclasses.dataclass
class TrainedModel:
    model: nn.Module
    params: Any
    model_config: ml_collections.ConfigDict
    class_names: list[str]
    resize: int
    crop: int

    def logits(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(_apply(self.model)(self.params, images))

    def intermediates(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return jax.tree.map(np.asarray, _apply_with_out(self.model)(self.params, images))


_APPLY_CACHE: dict[int, Any] = {}


def _apply(model: nn.Module):
    key = (id(model), False)
    if key not in _APPLY_CACHE:
        _APPLY_CACHE[key] = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    return _APPLY_CACHE[key]


def _apply_with_out(model: nn.Module):
    key = (id(model), True)
    if key not in _APPLY_CACHE:
        _APPLY_CACHE[key] = jax.jit(
            lambda p, x: model.apply({"params": p}, x, train=False, return_intermediates=True)[1]
        )
    return _APPLY_CACHE[key]


def imagenet_labels(num_classes: int) -> list[str] | None:
    """ImageNet-1k class names from tensorflow-datasets' packaged label file (1000 classes)."""
    if num_classes != 1000:
        return None
    try:
        import tensorflow_datasets as tfds

        path = epath.Path(tfds.__file__).parent / "datasets/imagenet2012/labels.txt"
        if not path.exists():
            path = epath.Path(tfds.__file__).parent / "image_classification/imagenet2012_labels.txt"
        names = path.read_text().split()
    except (ImportError, OSError):
        return None
    return names if len(names) == 1000 else None


def _num_classes(params: Any) -> int | None:
    head = params.get("head") if isinstance(params, dict) else None
    return int(head["kernel"].shape[-1]) if head else None


def load_model(
    path: str,
    *,
    model: str | None = None,
    resolution: int | None = None,
    class_names: list[str] | None = None,
) -> TrainedModel:
    """Loads `path`; `model` (zoo name) is needed for files that don't say what they hold."""
    if workdir_lib.is_trained(path):
        params, meta = workdir_lib.load_trained(path)
        config = models.get_config(meta["model"])
        names = list(meta.get("class_names") or [])
        crop = int(meta.get("image_size", [resolution or models.DEFAULT_RESOLUTION])[0])
        resize = crop
        run_config = _run_config(path)
        if run_config:
            resize, crop = int(run_config["pp"]["resize"]), int(run_config["pp"]["crop"])
    else:
        from vit_jax import checkpoint

        params, stored_config, names = checkpoint.load_with_metadata(path)
        if model:
            config = models.get_config(model)
        elif stored_config is not None:
            config = models.get_config(stored_config)
        else:
            raise ValueError(
                f"{path}: the file does not say which model it holds; pass --model (e.g. ViT-B_16)"
            )
        stored_size = (
            checkpoint.read_metadata(path).get("image_size")
            if not epath.Path(path).is_dir()
            else None
        )
        crop = resize = resolution or int((stored_size or [models.DEFAULT_RESOLUTION])[0])
        names = list(names or [])
    if resolution:
        crop = resize = resolution
    num_classes = _num_classes(params)
    names = (
        class_names
        or names
        or imagenet_labels(num_classes or 0)
        or [f"class_{i}" for i in range(num_classes or 0)]
    )
    if config.get("scan") and not models.is_stacked(params):
        params = models.stack_layers(params)
    elif not config.get("scan") and models.is_stacked(params):
        params = models.unstack_layers(params)
    module = models.get_model(config, num_classes=num_classes)
    return TrainedModel(module, params, config, names, resize, crop)


def _run_config(path: str) -> dict | None:
    """The workdir's config.json when `path` is (inside) a workdir."""
    p = epath.Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        f = candidate / workdir_lib.CONFIG_JSON
        if f.exists():
            return json.loads(f.read_text())
    return None


def preprocess_file(path: str, *, resize: int, crop: int) -> np.ndarray:
    """An image file -> float32 (crop, crop, 3) in [-1, 1], as the eval pipeline does it.

    Raises ValueError naming the file when it cannot be read or decoded.
    """
    if not tf.io.gfile.exists(path):
        raise ValueError(f"{path}: no such file")
    try:
        encoded = tf.io.read_file(path)
        image = preprocess.decode_image(encoded)
        image = preprocess.eval_image(image, resize_to=resize, crop=crop)
        return np.asarray(preprocess.to_model_range(image), np.float32)
    except (tf.errors.OpError, ValueError, OSError) as e:
        message = getattr(e, "message", str(e)).strip().splitlines()[0]
        message = re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", message).strip()
        raise ValueError(f"{path}: not a readable image ({message})") from None
