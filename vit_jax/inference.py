"""A trained model ready to run: module, parameters, class names and eval preprocessing.

`load_model(path)` accepts a training workdir (or its Orbax checkpoint), a published `.npz`, or
a file converted from PyTorch; `preprocess_file` turns an image file into the model's input the
way the eval pipeline does (resize, central crop, [-1, 1]).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath

from vit_jax import models, weights
from vit_jax import workdir as workdir_lib
from vit_jax.data import image_header, preprocess

__all__ = [
    "imagenet_labels",
    "load_model",
    "preprocess_file",
    "TrainedModel",
]


_WITH_INTERMEDIATES = dict(train=False, return_intermediates=True)


@dataclasses.dataclass
class TrainedModel:
    model: nn.Module
    params: Any
    model_config: ml_collections.ConfigDict
    class_names: list[str]
    resize: int
    crop: int
    recorded_class_names: list[str] | None = None  # what the checkpoint says, None if nothing
    normalization: dict | None = None  # {'mean', 'std'} the model's inputs were normalised with
    antialias: bool = True  # eval downscaling: a run's `pp.antialias`, else on

    def preprocess_file(
        self,
        path: str,
        *,
        antialias: bool | None = None,
        max_pixels: int | None = image_header.DEFAULT_MAX_PIXELS,
    ) -> np.ndarray:
        """An image file -> this model's input (eval resize and crop, its normalisation;
        `antialias` None: the model's; `max_pixels`: see `preprocess_file`)."""
        return preprocess_file(
            path,
            resize=self.resize,
            crop=self.crop,
            antialias=self.antialias if antialias is None else antialias,
            norm=self.normalization,
            max_pixels=max_pixels,
        )

    def preprocess_bytes(
        self,
        encoded: bytes,
        *,
        what: str = "image",
        max_pixels: int | None = image_header.DEFAULT_MAX_PIXELS,
    ) -> np.ndarray:
        """Encoded image bytes -> this model's input (see `preprocess_file`)."""
        return preprocess_bytes(
            encoded,
            resize=self.resize,
            crop=self.crop,
            what=what,
            antialias=self.antialias,
            norm=self.normalization,
            max_pixels=max_pixels,
        )

    def logits(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._logits_fn(self.params, images))

    def intermediates(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return jax.tree.map(np.asarray, self._intermediates_fn(self.params, images))

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda p, x: self.model.apply({"params": p}, x, train=False)[0])

    @functools.cached_property
    def _intermediates_fn(self):
        def intermediates(params, images):
            return self.model.apply({"params": params}, images, **_WITH_INTERMEDIATES)[1]

        return jax.jit(intermediates)


def imagenet_labels(num_classes: int) -> list[str] | None:
    """ImageNet-1k class names ('tench', 'goldfish', ...) for a 1000-class head that records
    none: the first name of each class in the list tensorflow-datasets ships (its `siscore`
    labels, in the standard class order; tfds' `imagenet2012/labels.txt` holds WordNet ids).
    None for other class counts or when the list is not there."""
    if num_classes != 1000:
        return None
    try:
        from tensorflow_datasets.datasets.siscore import labels
    except ImportError:
        return None
    names = [str(n).split(",")[0].strip() for n in getattr(labels, "IMAGENET_LABELS_LIST", ())]
    return names if len(names) == 1000 else None


def _num_classes(params: Any) -> int | None:
    head = params.get("head") if isinstance(params, dict) else None
    return int(head["kernel"].shape[-1]) if head else None


def load_model(
    path: str,
    *,
    model: str | ml_collections.ConfigDict | None = None,
    default_model: str | ml_collections.ConfigDict | None = None,
    resolution: int | None = None,
    class_names: list[str] | None = None,
) -> TrainedModel:
    """Loads anything `vit_jax.weights.open` reads (a run, `.npz`, transformers dir, timm file).

    What the checkpoint records wins: a run's model config, image size, class names and eval
    preprocessing (`eval_preprocessing`, also in its final.npz) are used even when the workdir's
    `config.json` says otherwise (for runs from before that key it supplies the eval resize and
    `pp.antialias`, when its crop agrees). For files: `model` (zoo name or config) overrides
    what the file records; `default_model` is used only when the file records nothing.
    `resolution` runs the model at another input size (position embeddings resampled by
    `vit_jax.weights.fit`).

    Raises `CheckpointError` (a ValueError) naming the file for anything that cannot be read or
    does not fit the model, `CheckpointNotFoundError` when there is nothing at `path`.
    """
    is_run = weights.format_of(path) == "run"
    if is_run and model is not None:
        logging.warning("%s: a trainer checkpoint records its model; ignoring %s", path, model)
        model = None
    try:
        params, meta = weights.open(path, model=model, default_model=default_model)
    except weights.CheckpointError:
        raise
    except ValueError as e:  # unknown model name, bad override in --model
        raise weights.CheckpointError(f"{path}: {e}") from None
    what = f"{path} (step {meta['step']})" if "step" in meta else str(path)
    if not meta.get("model"):
        hint = "" if is_run else "; pass --model NAME (e.g. ViT-B_16)"
        raise weights.CheckpointError(f"{what}: the checkpoint does not record its model{hint}")
    config = models.get_config(meta["model"])
    recorded = list(meta.get("class_names") or [])
    stored = _pair(meta.get("image_size"))
    crop = (stored or (models.DEFAULT_RESOLUTION,) * 2)[0]
    resize, antialias = _eval_geometry(path, meta, crop, what, is_run)
    if resolution:
        crop = resize = int(resolution)
    num_classes = _num_classes(params)
    names = (
        class_names
        or recorded
        or imagenet_labels(num_classes or 0)
        or [f"class_{i}" for i in range(num_classes or 0)]
    )
    module = models.get_model(config, num_classes=num_classes)
    target = models.init_shapes(module, (crop, crop))
    params = weights.fit(params, meta, config, target, image_size=(crop, crop), what=what)
    norm = meta.get("normalization")
    return TrainedModel(
        module, params, config, names, resize, crop, recorded or None, norm, antialias
    )


