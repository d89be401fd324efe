"""RandAugment (Cubuk et al. 2019) as stateless TF ops on uint8 [h, w, 3] images.

Each of `num_layers` layers applies one op drawn uniformly from `OPS` at a fixed magnitude
(`config.pp.randaugment_magnitude`): 10 is the paper's maximum (rotate 30 deg, shear 0.3,
translate 30%, enhance factors 1 +- 0.9, posterize to 4 bits); larger values, up to 30,
extrapolate linearly (AugReg used 15), with enhance factors kept >= 0 and posterize >= 1 bit.
Signed ops (rotate, shear, translate, enhance) get a random sign.
Photometric ops follow PIL's ImageOps / ImageEnhance definitions so they can be checked against
PIL; geometric ops fill uncovered pixels with gray (128).
"""

from collections.abc import Callable

import tensorflow as tf

__all__ = [
    "ENHANCE_DELTA",
    "FILL_VALUE",
    "FULL_MAGNITUDE",
    "MAX_MAGNITUDE",
    "OPS",
    "ROTATE_DEGREES",
    "SHEAR",
    "SOLARIZE_ADD",
    "TRANSLATE_FRACTION",
    "autocontrast",
    "blend",
    "brightness",
    "color",
    "contrast",
    "equalize",
    "grayscale",
    "invert",
    "posterize",
    "randaugment",
    "rotate",
    "sharpness",
    "shear_x",
    "shear_y",
    "solarize",
    "solarize_add",
    "translate_x",
    "translate_y",
]


MAX_MAGNITUDE = 30
FULL_MAGNITUDE = 10
FILL_VALUE = 128
# Op strengths at FULL_MAGNITUDE; they scale linearly with the magnitude.
ROTATE_DEGREES = 30.0
SHEAR = 0.3
TRANSLATE_FRACTION = 0.3
ENHANCE_DELTA = 0.9  # enhance factors 1 +- 0.9
SOLARIZE_ADD = 110


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """PIL `Image.blend(degenerate, image, factor)` with clipping: factor 1 returns `image`."""
    degenerate = tf.cast(degenerate, tf.float32)
    return _to_uint8(degenerate + factor * (tf.cast(image, tf.float32) - degenerate))


def grayscale(image: tf.Tensor) -> tf.Tensor:
    """ITU-R 601-2 luma as PIL's convert('L'), uint8 [h, w, 1]."""
    return _to_uint8(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32)))


def invert(image: tf.Tensor) -> tf.Tensor:
    """255 - x."""
    return 255 - image


def posterize(image: tf.Tensor, bits: tf.Tensor | int) -> tf.Tensor:
    """Keeps the `bits` most significant bits of each value."""
    shift = tf.cast(8 - bits, tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold: tf.Tensor | int) -> tf.Tensor:
    """Inverts values >= threshold."""
    return tf.where(tf.cast(image, tf.int32) >= tf.cast(threshold, tf.int32), 255 - image, image)


def solarize_add(image: tf.Tensor, addition: tf.Tensor | int) -> tf.Tensor:
    """Adds `addition` to values below 128 (clipped at 255)."""
    added = tf.minimum(tf.cast(image, tf.int32) + tf.cast(addition, tf.int32), 255)
    return tf.where(image < 128, tf.cast(added, tf.uint8), image)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Stretches each channel to the full 0..255 range (PIL `ImageOps.autocontrast`, cutoff 0)."""
    x = tf.cast(image, tf.float32)
    low = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    high = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    scale = tf.math.divide_no_nan(255.0, high - low)
    stretched = tf.floor((x - low) * scale + 0.5)
    return tf.where(high > low, _to_uint8(stretched), image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    values = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(values, minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(hist) - nonzero[-1]) // 255
    safe_step = tf.maximum(step, 1)
    lut = (tf.cumsum(hist, exclusive=True) + safe_step // 2) // safe_step
    lut = tf.cast(tf.minimum(lut, 255), tf.uint8)
    return tf.where(step > 0, tf.gather(lut, values), channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """Per-channel histogram equalisation (PIL `ImageOps.equalize`)."""
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def color(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """Saturation (PIL `ImageEnhance.Color`): 0 gray, 1 unchanged."""
    return blend(tf.image.grayscale_to_rgb(grayscale(image)), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """PIL `ImageEnhance.Contrast`: blend with the mean gray level."""
    mean = tf.floor(tf.reduce_mean(tf.cast(grayscale(image), tf.float32)) + 0.5)
    return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """PIL `ImageEnhance.Brightness`: blend with black."""
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """PIL `ImageEnhance.Sharpness`: blend with the SMOOTH-filtered image (border unchanged)."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    x = tf.cast(image, tf.float32)[None]
    smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
    smooth = _to_uint8(smooth)
    degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, degenerate, image)
    return blend(degenerate, image, factor)


