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
from absl import logging
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
    recorded_class_names: list[str] | None = None  # what the checkpoint says, None if nothing

    def logits(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(_apply(self.model)(self.params, images))

    def intermediates(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return jax.tree.map(np.asarray, _apply_with_out(self.model)(self.params, images))


_APPLY_CACHE: dict[int, Any] = {}


def _apply(model: nn.Module):
    key = (id(model), False)
    if key not in _APPLY_CACHE:
        _APPLY_CACHE[key] = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0])
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


def num_prefix_tokens(module: nn.Module) -> int:
    """Tokens before the patch tokens: class token, plus DeiT's distillation token."""
    if getattr(module, "classifier", None) not in ("token", "token_unpooled"):
        return 0
    return 2 if getattr(module, "distillation_token", False) else 1


def fit_params(
    module: nn.Module,
    params: Any,
    image_size: tuple[int, int],
    *,
    what: str,
    model_name: str | None = None,
    stored_image_size: tuple[int, int] | None = None,
) -> Any:
    """`params` checked against `module` run on `image_size` images.

    Position embeddings made for another grid are resampled (the stored grid comes from
    `stored_image_size`, square by default); anything else that differs is one
    `CheckpointError` naming `what` and every missing, mismatched and unexpected key.
    """
    from vit_jax import checkpoint

    expected = {
        k: tuple(v.shape)
        for k, v in checkpoint.flatten(models.init_shapes(module, image_size)).items()
    }
    flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
    mismatched = []
    key = checkpoint.POSEMB_KEY
    if key in flat and key in expected and flat[key].shape != expected[key]:
        stored, target = flat[key], expected[key]
        if stored.ndim == 3 and stored.shape[-1] == target[-1]:
            sh, sw = module.stride()
            try:
                old_grid = None
                if stored_image_size is not None:
                    old_grid = (stored_image_size[0] // sh, stored_image_size[1] // sw)
                flat[key] = checkpoint.resample_posemb(
                    stored,
                    (image_size[0] // sh, image_size[1] // sw),
                    num_prefix_tokens=num_prefix_tokens(module),
                    old_grid=old_grid,
                )
                logging.info("%s: position embeddings resampled to %s", what, image_size)
            except checkpoint.CheckpointError as e:
                mismatched.append(f"{key}: stored {stored.shape}, model {target} ({e})")
    expected = dict(sorted(expected.items(), key=lambda kv: kv[0].lower()))  # cls, embedding, ..
    for k, shape in expected.items():
        if k in flat and flat[k].shape != shape and not (mismatched and k == key):
            mismatched.append(f"{k}: stored {flat[k].shape}, model {shape}")
    missing = [f"{k} {shape}" for k, shape in expected.items() if k not in flat]
    unexpected = [f"{k} {v.shape}" for k, v in flat.items() if k not in expected]
    if missing or mismatched or unexpected:
        name = model_name or type(module).__name__
        raise checkpoint.CheckpointError(
            checkpoint.mismatch_report(
                f"{what} does not fit {name} at {image_size[0]}x{image_size[1]}",
                missing=missing,
                mismatched=mismatched,
                unexpected=unexpected,
            )
        )
    return checkpoint.unflatten(flat)


def load_model(
    path: str,
    *,
    model: str | ml_collections.ConfigDict | None = None,
    default_model: str | ml_collections.ConfigDict | None = None,
    resolution: int | None = None,
    class_names: list[str] | None = None,
) -> TrainedModel:
    """Loads `path` (workdir, checkpoint dir, `.npz`, transformers dir or timm file).

    What the checkpoint records wins: a trainer checkpoint's model config, image size and class
    names are used even when the workdir's `config.json` says otherwise (it only supplies the
    eval resize, when its crop agrees). For files: `model` (zoo name or config) overrides what the
    file records; `default_model` is used only when the file records nothing. `resolution`
    runs the model at another input size (position embeddings resampled).

    Raises `CheckpointError` (a ValueError) naming the file for anything that cannot be read or
    does not fit the model, `CheckpointNotFoundError` when there is nothing at `path`.
    """
    from vit_jax import checkpoint

    if _is_workdir(path):
        if model is not None:
            logging.warning("%s: a trainer checkpoint records its model; ignoring %s", path, model)
        params, meta = workdir_lib.load_trained(path)
        what = f"{path} (step {meta['step']})" if "step" in meta else str(path)
        if not meta.get("model"):
            raise checkpoint.CheckpointError(f"{what}: the checkpoint does not record its model")
        config = models.get_config(meta["model"])
        names = list(meta.get("class_names") or [])
        stored = _pair(meta.get("image_size"))
        crop = (stored or (models.DEFAULT_RESOLUTION,) * 2)[0]
        resize = _run_resize(path, crop)
    else:
        from vit_jax import convert

        what = str(path)
        if (
            model is None
            and default_model is not None
            and convert.detect(path) == "npz"
            and not checkpoint.read_metadata(path).get("model")
        ):
            model = default_model
        try:
            converted = convert.load(path, model=model)
        except checkpoint.CheckpointError:
            raise
        except ValueError as e:  # unknown model name, bad override in --model
            raise checkpoint.CheckpointError(f"{path}: {e}") from None
        params, config = converted.params, converted.model_config
        names = list(converted.class_names or [])
        stored = _pair(converted.image_size)
        crop = resize = (stored or (models.DEFAULT_RESOLUTION,) * 2)[0]
    if resolution:
        crop = resize = int(resolution)
    num_classes = _num_classes(params)
    recorded = names
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
    params = fit_params(
        module,
        params,
        (crop, crop),
        what=what,
        model_name=config.get("name"),
        stored_image_size=stored,
    )
    return TrainedModel(module, params, config, names, resize, crop, recorded or None)


def _is_workdir(path: str) -> bool:
    """A trainer workdir, its checkpoints/ dir or a step dir (even with no usable checkpoint)."""
    p = epath.Path(path)
    return workdir_lib.is_trained(p) or (
        p.is_dir()
        and ((p / workdir_lib.CHECKPOINTS).is_dir() or (p / workdir_lib.METRICS_JSONL).exists())
    )


def _pair(size: Any) -> tuple[int, int] | None:
    if not size:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[-1])


def _run_resize(path: str, crop: int) -> int:
    """The eval resize of the run: config.json's `pp.resize` when its `pp.crop` is the
    checkpoint's image size, otherwise the image size itself (config.json may have been
    changed after the checkpoint was written)."""
    p = epath.Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        f = candidate / workdir_lib.CONFIG_JSON
        if not f.exists():
            continue
        try:
            pp = json.loads(f.read_text()).get("pp") or {}
            stored_crop, resize = int(pp["crop"]), int(pp["resize"])
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            logging.warning("%s: ignored (%s); evaluating at the checkpoint's size", f, e)
            return crop
        if stored_crop == crop:
            return resize
        logging.warning(
            "%s says pp.crop=%d, but the checkpoint was trained at %d: using the checkpoint's "
            "size (resize and crop %d)",
            f,
            stored_crop,
            crop,
            crop,
        )
        return crop
    return crop


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
