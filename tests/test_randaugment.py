"""RandAugment: determinism, shapes, identity at M = 0, and ops against PIL / numpy references."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from imagenet_jax.data.randaugment import OPS, randaugment
from imagenet_jax.spec import parse_randaugment

# Ops that depend only on the image's own statistics, not on the magnitude.
UNSIGNED_STATISTIC_OPS = {"AutoContrast", "Equalize"}


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients, stripes and noise that do not cover the full 0..255 range, so every op
    (autocontrast included) changes something."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = np.random.default_rng(seed).normal(0.0, 12.0, (height, width, 3))
    channels = np.stack([40 + 3 * x + 2 * y,
                         120 + 60 * np.sin(x / 2.5) * np.cos(y / 4.0),
                         30 + (x * y) % 150], axis=-1)
    return np.clip(channels + noise, 20, 230).astype(np.uint8)


def apply(name: str, image: np.ndarray, fraction: float, sign: float = 1.0) -> np.ndarray:
    return OPS[name](tf.constant(image), tf.constant(fraction), tf.constant(sign)).numpy()


def augment_in_dataset(image: np.ndarray, seeds: np.ndarray, num_layers: int, magnitude: float
                       ) -> list[np.ndarray]:
    """randaugment of `image` with each of `seeds`, in a parallel, non-deterministic-order
    tf.data map; returned in the order of `seeds`."""
    dataset = tf.data.Dataset.from_tensor_slices(seeds).enumerate().map(
        lambda index, seed: (index, randaugment(tf.constant(image), seed, num_layers, magnitude)),
        num_parallel_calls=4, deterministic=False)
    outputs = dict(dataset.as_numpy_iterator())
    return [outputs[index] for index in range(len(seeds))]


def test_same_seed_same_bytes_eagerly_and_in_tf_data():
    image = textured(40, 40)
    seeds = np.stack([np.full(12, 7), np.arange(12)], axis=1).astype(np.int64)
    in_dataset = augment_in_dataset(image, seeds, num_layers=2, magnitude=9.0)
    again = augment_in_dataset(image, seeds, num_layers=2, magnitude=9.0)
    for seed, first, second in zip(seeds, in_dataset, again, strict=True):
        eager = randaugment(tf.constant(image), tf.constant(seed), 2, 9.0).numpy()
        assert eager.tobytes() == first.tobytes() == second.tobytes()
    int32_seed = randaugment(tf.constant(image), tf.constant(seeds[3].astype(np.int32)), 2, 9.0)
    assert int32_seed.dtype == tf.uint8 and int32_seed.shape == image.shape


def test_different_seeds_give_different_images():
    image = textured(32, 32)
    seeds = np.stack([np.zeros(10), np.arange(10)], axis=1).astype(np.int64)
    outputs = augment_in_dataset(image, seeds, num_layers=2, magnitude=9.0)
    distinct = {output.tobytes() for output in outputs}
    assert len(distinct) >= 8  # two seeds draw the same ops and signs with probability ~1/800
    assert sum(not np.array_equal(output, image) for output in outputs) >= 9


def test_each_layer_is_one_of_the_ops_and_all_ops_are_drawn():
    image = textured(32, 32, seed=1)
    candidates = {(name, sign): apply(name, image, 0.9, sign).tobytes()
                  for name in OPS for sign in (-1.0, 1.0)}
    by_bytes = {}
    for key, output in candidates.items():
        by_bytes.setdefault(output, set()).add(key[0])
    assert len(by_bytes) >= len(OPS)  # every op is told apart from the others on this image
    seeds = np.stack([np.full(300, 11), np.arange(300)], axis=1).astype(np.int64)
    drawn = set()
    for output in augment_in_dataset(image, seeds, num_layers=1, magnitude=9.0):
        assert output.tobytes() in by_bytes
        drawn |= by_bytes[output.tobytes()]
    assert drawn == set(OPS)


@pytest.mark.parametrize("height, width", [(32, 48), (45, 33)])
def test_shape_and_dtype_kept_for_non_square_and_unknown_shapes(height, width):
    image = textured(height, width)
    for name in OPS:
        output = apply(name, image, 1.3, -1.0)
        assert output.dtype == np.uint8 and output.shape == image.shape, name

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def augment(dynamic_image):
        output = randaugment(dynamic_image, tf.constant([1, 2]), 3, 15.0)
        assert output.shape.as_list() == [None, None, 3]  # static shape kept in the graph
        return output

    output = augment(tf.constant(image))
    assert output.dtype == tf.uint8 and output.shape == image.shape


@pytest.mark.parametrize("name", sorted(set(OPS) - UNSIGNED_STATISTIC_OPS))
def test_magnitude_zero_is_identity_and_magnitude_ten_is_not(name):
    image = textured(32, 40)
    for sign in (-1.0, 1.0):
        np.testing.assert_array_equal(apply(name, image, 0.0, sign), image)
        if name != "Identity":
            assert not np.array_equal(apply(name, image, 1.0, sign), image)


def test_randaugment_at_magnitude_zero_only_autocontrasts_or_equalizes():
    image = textured(32, 32)
    allowed = {image.tobytes()}
    for first in UNSIGNED_STATISTIC_OPS:
        once = apply(first, image, 0.0)
        allowed.add(once.tobytes())
        allowed |= {apply(second, once, 0.0).tobytes() for second in UNSIGNED_STATISTIC_OPS}
    seeds = np.stack([np.full(40, 5), np.arange(40)], axis=1).astype(np.int64)
    outputs = augment_in_dataset(image, seeds, num_layers=2, magnitude=0.0)
    assert all(output.tobytes() in allowed for output in outputs)
    assert any(not np.array_equal(output, image) for output in outputs)


@pytest.mark.parametrize("fraction, threshold", [(0.25, 192), (0.5, 128), (1.0, 0), (2.0, 0)])
def test_solarize_inverts_values_at_or_above_the_threshold(fraction, threshold):
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    expected = np.where(image < threshold, image, 255 - image)
    np.testing.assert_array_equal(apply("Solarize", image, fraction), expected)


@pytest.mark.parametrize("fraction, bits", [(0.3, 7), (0.5, 6), (1.0, 4), (1.9, 1), (3.0, 1)])
def test_posterize_matches_pil(fraction, bits):
    image = textured(32, 32)
    expected = np.asarray(ImageOps.posterize(Image.fromarray(image), bits))
    np.testing.assert_array_equal(apply("Posterize", image, fraction), expected)


def test_autocontrast_matches_pil():
    image = textured(36, 44)
    expected = np.asarray(ImageOps.autocontrast(Image.fromarray(image)))
    output = apply("AutoContrast", image, 1.0)
    # PIL computes (x - lo) * 255 / (hi - lo) in floating point and truncates, so it may fall
    # one level short where the exact quotient is an integer; ours is the exact floor.
    assert np.abs(output.astype(int) - expected).max() <= 1
    assert (output == expected).mean() > 0.99
    assert output.min() == 0 and output.max() == 255
    flat = np.full((32, 32, 3), 77, np.uint8)  # hi == lo: left as it is, as PIL does
    np.testing.assert_array_equal(apply("AutoContrast", flat, 1.0), flat)


@pytest.mark.parametrize("image", [textured(40, 36),
                                   np.random.default_rng(3).integers(0, 256, (32, 32, 3),
                                                                     dtype=np.uint8),
                                   np.full((32, 32, 3), 9, np.uint8)],
                         ids=["textured", "noise", "flat"])
def test_equalize_matches_pil_exactly(image):
    # Same integer lookup table as PIL's, so no tolerance is needed.
    expected = np.asarray(ImageOps.equalize(Image.fromarray(image)))
    np.testing.assert_array_equal(apply("Equalize", image, 1.0), expected)


@pytest.mark.parametrize("name, enhancer", [("Brightness", ImageEnhance.Brightness),
                                            ("Contrast", ImageEnhance.Contrast),
                                            ("Color", ImageEnhance.Color),
                                            ("Sharpness", ImageEnhance.Sharpness)])
@pytest.mark.parametrize("fraction, sign", [(0.7, 1.0), (0.7, -1.0), (1.0, -1.0)])
def test_enhance_ops_match_pil_within_one_level(name, enhancer, fraction, sign):
    image = textured(34, 42)
    factor = 1.0 + sign * 0.9 * fraction
    expected = np.asarray(enhancer(Image.fromarray(image)).enhance(factor)).astype(int)
    output = apply(name, image, fraction, sign).astype(int)
    # PIL truncates the blended value towards zero; we round it: at most one level apart.
    assert np.abs(output - expected).max() <= 1
    assert np.abs(output - image).max() >= 10  # and the op did change the image


def test_brightness_rounds_the_scaled_value():
    image = textured(32, 32)
    factor = np.float32(1.0 + 0.9 * 0.7)
    expected = np.clip(np.round(image.astype(np.float32) * factor), 0, 255)
    np.testing.assert_array_equal(apply("Brightness", image, 0.7, 1.0), expected)


def test_rotate_by_ninety_degrees_is_np_rot90():
    image = textured(36, 36)
    # 30 degrees at M = 10, so fraction 3 is 90 degrees; positive is counter-clockwise.
    np.testing.assert_array_equal(apply("Rotate", image, 3.0, 1.0), np.rot90(image, k=1))
    np.testing.assert_array_equal(apply("Rotate", image, 3.0, -1.0), np.rot90(image, k=-1))


def test_rotate_fills_corners_with_128():
    image = textured(33, 33)
    output = apply("Rotate", image, 1.5, 1.0)  # 45 degrees
    assert (output[0, 0] == 128).all() and (output[-1, -1] == 128).all()
    np.testing.assert_array_equal(output[16, 16], image[16, 16])  # the centre stays


def test_translate_shifts_by_whole_pixels_with_128_fill():
    image = textured(40, 30)
    fraction = 0.5  # 0.45 * 0.5 = 22.5% of the side: round(6.75) = 7 columns, 9 rows
    right = apply("TranslateX", image, fraction, 1.0)
    np.testing.assert_array_equal(right[:, 7:], image[:, :-7])
    assert (right[:, :7] == 128).all()
    left = apply("TranslateX", image, fraction, -1.0)
    np.testing.assert_array_equal(left[:, :-7], image[:, 7:])
    assert (left[:, -7:] == 128).all()
    down = apply("TranslateY", image, fraction, 1.0)
    np.testing.assert_array_equal(down[9:], image[:-9])
    assert (down[:9] == 128).all()
    up = apply("TranslateY", image, fraction, -1.0)
    np.testing.assert_array_equal(up[:-9], image[9:])
    assert (up[-9:] == 128).all()


def test_shear_keeps_the_centre_line_and_moves_the_edges():
    image = textured(33, 35)
    sheared_x = apply("ShearX", image, 1.0, 1.0)  # rows shift by 0.3 * (distance from row 16)
    np.testing.assert_array_equal(sheared_x[16], image[16])
    np.testing.assert_array_equal(sheared_x[0, 5:], image[0, :-5])  # reads x - 0.3 * 16 = x - 4.8
    sheared_y = apply("ShearY", image, 1.0, 1.0)
    np.testing.assert_array_equal(sheared_y[:, 17], image[:, 17])
    assert not np.array_equal(sheared_y[:, 0], image[:, 0])


@pytest.mark.parametrize("spec, expected", [("2,9", (2, 9.0)), ("1,0", (1, 0.0)),
                                            (" 3 , 10.5 ", (3, 10.5)), ("4,30", (4, 30.0)),
                                            ("", None), ("  ", None)])
def test_parse_randaugment_accepts(spec, expected):
    assert parse_randaugment(spec) == expected


@pytest.mark.parametrize("spec, message", [("2", r"'2'.*expected 'N,M'"),
                                           ("2,9,1", r"expected 'N,M'"),
                                           ("a,b", r"N='a' is not an integer"),
                                           ("2.5,9", r"N='2.5' is not an integer"),
                                           ("2,x", r"M='x' is not a number"),
                                           ("0,9", r"N=0 is below 1"),
                                           ("2,31", r"M=31 is outside \[0, 30\]"),
                                           ("2,-1", r"M=-1 is outside"),
                                           ("2,nan", r"M=nan is outside")])
def test_parse_randaugment_rejects_with_the_expected_form(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_randaugment(spec)
    assert "e.g. '2,9'" in str(error.value)


def test_randaugment_rejects_out_of_range_arguments():
    image = tf.constant(textured(32, 32))
    with pytest.raises(ValueError, match=r"magnitude=31"):
        randaugment(image, tf.constant([0, 1]), 2, 31.0)
    with pytest.raises(ValueError, match=r"num_layers=-1"):
        randaugment(image, tf.constant([0, 1]), -1, 9.0)
