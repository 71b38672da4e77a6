"""`bench input`: how fast the input pipeline delivers, against the floors of its hardware.

`bench_input(config)` times, on the same examples (the first `batches` global batches
of training) and with the same tf.data parallelism and options:

  images_per_sec             the train pipeline: uint8 batches in host memory;
  device_images_per_sec      the same, then assembled as global arrays on the devices
                             with `prefetch_batches` transfers in flight, as the train
                             loop sees it (each batch waited for);
  eval_images_per_sec        the eval pipeline (centre crop) over as many training files,
                             in index order;
  floor_read_images_per_sec  read every file's bytes, nothing else (READ_REPEATS times over);
  floor_decode_images_per_sec  read and fully decode every file to RGB uint8 with
                             `tf.io.decode_jpeg`, yielding only the decoded shape;
  read_one_reader_per_sec    the read floor with one reader (`num_parallel_calls=1`):
                             `read_scaling` is the read floor over this, how the
                             reads scale with the host's cores (1.0: serialised, e.g.
                             on Python's GIL; the number of cores: perfectly).

Each figure is the median of `repeats` timed passes after `warmup` untimed ones
(which also bring the files into the page cache: this measures the CPU, not the
disk). A pass's clock stops at its last element, before the iterator is released (a
finished tf.data iterator can take a second to tear down). The passes go round-robin
over the measurements, and the ratios (`vs_floor_decode`, `device_vs_host`,
`read_scaling`) are medians of the ratios within each round, so a slow spell of a
shared machine falls on both sides of a ratio alike.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from imagenet_jax.bench.host import process_peak_rss_mb
from imagenet_jax.config import ConfigError
from imagenet_jax.data import input as data_input
from imagenet_jax.data import order, pipeline, synthetic
from imagenet_jax.data.feeding import make_global_batch, prefetch_to_device
from imagenet_jax.data.sources import Source
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.spec import parse_dataset
from imagenet_jax.train import recipe

FLOOR_BATCH = 256
READ_REPEATS = 8


def bench_input(config: ml_collections.ConfigDict, *, batches: int = 10, repeats: int = 3,
                warmup: int = 1) -> dict[str, Any]:
    """Measures the configured input pipeline and its floors; returns a flat dict."""
    if batches < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(f"bench input needs batches >= 1, repeats >= 1, warmup >= 0; got "
                          f"{batches}, {repeats}, {warmup}")
    source, derived = recipe.plan(config)
    if isinstance(source, synthetic.SyntheticSource):
        raise ConfigError("dataset 'synthetic' has no input pipeline to measure: it is made "
                          "on the devices; choose a folder:, tfds: or demo dataset")
    mesh = mesh_from_shape(derived.mesh_shape, derived.dcn_data)
    sharding = data_input.process_sharding(config.batch_size)
    spec = data_input.train_spec(config)
    examples = order.train_examples(source, sharding, config.seed)
    indices = np.array([i for _, i in examples.take(batches * sharding.local_batch_size)
                        .as_numpy_iterator()])
    num_images = len(indices)
    # Reads are ~10x cheaper than decodes: the read passes go over the examples
    # READ_REPEATS times, so that building and starting a pipeline is no large part of them.
    reads = np.tile(indices, READ_REPEATS)

    def train_host() -> Iterator[dict]:
        ds = pipeline.train_dataset(source, sharding, **dataclasses.asdict(spec))
        return ds.take(batches).as_numpy_iterator()

    def train_device() -> Iterator[dict]:
        return prefetch_to_device(train_host(), config.prefetch_batches,
                                  functools.partial(make_global_batch, mesh=mesh))

    def eval_host() -> Iterator[dict]:  # eval preprocessing, on training files: same count
        ds = pipeline.eval_dataset(source, sharding, split="train", image_size=config.image_size,
                                   crop_ratio=config.eval_crop_ratio)
        return ds.take(batches).as_numpy_iterator()

    measurements: dict[str, tuple[Callable[[], Iterator], int]] = {
        "images_per_sec": (train_host, num_images),
        "device_images_per_sec": (train_device, num_images),
        "eval_images_per_sec": (eval_host, sharding.local_batch_size * min(
            batches, order.num_eval_batches(source, "train", sharding.global_batch_size))),
        "floor_read_images_per_sec": (functools.partial(floor_dataset, source, reads,
                                                        read_only=True), len(reads)),
        "floor_decode_images_per_sec": (functools.partial(floor_dataset, source, indices,
                                                          read_only=False), num_images),
        "read_one_reader_per_sec": (functools.partial(floor_dataset, source, reads,
                                                      read_only=True, parallelism=1),
                                    len(reads)),
    }
    seconds = {name: [] for name in measurements}
    rss_mb = []
    for repeat in range(warmup + repeats):
        for name, (make, _) in measurements.items():
            elapsed = time_pass(make, block=name == "device_images_per_sec")
            if repeat >= warmup:
                seconds[name].append(elapsed)
        rss_mb.append(host_memory_mb()["host_rss_mb"])

    result = describe(config, source, sharding, indices, batches, repeats, warmup)
    for name, (_, count) in measurements.items():
        result[name] = count / float(np.median(seconds[name]))
    result["images_per_sec_runs"] = [num_images / s for s in seconds["images_per_sec"]]
    # Ratios are taken within each round, then the median: a slow spell of a shared
    # machine that spans a round slows both sides of its ratio alike.
    result.update(round_ratios(seconds, "images_per_sec", "floor_decode_images_per_sec",
                               "vs_floor_decode"))
    result.update(round_ratios(seconds, "device_images_per_sec", "images_per_sec",
                               "device_vs_host"))
    result.update(round_ratios(seconds, "floor_read_images_per_sec", "read_one_reader_per_sec",
                               "read_scaling"))
    result.update(host_memory_mb())
    result["host_rss_mb_after_each_round"] = rss_mb  # flat when memory is bounded
    return result


def round_ratios(seconds: dict[str, list[float]], numerator: str, denominator: str,
                 name: str) -> dict[str, Any]:
    """Rate `numerator` / rate `denominator` in each round (same images), and the median."""
    ratios = [d / n for n, d in zip(seconds[numerator], seconds[denominator], strict=True)]
    return {name: float(np.median(ratios)), f"{name}_runs": ratios}


def floor_dataset(source: Source, indices: np.ndarray, *, read_only: bool,
                  parallelism: int = tf.data.AUTOTUNE) -> Iterator:
    """The floors: the same examples read (and decoded whole), read the way the pipeline
    reads them (in batches when the source can), with the pipeline's options, by
    `parallelism` concurrent calls (tf.data's choice by default)."""
    def decode(image_bytes):
        image = tf.cond(tf.io.is_jpeg(image_bytes),
                        lambda: tf.io.decode_jpeg(image_bytes, channels=3),
                        lambda: tf.io.decode_image(image_bytes, channels=3,
                                                   expand_animations=False))
        return tf.shape(image)

    finish = tf.strings.length if read_only else decode
    ds = tf.data.Dataset.from_tensor_slices(indices)
    if read_batch := pipeline.batch_reader(source, "train"):
        ds = ds.batch(pipeline.READ_BATCH).map(lambda i: read_batch(i)[0],
                                               num_parallel_calls=parallelism).unbatch()
        ds = ds.map(finish, num_parallel_calls=parallelism)
    else:  # one map, as the pipeline reads and decodes in one map
        read = source.read("train")
        ds = ds.map(lambda i: finish(read(i)[0]), num_parallel_calls=parallelism)
    # Batched, as the pipeline's output is: one Python step per image (~0.1 ms) would be
    # the floor measured instead of the reads.
    ds = ds.batch(FLOOR_BATCH).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(pipeline.dataset_options()).as_numpy_iterator()


def time_pass(make: Callable[[], Iterator], *, block: bool,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds from building the iterator to its last element (waited for, if `block`).

    The clock stops at the last element, not when the iterator says it is done: a
    wrapping generator (`prefetch_to_device`) releases the tf.data iterator it drains
    inside its own last step, and that tear-down (about a second at times) is no part of
    delivering images. The iterator is then released, outside the clock.
    """
    start = clock()
    end = start
    iterator, item = make(), None
    for item in iterator:
        if block:
            jax.block_until_ready(item)
        end = clock()
    # Tear-down (tf.data's threads, device buffers) now rather than at a later garbage
    # collection inside another pass's window.
    del iterator, item
    gc.collect()
    return end - start


def describe(config: ml_collections.ConfigDict, source: Source, sharding: order.Sharding,
             indices: np.ndarray, batches: int, repeats: int, warmup: int) -> dict[str, Any]:
    return {
        "dataset": config.dataset,
        "source": parse_dataset(config.dataset)[0],  # what was read: folder, tfds or demo
        "read_processes": getattr(source, "read_processes", 0),  # TFDS's reader processes
        "image_size": config.image_size,
        "global_batch_size": sharding.global_batch_size,
        "processes": sharding.process_count,
        "images_per_pass": len(indices),
        "distinct_images": len(np.unique(indices)),
        "mean_file_kb": mean_file_kb(source, indices[:200]),
        "batches": batches,
        "repeats": repeats,
        "warmup": warmup,
        "host_cpus": os.cpu_count(),
        "tensorflow_version": tf.__version__,
    }


def mean_file_kb(source: Source, indices: np.ndarray) -> float:
    read = source.read("train")
    sizes = [int(tf.strings.length(read(tf.constant(i, tf.int64))[0])) for i in indices]
    return float(np.mean(sizes)) / 1e3


def host_memory_mb() -> dict[str, float]:
    """Resident memory now (after every pass: steady state) and the process's peak."""
    peak_mb = process_peak_rss_mb()
    try:
        with open("/proc/self/statm") as statm:
            rss_mb = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is all there is
        rss_mb = peak_mb
    return {"host_rss_mb": rss_mb, "host_peak_rss_mb": peak_mb}