def _transform(image: tf.Tensor, matrix: list) -> tf.Tensor:
    """Maps each output pixel (x, y) to input (a0 x + a1 y + a2, b0 x + b1 y + b2)."""
    transform = tf.cast(tf.stack(matrix + [0.0, 0.0]), tf.float32)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(  # in float: the uint8 kernel truncates
        images=tf.cast(image, tf.float32)[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=float(FILL_VALUE),
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return _to_uint8(out[0])


def rotate(image: tf.Tensor, degrees: tf.Tensor | float) -> tf.Tensor:
    """Rotation about the image centre, counter-clockwise for positive degrees."""
    theta = tf.cast(degrees, tf.float32) * (3.141592653589793 / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    return _transform(
        image,
        [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy],
    )


def shear_x(image: tf.Tensor, shear: tf.Tensor | float) -> tf.Tensor:
    """Horizontal shear: output (x, y) reads input (x + shear * y, y)."""
    return _transform(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0])


def shear_y(image: tf.Tensor, shear: tf.Tensor | float) -> tf.Tensor:
    """Vertical shear: output (x, y) reads input (x, y + shear * x)."""
    return _transform(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0])


def translate_x(image: tf.Tensor, pixels: tf.Tensor | float) -> tf.Tensor:
    """Moves the content right by `pixels`."""
    return _transform(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0])


def translate_y(image: tf.Tensor, pixels: tf.Tensor | float) -> tf.Tensor:
    """Moves the content down by `pixels`."""
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels])


def _enhance_factor(level: float, sign: tf.Tensor) -> tf.Tensor:
    return tf.maximum(1.0 + sign * ENHANCE_DELTA * level, 0.0)


def _size(image: tf.Tensor, axis: int) -> tf.Tensor:
    return tf.cast(tf.shape(image)[axis], tf.float32)


# name -> fn(image, level in [0, 1], sign in {-1., 1.}) -> image
OPS: dict[str, Callable[[tf.Tensor, float, tf.Tensor], tf.Tensor]] = {
    "identity": lambda im, level, sign: im,
    "autocontrast": lambda im, level, sign: autocontrast(im),
    "equalize": lambda im, level, sign: equalize(im),
    "invert": lambda im, level, sign: invert(im),
    "rotate": lambda im, level, sign: rotate(im, sign * ROTATE_DEGREES * level),
    "posterize": lambda im, level, sign: posterize(im, max(1, 8 - int(4 * level))),
    "solarize": lambda im, level, sign: solarize(im, max(0, int(256 * (1 - level)))),
    "solarize_add": lambda im, level, sign: solarize_add(im, int(SOLARIZE_ADD * level)),
    "color": lambda im, level, sign: color(im, _enhance_factor(level, sign)),
    "contrast": lambda im, level, sign: contrast(im, _enhance_factor(level, sign)),
    "brightness": lambda im, level, sign: brightness(im, _enhance_factor(level, sign)),
    "sharpness": lambda im, level, sign: sharpness(im, _enhance_factor(level, sign)),
    "shear_x": lambda im, level, sign: shear_x(im, sign * SHEAR * level),
    "shear_y": lambda im, level, sign: shear_y(im, sign * SHEAR * level),
    "translate_x": lambda im, level, sign: translate_x(
        im, sign * TRANSLATE_FRACTION * level * _size(im, 1)
    ),
    "translate_y": lambda im, level, sign: translate_y(
        im, sign * TRANSLATE_FRACTION * level * _size(im, 0)
    ),
}


def _random_op(image: tf.Tensor, seed: tf.Tensor, level: float) -> tf.Tensor:
    """One op drawn uniformly from OPS, with a random sign."""
    op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    ops = list(OPS.values())
    op_index = tf.random.stateless_uniform([], op_seed, 0, len(ops), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    branches = [lambda op=op: op(image, level, sign) for op in ops]
    return tf.ensure_shape(tf.switch_case(op_index, branches), image.shape)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: int) -> tf.Tensor:
    """Applies `num_layers` ops drawn uniformly from OPS at `magnitude` (0..30); uint8 in/out."""
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(
            f"config.pp.randaugment_magnitude={magnitude} is outside 0..{MAX_MAGNITUDE}"
        )
    for layer in range(num_layers):
        layer_seed = tf.random.experimental.stateless_fold_in(seed, layer)
        image = _random_op(image, layer_seed, magnitude / FULL_MAGNITUDE)
    return image