def _pair(size: Any) -> tuple[int, int] | None:
    if not size:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[-1])


def _eval_geometry(path: str, meta: dict, crop: int, what: str, is_run: bool) -> tuple[int, bool]:
    """The eval (resize, antialias): what the weights record, else for a run from before the
    key its config.json's, else (the crop, antialiased)."""
    recorded = _recorded_eval_geometry(meta, crop, what)
    if recorded is not None:
        return recorded
    return _run_eval_geometry(path, crop) if is_run else (crop, True)


def _recorded_eval_geometry(meta: dict, crop: int, what: str) -> tuple[int, bool] | None:
    """(resize, antialias) the weights record (`eval_preprocessing`: a run's checkpoints and
    final.npz), or None when they record none. A crop other than the weights' image size (an
    edited sidecar) is refused: the recorded resize belongs to that crop."""
    recorded = meta.get("eval_preprocessing")
    if recorded is None:
        return None
    try:
        geometry = preprocess.eval_geometry(recorded, f"{what}: eval_preprocessing")
    except ValueError as e:
        raise weights.CheckpointError(str(e)) from None
    if geometry["crop"] != crop:
        raise weights.CheckpointError(
            f"{what}: eval_preprocessing crops {geometry['crop']}x{geometry['crop']}, but the "
            f"weights were trained at {crop}x{crop} (image_size)"
        )
    return geometry["resize"], geometry["antialias"]


def _run_eval_geometry(path: str, crop: int) -> tuple[int, bool]:
    """The run's eval (resize, antialias): config.json's `pp.resize` and `pp.antialias` when its
    `pp.crop` is the checkpoint's image size, otherwise (the image size, True) (config.json may
    have been changed after the checkpoint was written)."""
    p = epath.Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        f = candidate / workdir_lib.CONFIG_JSON
        if not f.exists():
            continue
        try:
            pp = json.loads(f.read_text()).get("pp") or {}
            stored_crop, resize = int(pp["crop"]), int(pp["resize"])
            antialias = pp.get("antialias", True)  # absent: a run from before the key
            if not isinstance(antialias, bool):
                raise TypeError(f"pp.antialias must be true or false, got {antialias!r}")
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            logging.warning("%s: ignored (%s); evaluating at the checkpoint's size", f, e)
            return crop, True
        if stored_crop == crop:
            return resize, antialias
        logging.warning(
            "%s says pp.crop=%d, but the checkpoint was trained at %d: using the checkpoint's "
            "size (resize and crop %d)",
            f,
            stored_crop,
            crop,
            crop,
        )
        return crop, True
    return crop, True


def preprocess_file(
    path: str,
    *,
    resize: int,
    crop: int,
    antialias: bool = True,
    norm: dict | None = None,
    max_pixels: int | None = image_header.DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """An image file -> float32 (crop, crop, 3) model input, as the eval pipeline makes it
    (`antialias`: see `vit_jax.data.preprocess.resize`; `norm`: the model's {'mean', 'std'},
    default the published [-1, 1]).

    An image whose header says it has more than `max_pixels` pixels (None: no cap) is refused
    with `image_header.ImageTooLargeError` before it is read in full or decoded. Raises
    ValueError naming the file when it cannot be read or decoded.
    """
    if not tf.io.gfile.exists(path):
        raise ValueError(f"{path}: no such file")
    try:
        with image_header.open_file(path) as f:
            image_header.check_pixels(f, path, max_pixels)
        encoded = tf.io.read_file(path).numpy()
    except (tf.errors.OpError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({_short(e)})") from None
    return preprocess_bytes(
        encoded,
        resize=resize,
        crop=crop,
        what=path,
        antialias=antialias,
        norm=norm,
        max_pixels=max_pixels,
    )


def preprocess_bytes(
    encoded: bytes | tf.Tensor,
    *,
    resize: int,
    crop: int,
    what: str = "image",
    antialias: bool = True,
    norm: dict | None = None,
    max_pixels: int | None = image_header.DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Encoded image bytes -> float32 (crop, crop, 3) in [-1, 1]: `preprocess_file` without the
    file (the server's uploads). Raises `image_header.ImageTooLargeError` (nothing decoded) above
    `max_pixels`, ValueError naming `what` when they do not decode."""
    if isinstance(encoded, tf.Tensor):
        encoded = encoded.numpy()
    image_header.check_pixels(encoded, what, max_pixels)
    try:
        image = preprocess.decode_image(tf.convert_to_tensor(encoded, tf.string))
        image = preprocess.eval_image(image, resize_to=resize, crop=crop, antialias=antialias)
        return np.asarray(preprocess.to_model_range(image, norm), np.float32)
    except (tf.errors.OpError, ValueError, OSError) as e:
        raise ValueError(f"{what}: not a readable image ({_short(e)})") from None


def _short(error: BaseException) -> str:
    """The first line of a TensorFlow error without its graph-node and op suffixes."""
    message = getattr(error, "message", str(error)).strip().splitlines()[0]
    return re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", message).strip()
