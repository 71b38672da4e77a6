"""Per-image ops: encoded bytes in, uint8 HxWx3 out. Flips and normalisation happen on the device.

Randomness is stateless: every op takes an explicit seed, so an image's crop and
flip depend only on (run seed, epoch, example index). That makes the pipeline a
pure function of the training step, which is what lets a resumed run see exactly
the batches an uninterrupted one would.

The host is usually the scarce resource, so it does only what must happen per image
before batching: decode (only the crop's pixels) and resize, with no branch. The flip
is a bit per example that the device applies to the whole batch.
"""

from __future__ import annotations

import tensorflow as tf


def image_shape(image_bytes: tf.Tensor) -> tf.Tensor:
    """[height, width, channels] of a JPEG, read from its header without decoding it."""
    return tf.io.extract_jpeg_shape(image_bytes)


def decode_and_crop(image_bytes: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """Decodes only `window` = [y, x, height, width] of a JPEG, as RGB uint8.

    The decoder skips the pixels outside the window (and stops after its last row).
    CMYK and grayscale JPEGs decode to RGB. Other formats are not handled here: the
    pipeline converts the rare non-JPEG file to JPEG once, when it first meets it
    (`to_jpeg`), so the path every image takes has no format branch.

    No reduced-scale decoding (the decoder's 1/2, 1/4, 1/8 inverse DCT): it saves little,
    since entropy decoding dominates at ImageNet's bit rates, and it makes large training
    crops smoother than evaluation's bilinear resize, a train/eval mismatch that costs
    accuracy at small resolutions (BENCHMARKS.md, "bench input on 2 CPU cores").
    """
    return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)


def to_jpeg(image_bytes: tf.Tensor) -> tf.Tensor:
    """Any image TensorFlow decodes (PNG, GIF, BMP, JPEG) re-encoded as an RGB JPEG at
    quality 95, as TFDS does for ImageNet's one PNG and its CMYK files. Raises
    tf.errors.OpError for bytes that are no image."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return tf.io.encode_jpeg(image, quality=95, chroma_downsampling=False)


def random_crop_window(shape: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> tf.Tensor:
    """Inception-style random-resized-crop window [y, x, h, w]: area fraction in `scale`,
    aspect ratio in `ratio`; the whole image when no window fits in 10 tries."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=scale[0],
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(shape: tf.Tensor, crop_ratio: float) -> tf.Tensor:
    """A centred square of side `crop_ratio` x the short side: resizing it to S equals
    resizing the short side to S / crop_ratio and taking the central S x S."""
    height, width = shape[0], shape[1]
    side = tf.cast(crop_ratio * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    side = tf.maximum(side, 1)
    return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def resize_uint8(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize to size x size, rounded to uint8. Bilinear weights are a convex
    combination, so the result is already in [0, 255]: no clipping pass."""
    resized = tf.image.resize(image, [size, size], method="bilinear")
    return tf.cast(resized + 0.5, tf.uint8)


def train_image(image_bytes: tf.Tensor, seed: tf.Tensor, size: int,
                scale: tuple[float, float], ratio: tuple[float, float]
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """Random-resized crop (decoding only the crop), resized to `size`; and whether the
    device should flip it left-right (probability 1/2)."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = random_crop_window(image_shape(image_bytes), crop_seed, scale, ratio)
    image = resize_uint8(decode_and_crop(image_bytes, window), size)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    return image, flip


def eval_image(image_bytes: tf.Tensor, size: int, crop_ratio: float) -> tf.Tensor:
    """Central crop of `crop_ratio` of the short side, resized to `size`."""
    window = center_crop_window(image_shape(image_bytes), crop_ratio)
    return resize_uint8(decode_and_crop(image_bytes, window), size)
