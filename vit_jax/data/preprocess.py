"""Per-example image ops in tf.data: decode to RGB, train/eval crops, flip, value range, mixup.

Every random op is *stateless*: it takes an explicit `seed` (int64 [2]) so that an example's
augmentation is a pure function of (config.seed, its global position) -- what makes the training
order resumable and independent of the number of processes.
"""

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

# Random resized crop ("inception crop") ranges, as in the reference vit_jax pipeline.
__all__ = [
    "INCEPTION_AREA_RANGE",
    "INCEPTION_ASPECT_RANGE",
    "DEFAULT_NORMALIZATION",
    "central_crop",
    "decode_image",
    "eval_geometry",
    "eval_image",
    "inception_crop",
    "mixup_pairs",
    "mixup_ratios",
    "normalization",
    "resize",
    "to_display_range",
    "to_model_range",
    "train_image",
]

INCEPTION_AREA_RANGE = (0.05, 1.0)
INCEPTION_ASPECT_RANGE = (3 / 4, 4 / 3)


def _decode_with_pil(encoded: bytes | np.ndarray) -> np.ndarray:
    """PIL decode for formats TF decodes wrongly (palette and 1-bit BMPs). tf.numpy_function
    passes `bytes` in graphs but a 0-d object array when run eagerly. An RGB image is not
    converted (`convert` would copy it: 4 more bytes a pixel at the peak)."""
    if isinstance(encoded, np.ndarray):
        encoded = encoded.item()
    with Image.open(io.BytesIO(encoded)) as image:
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP/WebP bytes to uint8 RGB [h, w, 3].

    Grayscale is replicated to 3 channels; alpha is dropped (as PIL's `convert('RGB')`); palette,
    CMYK and 16-bit images are converted; animated GIFs give their first frame. TF's BMP decoder
    misreads palette BMPs, so BMPs go through PIL.
    """

    def pil() -> tf.Tensor:
        image = tf.numpy_function(_decode_with_pil, [encoded], tf.uint8, stateful=False)
        image.set_shape([None, None, 3])
        return image

    def native() -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return image

    return tf.cond(tf.strings.substr(encoded, 0, 2) == b"BM", pil, native)


def resize(image: tf.Tensor, size: int, *, antialias: bool = False) -> tf.Tensor:
    """Bilinear resize of uint8 [..., h, w, 3] to uint8 [..., size, size, 3] (aspect not kept, as
    the reference pipeline); a batch [n, h, w, 3] is resized image by image.

    `antialias=False` (the reference pipeline, and training here) samples the 4 nearest source
    pixels, so a downscale skips pixels: thin strokes of a nearest-upscaled image or fine texture
    of a large photo alias. `antialias=True` widens the triangle filter by the downscale factor,
    averaging every source pixel an output pixel covers (as PIL's bilinear resize); it changes
    nothing but rounding when upscaling.
    """
    resized = tf.image.resize(image, [size, size], method="bilinear", antialias=antialias)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Central size x size crop of a [..., h, w, c] image (or batch) with h, w >= size."""
    shape = tf.shape(image)
    top = (shape[-3] - size) // 2
    left = (shape[-2] - size) // 2
    cropped = image[..., top : top + size, left : left + size, :]
    return tf.ensure_shape(cropped, image.shape[:-3].concatenate([size, size, 3]))


def inception_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Random resized crop: a random box of 5-100% of the area and aspect 3/4..4/3, resized to
    size x size."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=INCEPTION_ASPECT_RANGE,
        area_range=INCEPTION_AREA_RANGE,
        use_image_if_no_bounding_boxes=True,
    )
    return resize(tf.slice(image, begin, crop_size), size)


def train_image(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    resize_to: int,
    crop: int,
    use_inception_crop: bool,
    flip: bool,
) -> tf.Tensor:
    """Train geometry: inception crop, or resize to `resize_to` then random crop; optional
    horizontal flip. uint8 in, uint8 [crop, crop, 3] out."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if use_inception_crop:
        image = inception_crop(image, crop, crop_seed)
    else:
        image = tf.image.stateless_random_crop(resize(image, resize_to), [crop, crop, 3], crop_seed)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(image, [crop, crop, 3])


def eval_image(image: tf.Tensor, *, resize_to: int, crop: int, antialias: bool = True) -> tf.Tensor:
    """Eval geometry: resize to `resize_to` (antialiased unless `antialias=False`, see `resize`),
    central crop `crop`. uint8 [..., h, w, 3] in, uint8 [..., crop, crop, 3] out."""
    return central_crop(resize(image, resize_to, antialias=antialias), crop)


def eval_geometry(pp: Mapping[str, Any], where: str = "pp") -> dict[str, Any]:
    """{'resize', 'crop', 'antialias'} of the eval pipeline (`eval_image`), checked: what a run
    records with its weights so that every reader preprocesses as the run was evaluated.

    `pp` is a config's `pp` or a recorded dict; `antialias` absent means on (runs from before the
    key). Raises ValueError naming `where` and the value for anything else."""
    try:
        resize, crop = pp["resize"], pp["crop"]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: needs 'resize' and 'crop', got {pp!r}") from None
    antialias = pp.get("antialias", True)
    sizes_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (resize, crop))
    if not sizes_ok or crop < 1 or resize < crop:
        raise ValueError(
            f"{where}: resize and crop must be integers with resize >= crop >= 1, "
            f"got resize={resize!r}, crop={crop!r}"
        )
    if not isinstance(antialias, bool):
        raise ValueError(f"{where}: antialias must be true or false, got {antialias!r}")
    return {"resize": resize, "crop": crop, "antialias": antialias}


DEFAULT_NORMALIZATION = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # [-1, 1]


def normalization(mean: Any = None, std: Any = None) -> dict[str, tuple[float, ...]]:
    """{'mean': 3 floats, 'std': 3 floats} (defaults: the published [-1, 1]); checked."""
    mean = DEFAULT_NORMALIZATION["mean"] if mean is None else mean
    std = DEFAULT_NORMALIZATION["std"] if std is None else std
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalisation needs 3 means and 3 positive stds, got {mean} / {std}")
    return {"mean": mean, "std": std}


def to_model_range(image: tf.Tensor, norm: Mapping[str, Any] | None = None) -> tf.Tensor:
    """uint8 [0, 255] -> float32 (pixel / 255 - mean) / std; the default is the published
    checkpoints' [-1, 1] (computed as pixel / 127.5 - 1, bit for bit as before)."""
    norm = normalization(**(norm or {}))
    if norm == DEFAULT_NORMALIZATION:
        return tf.cast(image, tf.float32) / 127.5 - 1.0
    mean = tf.constant(norm["mean"], tf.float32)
    std = tf.constant(norm["std"], tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def to_display_range(image: Any, norm: Mapping[str, Any] | None = None) -> np.ndarray:
    """A model input (normalised by `norm`) back to [-1, 1], for pictures of it (numpy)."""
    norm = normalization(**(norm or {}))
    mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    return (np.asarray(image, np.float32) * std + mean) * 2.0 - 1.0


def mixup_ratios(num_pairs: int, alpha: float, seed: tf.Tensor) -> tf.Tensor:
    """`num_pairs` ratios max(l, 1 - l) with l ~ Beta(alpha, alpha) (so each mixed example stays
    dominated by its own image), float32."""
    seed_a, seed_b = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    a = tf.random.stateless_gamma([num_pairs], seed_a, alpha=alpha)
    b = tf.random.stateless_gamma([num_pairs], seed_b, alpha=alpha)
    ratio = tf.math.divide_no_nan(a, a + b)
    return tf.maximum(ratio, 1.0 - ratio)


def mixup_pairs(
    images: tf.Tensor, labels: tf.Tensor, ratios: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mixes examples 2m and 2m+1 of a batch with each other with weight ratios[m] on itself.

    Pairs of neighbours (not a roll over the whole batch) keep the result independent of how the
    global batch is split across processes, as long as each process holds an even number of rows.
    """
    batch = tf.shape(images)[0]

    def mix(x: tf.Tensor) -> tf.Tensor:
        pairs = tf.reshape(x, tf.concat([[batch // 2, 2], tf.shape(x)[1:]], axis=0))
        ratio = tf.reshape(ratios, [-1, 1] + [1] * (len(x.shape) - 1))
        mixed = ratio * pairs + (1.0 - ratio) * pairs[:, ::-1]
        return tf.reshape(mixed, tf.shape(x))

    return mix(images), mix(labels)
