"""RandAugment (Cubuk et al. 2019, arXiv:1909.13719): graph-mode TensorFlow ops on one uint8 image.

`num_layers` ops are drawn uniformly, with replacement, from the paper's 14 (`OPS`); each is applied
at magnitude M on the paper's 0..30 scale, mapped linearly (timm's convention): an op reaches the
AutoAugment maximum at M = 10 and extrapolates beyond it. Signed ops (rotate, shear, translate, and
the enhance factors' deviation from 1) take a random sign, so M = 0 makes every op but AutoContrast
and Equalize the identity. All randomness comes from a stateless seed, as in `preprocess`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

from imagenet_jax.spec import MAX_RANDAUGMENT_MAGNITUDE

FILL_VALUE = 128  # what the geometric ops bring in at the borders
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.45  # of the image side along the translated axis
MAX_ENHANCE_DEVIATION = 0.9  # enhance factors 1 +/- 0.9 at M = 10
MIN_ENHANCE_FACTOR = 0.1  # the M = 10 floor: larger M never blanks or greys out the image
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert("L")

Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


def identity(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    del fraction, sign  # every op takes the same arguments, so tf.switch_case can pick any
    return image


def auto_contrast(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Stretches each channel's [min, max] to [0, 255] (PIL's ImageOps.autocontrast, cutoff 0):
    floor((x - lo) * 255 / (hi - lo)); a channel with hi == lo is left as it is."""
    del fraction, sign
    pixels = tf.cast(image, tf.float32)
    low = tf.reduce_min(pixels, axis=[0, 1])
    high = tf.reduce_max(pixels, axis=[0, 1])
    flat = high <= low
    low = tf.where(flat, 0.0, low)
    scale = tf.where(flat, 1.0, 255.0 / tf.maximum(high - low, 1.0))
    # A non-integer quotient is at least 1 / 255 below the next integer and float32 errs by
    # ~1e-5, so adding 1e-3 before truncating gives the exact floor (PIL's own floating point
    # can land one level lower). bias_add, not `-`: broadcasting a [3] vector is slower.
    return tf.cast(tf.nn.bias_add(pixels, -low) * scale + 1e-3, tf.uint8)


