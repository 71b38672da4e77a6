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

With `config.data_service` (data/service.py) also:

  service_images_per_sec     the train batches made by the service's workers, put in
                             order by the client (`service_vs_host`: over the in-process
                             pipeline's rate, round by round);
  service_one_worker_images_per_sec  local:N with N > 1: the same from one worker on the
                             first worker's share of the cores (`service_worker_scaling`:
                             N workers over one);
  service_bytes_per_sec      what crossed the service to the client;
  *_client_cpu_ms_per_image  this process's CPU time per image (the client's, for the
                             service: what the trainer's host still spends on input).

Each figure is the median of `repeats` timed passes after `warmup` untimed ones
(which also bring the files into the page cache: this measures the CPU, not the
disk). A pass's clock stops at its last element, before the iterator is released (a
finished tf.data iterator can take a second to tear down). The passes go round-robin
over the measurements, and the ratios (`vs_floor_decode`, `device_vs_host`,
`read_scaling`) are medians of the ratios within each round, so a slow spell of a
shared machine falls on both sides of a ratio alike.
"""

from __future__ import annotations

import contextlib
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
from imagenet_jax.data import loader, order, pipeline, service, synthetic
from imagenet_jax.data.feeding import make_global_batch, prefetch_to_device
from imagenet_jax.data.sources import Source
from imagenet_jax.errors import ConfigError
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.spec import parse_data_service, parse_dataset
from imagenet_jax.train import assemble

FLOOR_BATCH = 256
READ_REPEATS = 8


def bench_input(config: ml_collections.ConfigDict, *, batches: int = 10, repeats: int = 3,
                warmup: int = 1) -> dict[str, Any]:
    """Measures the configured input pipeline and its floors; returns a flat dict."""
    if batches < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(f"bench input needs batches >= 1, repeats >= 1, warmup >= 0; got "
                          f"{batches}, {repeats}, {warmup}")
    source, derived = assemble.plan(config)
    if isinstance(source, synthetic.SyntheticSource):
        raise ConfigError("dataset 'synthetic' has no input pipeline to measure: it is made "
                          "on the devices; choose a folder:, tfds: or demo dataset")
    mesh = mesh_from_shape(derived.mesh_shape, derived.dcn_data)
    batch_slice = loader.process_batch_slice(config.batch_size)
    spec = loader.train_spec(config)
    examples = order.train_examples(source, batch_slice, config.seed)
    indices = np.array([i for _, i in examples.take(batches * batch_slice.local_batch_size)
                        .as_numpy_iterator()])
    num_images = len(indices)
    # Reads cost far less than decodes: the read passes go over the examples READ_REPEATS
    # times, so that building and starting a pipeline is no large part of them.
    reads = np.tile(indices, READ_REPEATS)

    def train_host() -> Iterator[dict]:
        ds = pipeline.train_dataset(source, batch_slice, spec)
        return ds.take(batches).as_numpy_iterator()

    def train_device() -> Iterator[dict]:
        return prefetch_to_device(train_host(), config.prefetch_batches,
                                  functools.partial(make_global_batch, mesh=mesh))

    def eval_host() -> Iterator[dict]:  # eval preprocessing, on training files: same count
        ds = pipeline.eval_dataset(source, batch_slice, split="train", image_size=config.image_size,
                                   crop_ratio=config.eval_crop_ratio)
        return ds.take(batches).as_numpy_iterator()

    measurements: dict[str, tuple[Callable[[], Iterator], int]] = {
        "images_per_sec": (train_host, num_images),
        "device_images_per_sec": (train_device, num_images),
        "eval_images_per_sec": (eval_host, batch_slice.local_batch_size * min(
            batches, order.num_eval_batches(source, "train", batch_slice.global_batch_size))),
        "floor_read_images_per_sec": (functools.partial(floor_dataset, source, reads,
                                                        read_only=True), len(reads)),
        "floor_decode_images_per_sec": (functools.partial(floor_dataset, source, indices,
                                                          read_only=False), num_images),
        "read_one_reader_per_sec": (functools.partial(floor_dataset, source, reads,
                                                      read_only=True, parallelism=1),
                                    len(reads)),
    }
    with contextlib.ExitStack() as services:
        served, tally = service_measurements(config, source, batches, services)
        measurements.update({name: (make, num_images) for name, make in served.items()})
        seconds, cpu_seconds, rss_mb = time_rounds(measurements, warmup, repeats)

    result = describe(config, source, batch_slice, indices, batches, repeats, warmup)
    for name, (_, count) in measurements.items():
        result[name] = count / float(np.median(seconds[name]))
    result["client_cpu_ms_per_image"] = 1e3 * float(np.median(cpu_seconds["images_per_sec"])
                                                    ) / num_images
    if served:
        result.update(service_figures(config, seconds, cpu_seconds, num_images, served, tally))
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


def time_rounds(measurements: dict[str, tuple[Callable[[], Iterator], int]], warmup: int,
                repeats: int) -> tuple[dict, dict, list[float]]:
    """Passes round-robin over the measurements: each one's wall seconds and this
    process's CPU seconds per timed pass, and the resident memory after each round."""
    seconds = {name: [] for name in measurements}
    cpu_seconds = {name: [] for name in measurements}
    rss_mb = []
    for repeat in range(warmup + repeats):
        for name, (make, _) in measurements.items():
            cpu_start = time.process_time()
            elapsed = time_pass(make, block=name == "device_images_per_sec")
            if repeat >= warmup:
                seconds[name].append(elapsed)
                cpu_seconds[name].append(time.process_time() - cpu_start)
        rss_mb.append(host_memory_mb()["host_rss_mb"])
    return seconds, cpu_seconds, rss_mb


