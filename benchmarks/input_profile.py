"""Where the input pipeline's time goes: per-image cost of each stage, one thread.

Each variant adds one stage to the one before, on the same files, in a tf.data map
with no parallelism (so a variant's time is its CPU cost per image) and the
pipeline's options; passes go round-robin over the variants and each figure is the
median of the timed passes. BENCHMARKS.md explains the input figures with it.

  python benchmarks/input_profile.py --root /tmp/photos [--size 224] [--passes 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from imagenet_jax.data import pipeline, preprocess
from imagenet_jax.data.sources import open_folder


def half_scale_decode(image_bytes: tf.Tensor, window: tf.Tensor, size: int) -> tf.Tensor:
    """The decoder's half-scale inverse DCT when both crop sides are >= 2 x size."""
    return tf.cond(
        tf.minimum(window[2], window[3]) >= 2 * size,
        lambda: tf.io.decode_and_crop_jpeg(image_bytes, window // 2, channels=3, ratio=2),
        lambda: tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3))


def variants(paths: tf.Tensor, size: int) -> dict:
    def window(index, image_bytes):
        seed = tf.stack([tf.constant(0, tf.int64), tf.cast(index, tf.int64)])
        return preprocess.random_crop_window(tf.io.extract_jpeg_shape(image_bytes), seed,
                                             (0.08, 1.0), (3 / 4, 4 / 3))

    def read(index):
        return tf.io.read_file(paths[index])

    def pixel(image):  # depends on every stage, costs nothing
        return image[0, 0]

    return {
        "read file": lambda i: tf.strings.length(read(i)),
        "decode whole (the floor)": lambda i: tf.shape(tf.io.decode_jpeg(read(i), channels=3)),
        "+ crop window": lambda i: (lambda b: window(i, b))(read(i)),
        "decode crop only": lambda i: (lambda b: pixel(tf.io.decode_and_crop_jpeg(
            b, window(i, b), channels=3)))(read(i)),
        "decode crop, half scale if >= 2x (not done)": lambda i: (lambda b: pixel(
            half_scale_decode(b, window(i, b), size)))(read(i)),
        f"+ resize to {size} (float)": lambda i: (lambda b: pixel(tf.image.resize(
            preprocess.decode_and_crop(b, window(i, b)), [size, size])))(read(i)),
        "+ round to uint8 (the pipeline)": lambda i: (lambda b: pixel(preprocess.resize_uint8(
            preprocess.decode_and_crop(b, window(i, b)), size)))(read(i)),
        "+ flip on the host (not done)": lambda i: (lambda b: pixel(tf.reverse(
            preprocess.resize_uint8(preprocess.decode_and_crop(b, window(i, b)), size),
            [1])))(read(i)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    pipeline.set_up_host()
    files = open_folder(args.root).files["train"][:args.images]
    paths = tf.constant(files)
    datasets = {name: tf.data.Dataset.range(len(files)).map(fn).with_options(
        pipeline.dataset_options()) for name, fn in variants(paths, args.size).items()}
    times = {name: [] for name in datasets}
    for repeat in range(args.passes + 1):
        for name, ds in datasets.items():
            start = time.perf_counter()
            for _ in ds:
                pass
            if repeat:  # the first pass warms up
                times[name].append((time.perf_counter() - start) / len(files) * 1e3)
    floor = np.median(times["decode whole (the floor)"])
    print(f"{len(files)} images from {args.root}, output {args.size}, {args.passes} passes, "
          "one thread")
    print(f"{'stage':36s} {'ms/image':>9s} {'p10-p90':>13s} {'floor/this':>10s}")
    for name, values in times.items():
        median, p10, p90 = np.percentile(values, [50, 10, 90])
        print(f"{name:36s} {median:9.3f} {p10:6.3f}-{p90:<6.3f} {floor / median:10.2f}")


if __name__ == "__main__":
    main()
