"""Per-image ops: encoded bytes in, uint8 HxWx3 out. Normalisation happens on the device.

Randomness is stateless: every op takes an explicit seed, so an image's crop and
flip depend only on (run seed, epoch, example index). That makes the pipeline a
pure function of the training step, which is what lets a resumed run see exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import tensorflow as tf


def image_shape(image_bytes: tf.Tensor) -> tf.Tensor:
    """[height, width, channels] of an encoded image, without decoding it if it is a JPEG."""
    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.extract_jpeg_shape(image_bytes),
        lambda: tf.shape(_decode_any(image_bytes), out_type=tf.int32),
    )


def decode_and_crop(image_bytes: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """Decodes only `window` = [y, x, height, width] of the image, as RGB uint8.

    JPEGs (nearly all of ImageNet) skip decoding the pixels outside the window.
    Other formats (ImageNet holds a PNG named .JPEG) are decoded whole, then cropped.
    """
    def jpeg():
        return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other():
        image = _decode_any(image_bytes)
        return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]

    return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def _decode_any(image_bytes: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


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
    resized = tf.image.resize(image, [size, size], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def train_image(image_bytes: tf.Tensor, seed: tf.Tensor, size: int,
                scale: tuple[float, float], ratio: tuple[float, float]) -> tf.Tensor:
    """Random-resized crop (decoding only the crop), resize to `size`, random flip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = random_crop_window(image_shape(image_bytes), crop_seed, scale, ratio)
    image = resize_uint8(decode_and_crop(image_bytes, window), size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def eval_image(image_bytes: tf.Tensor, size: int, crop_ratio: float) -> tf.Tensor:
    """Central crop of `crop_ratio` of the short side, resized to `size`."""
    window = center_crop_window(image_shape(image_bytes), crop_ratio)
    return resize_uint8(decode_and_crop(image_bytes, window), size)