@dataclasses.dataclass
class ServiceTally:
    """What the service passes delivered, all passes together."""

    bytes: int = 0
    images: int = 0
    made_here: int = 0  # batches made in this process: 0 unless the service failed

    def count(self, batches: service.OrderedBatches) -> Iterator[dict]:
        try:
            for batch in batches:
                self.bytes += sum(value.nbytes for value in batch.values())
                self.images += len(batch["label"])
                yield batch
        finally:
            self.made_here += batches.counts.made_here
            batches.close()


SERVICE_TIMEOUT_S = 600.0  # a bench measures the service: nothing made here unless it fails


def service_measurements(config: ml_collections.ConfigDict, source: Source, batches: int,
                         services: contextlib.ExitStack
                         ) -> tuple[dict[str, Callable[[], Iterator]], ServiceTally]:
    """The passes over `config.data_service` (none without one); the services it starts
    stay up until `services` closes."""
    tally = ServiceTally()
    target = service.connect(config.data_service)
    if target is None:
        return {}, tally
    services.enter_context(target)

    def on(started: service.Service) -> Callable[[], Iterator]:
        def make() -> Iterator[dict]:
            return tally.count(loader.host_train_batches(
                source, config, 0, batches, started, timeout_s=SERVICE_TIMEOUT_S))
        return make

    passes = {"service_images_per_sec": on(target)}
    kind, argument = parse_data_service(config.data_service)
    if kind == "local" and int(argument) > 1:
        one = service.start_local(1, cpus=service.cpu_shares(int(argument))[0])
        passes["service_one_worker_images_per_sec"] = on(services.enter_context(one))
    return passes, tally


def service_figures(config: ml_collections.ConfigDict, seconds: dict, cpu_seconds: dict,
                    num_images: int, served: dict, tally: ServiceTally) -> dict[str, Any]:
    kind, argument = parse_data_service(config.data_service)
    workers = int(argument) if kind == "local" else None
    rate = num_images / float(np.median(seconds["service_images_per_sec"]))
    figures = {
        "data_service": config.data_service,
        "service_workers": workers,
        "service_images_per_sec_per_worker": rate / workers if workers else None,
        "service_bytes_per_sec": tally.bytes / max(1, tally.images) * rate,
        "service_client_cpu_ms_per_image": 1e3 * float(np.median(
            cpu_seconds["service_images_per_sec"])) / num_images,
        "service_made_here": tally.made_here,
    }
    figures.update(round_ratios(seconds, "service_images_per_sec", "images_per_sec",
                                "service_vs_host"))
    if "service_one_worker_images_per_sec" in served:
        figures.update(round_ratios(seconds, "service_images_per_sec",
                                    "service_one_worker_images_per_sec",
                                    "service_worker_scaling"))
    return figures


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
        ds = ds.batch(pipeline.READ_BATCH).map(order.as_written(lambda i: read_batch(i)[0]),
                                               num_parallel_calls=parallelism).unbatch()
        ds = ds.map(order.as_written(finish), num_parallel_calls=parallelism)
    else:  # one map, as the pipeline reads and decodes in one map
        read = source.read("train")
        ds = ds.map(order.as_written(lambda i: finish(read(i)[0])),
                    num_parallel_calls=parallelism)
    # Batched, as the pipeline's output is: one Python step per image would be the floor
    # measured instead of the reads.
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


def describe(config: ml_collections.ConfigDict, source: Source, batch_slice: order.BatchSlice,
             indices: np.ndarray, batches: int, repeats: int, warmup: int) -> dict[str, Any]:
    return {
        "dataset": config.dataset,
        "source": parse_dataset(config.dataset)[0],  # what was read: folder, tfds or demo
        "read_processes": getattr(source, "read_processes", 0),  # TFDS's reader processes
        "image_size": config.image_size,
        "global_batch_size": batch_slice.global_batch_size,
        "processes": batch_slice.process_count,
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