def equalize(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Per-channel histogram equalisation with PIL's ImageOps.equalize lookup table.

    For each channel, step = (pixels not in the top occupied bin) // 255 and value v maps to
    (step // 2 + pixels below v) // step; a channel with step 0 is left as it is.
    """
    del fraction, sign
    # Channel c's value v is bin 256 c + v, so one bincount gives all three histograms.
    bins = tf.nn.bias_add(tf.cast(image, tf.int32), tf.range(3) * 256)
    histograms = tf.reshape(tf.math.bincount(tf.reshape(bins, [-1]), minlength=768,
                                             maxlength=768), [3, 256])
    top_bin = tf.reduce_max(tf.cast(image, tf.int32), axis=[0, 1])
    top_count = tf.gather(histograms, top_bin, batch_dims=1)
    step = (tf.reduce_sum(histograms, axis=1) - top_count) // 255
    below = tf.cumsum(histograms, axis=1, exclusive=True)
    lut = (step[:, None] // 2 + below) // tf.maximum(step[:, None], 1)
    lut = tf.where(step[:, None] > 0, tf.minimum(lut, 255), tf.range(256)[None, :])
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), bins), tf.uint8)


def solarize(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Inverts every value at or above 256 - 256 * fraction: none at M = 0, all from M = 10."""
    del sign
    threshold = 256.0 - 256.0 * fraction
    return tf.where(tf.cast(image, tf.float32) < threshold, image, 255 - image)


def posterize(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Keeps 8 - floor(4 * fraction) high bits: 8 at M = 0, 4 at M = 10, never fewer than 1."""
    del sign
    bits = tf.clip_by_value(8 - tf.cast(tf.floor(4.0 * fraction), tf.int32), 1, 8)
    dropped = tf.cast(8 - bits, tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, dropped), dropped)


def _enhance_factor(fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    return tf.maximum(1.0 + sign * MAX_ENHANCE_DEVIATION * fraction, MIN_ENHANCE_FACTOR)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), rounded (PIL truncates)
    and clipped, so factor 1 is the image and factor 0 the degenerate image."""
    image = tf.cast(image, tf.float32)
    blended = degenerate + factor * (image - degenerate)
    return tf.cast(tf.clip_by_value(tf.round(blended), 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor, channels: int = 1) -> tf.Tensor:
    """[H, W, channels] float luma rounded to whole levels, as PIL's convert("L")."""
    weights = tf.tile(tf.constant(GRAY_WEIGHTS)[:, None], [1, channels])
    # A matmul makes all `channels` copies at once; broadcasting one channel later is slower.
    luma = tf.matmul(tf.reshape(tf.cast(image, tf.float32), [-1, 3]), weights)
    return tf.reshape(tf.round(luma), tf.concat([tf.shape(image)[:2], [channels]], axis=0))


def color(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Saturation: blends with the image's grayscale version."""
    return _blend(_grayscale(image, channels=3), image, _enhance_factor(fraction, sign))


def contrast(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Blends with a flat image at the rounded mean luma."""
    mean_luma = tf.round(tf.reduce_mean(_grayscale(image)))
    return _blend(mean_luma, image, _enhance_factor(fraction, sign))


def brightness(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Blends with black, i.e. scales every value."""
    return _blend(tf.zeros([], tf.float32), image, _enhance_factor(fraction, sign))


def sharpness(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Blends with PIL's SMOOTH filter (3x3, centre weight 5, others 1, over 13); like PIL, the
    one-pixel border of the smoothed image is the original, so the border never changes."""
    pixels = tf.cast(image, tf.float32)
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(pixels[None], kernel, [1, 1, 1, 1], "VALID")[0]
    # The border's change is padded with zeros: cheaper than a tf.where over the whole image.
    degenerate = pixels + tf.pad(tf.round(smooth) - pixels[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])
    return _blend(degenerate, image, _enhance_factor(fraction, sign))


def _project(image: tf.Tensor, row: list[tf.Tensor]) -> tf.Tensor:
    """Applies the 8-number projective transform `row`, which maps each output pixel (x, y) to
    the input pixel it reads; nearest neighbour (exact values, the cheapest), FILL_VALUE outside."""
    transform = tf.cast(tf.stack(row), tf.float32)[None]
    projected = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
        fill_value=tf.constant(FILL_VALUE, tf.float32), interpolation="NEAREST",
        fill_mode="CONSTANT")[0]
    return tf.ensure_shape(projected, image.shape)


def _center(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(x, y) of the image centre in pixel coordinates (pixel centres at integers)."""
    height_width = tf.cast(tf.shape(image)[:2], tf.float32)
    return (height_width[1] - 1.0) / 2.0, (height_width[0] - 1.0) / 2.0


def rotate(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Rotates about the centre by sign * 30 * fraction degrees, counter-clockwise as displayed."""
    radians = sign * MAX_ROTATE_DEGREES * fraction * (math.pi / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    center_x, center_y = _center(image)
    zero = tf.zeros([])
    return _project(image, [cos, -sin, center_x - cos * center_x + sin * center_y,
                            sin, cos, center_y - sin * center_x - cos * center_y, zero, zero])


def shear_x(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Shifts each row by shear * (its distance from the centre row), shear = sign * 0.3 * fraction.

    About the centre rather than PIL's top-left corner, so both sides lose the same amount."""
    shear = sign * MAX_SHEAR * fraction
    _, center_y = _center(image)
    zero, one = tf.zeros([]), tf.ones([])
    return _project(image, [one, shear, -shear * center_y, zero, one, zero, zero, zero])


def shear_y(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """shear_x with rows and columns swapped."""
    shear = sign * MAX_SHEAR * fraction
    center_x, _ = _center(image)
    zero, one = tf.zeros([]), tf.ones([])
    return _project(image, [one, zero, zero, shear, one, -shear * center_x, zero, zero])


def _shift(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor, axis: int) -> tf.Tensor:
    """Whole pixels (rounded) along `axis` (0 rows, 1 columns) that a translation moves content."""
    side = tf.cast(tf.shape(image)[axis], tf.float32)
    return tf.round(sign * MAX_TRANSLATE * fraction * side)


def translate_x(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Moves content right by round(sign * 0.45 * fraction * width) pixels."""
    zero, one = tf.zeros([]), tf.ones([])
    shift = _shift(image, fraction, sign, axis=1)
    return _project(image, [one, zero, -shift, zero, one, zero, zero, zero])


def translate_y(image: tf.Tensor, fraction: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """Moves content down by round(sign * 0.45 * fraction * height) pixels."""
    zero, one = tf.zeros([]), tf.ones([])
    shift = _shift(image, fraction, sign, axis=0)
    return _project(image, [one, zero, zero, zero, one, -shift, zero, zero])


# The paper's 14 ops in its order; the order fixes which op a seed draws.
OPS: dict[str, Op] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Rotate": rotate,
    "Solarize": solarize,
    "Color": color,
    "Posterize": posterize,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
}


def _apply_random_op(image: tf.Tensor, seed: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    """One uniformly drawn op of OPS, with a random sign, at `fraction` of its M = 10 range."""
    op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    index = tf.random.stateless_uniform([], op_seed, minval=0, maxval=len(OPS), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    branches = [lambda op=op: op(image, fraction, sign) for op in OPS.values()]
    return tf.ensure_shape(tf.switch_case(index, branches), image.shape)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: float
                ) -> tf.Tensor:
    """uint8 [H, W, 3] (H, W >= 3) -> uint8 [H, W, 3]: `num_layers` random ops at `magnitude`.

    `seed` is an int32/int64 [2] stateless seed; the same seed gives the same bytes.
    """
    if num_layers < 0 or not 0.0 <= magnitude <= MAX_RANDAUGMENT_MAGNITUDE:
        raise ValueError(f"randaugment needs num_layers >= 0 and magnitude in [0, 30]; "
                         f"got num_layers={num_layers}, magnitude={magnitude}")
    image = tf.convert_to_tensor(image)
    fraction = tf.constant(magnitude / 10.0, tf.float32)
    if num_layers == 0:
        return image
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
        image = _apply_random_op(image, layer_seed, fraction)
    return image

