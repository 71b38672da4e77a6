"""Carrying a pipeline past the files its JPEG path cannot read.

Every image takes one branch-free JPEG path. Files that path cannot read never stop a
run and never drop a batch: `SkippingBatches` notices the failing batch, examines its
examples one by one, and rebuilds the pipeline at that batch with `Repairs`: an image
in another format (ImageNet's train set holds a PNG named .JPEG) is converted to JPEG
once and read from memory from then on; an unreadable one (corrupt, truncated, empty)
is replaced by a neutral image with `mask` False, so it counts in no loss and no
metric. Building a pipeline at any step costs no file reads (see `order`), so the price
is re-reading one batch per bad file, once per pipeline (each evaluation builds its own
and meets its bad files again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import tensorflow as tf
from absl import logging

from imagenet_jax import storage
from imagenet_jax.data import preprocess

_NEUTRAL_RGB = (124, 116, 104)
_MAX_RETRIES = 2  # a batch that fails with no bad example found is retried this often


@dataclasses.dataclass(frozen=True)
class Repairs:
    """What the pipeline learned about the files its JPEG path cannot read.

    A repaired example is never read again: its index is redirected to `readable` (an
    example known to read), and its image bytes and label come from here.
    """

    converted: dict[int, bytes] = dataclasses.field(default_factory=dict)  # index -> JPEG
    skipped: frozenset[int] = frozenset()  # unreadable: neutral image, mask False
    labels: dict[int, int] = dataclasses.field(default_factory=dict)  # of converted ones
    readable: int = 0

    def __bool__(self) -> bool:
        return bool(self.converted or self.skipped)

    def __contains__(self, index: int) -> bool:
        return index in self.converted or index in self.skipped


def _neutral_jpeg() -> bytes:
    """What a skipped example looks like: the mean ImageNet pixel, which normalises to
    ~0, so it barely moves the BatchNorm statistics of its batch."""
    pixels = tf.broadcast_to(tf.constant(_NEUTRAL_RGB, tf.uint8), [8, 8, 3])
    return tf.io.encode_jpeg(pixels, quality=95).numpy()


def _table(keys: list[int], values: list, default, dtype: tf.DType) -> tf.lookup.StaticHashTable:
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys, tf.int64), tf.constant(values, dtype)), default_value=default)


def repaired_reader(read: Callable, repairs: Repairs) -> Callable:
    """In-graph index -> (image bytes, label, mask), with `repairs` applied by table
    lookups and selects, no branch; just `read` when there is nothing to repair. Works
    elementwise: on one index with `Source.read`, on a vector with `read_batch`."""
    if not repairs:
        return lambda index: (*read(index), tf.ones_like(index, tf.bool))
    neutral = _neutral_jpeg()
    keys = sorted(repairs.converted.keys() | repairs.skipped)
    images = _table(keys, [repairs.converted.get(k, neutral) for k in keys], "", tf.string)
    labels = _table(keys, [repairs.labels.get(k, 0) for k in keys], -1, tf.int64)
    skipped = tf.constant(sorted(repairs.skipped) or [-1], tf.int64)

    def read_repaired(index):
        index = tf.cast(index, tf.int64)
        label = labels.lookup(index)
        repaired = label >= 0
        image_bytes, read_label = read(tf.where(repaired, tf.constant(repairs.readable,
                                                                      tf.int64), index))
        image_bytes = tf.where(repaired, images.lookup(index), image_bytes)
        label = tf.where(repaired, label, tf.cast(read_label, tf.int64))
        readable = tf.reduce_all(tf.not_equal(tf.expand_dims(index, -1), skipped), axis=-1)
        return image_bytes, tf.cast(label, read_label.dtype), readable

    return read_repaired


@dataclasses.dataclass(frozen=True)
class ReadRetry:
    """How often a failing file read is tried before its image counts as unreadable:
    `attempts` tries, waiting `delay_s`, then twice that, and so on, in between."""

    attempts: int = 1
    delay_s: float = 0.0

    def __call__(self, read: Callable, what: str):
        return storage.retry(read, attempts=self.attempts, delay_s=self.delay_s, what=what)


class SkippingBatches(Iterator[dict]):
    """Numpy batches of a pipeline, carried past the files its JPEG path cannot read.

    `build(position, repairs)` makes the pipeline from batch `position` on;
    `examples_at(position)` lists that batch's examples as (example index, arguments of
    `load`); `load(*args)` reads one example as the pipeline would, without repairs; and
    `read(index)` returns an example's raw file bytes and label. When a batch fails, each of
    its examples is loaded on its own: a file that fails but decodes as another format
    is converted to JPEG, one that does not is skipped, and the pipeline is rebuilt at
    the failing batch with the new repairs.
    """

    def __init__(self, build: Callable[[int, Repairs], tf.data.Dataset],
                 examples_at: Callable[[int], list[tuple[int, tuple]]], load: Callable[..., dict],
                 read: Callable[[int], tuple[tf.Tensor, tf.Tensor]],
                 describe: Callable[[int], str],
                 start: int = 0, retry: ReadRetry = ReadRetry(), repairs: Repairs = Repairs()):
        self._build, self._examples_at, self._load = build, examples_at, load
        self._read, self._describe = read, describe
        self._retry = retry
        self._position = start
        self.repairs = repairs  # what earlier pipelines of the same files learned
        self._unreported: dict[int, str] = {}
        self._iterator = iter(build(start, self.repairs).as_numpy_iterator())
        self._retries = 0

    def close(self) -> None:
        """Ends the pipeline: its threads stop here, not when it is collected."""
        self._iterator = iter(())

    def __next__(self) -> dict:
        while True:
            try:
                batch = next(self._iterator)
            except tf.errors.OpError as error:
                self._recover(error)
                continue
            self._position += 1
            self._retries = 0
            return batch

    def _recover(self, error: tf.errors.OpError) -> None:
        repairs = self.repairs
        converted, labels = dict(repairs.converted), dict(repairs.labels)
        skipped, readable = set(repairs.skipped), None
        for index, args in self._examples_at(self._position):
            if index in repairs:
                continue
            if self._loads(args):
                readable = index if readable is None else readable
                continue
            try:  # Is it the file that cannot be read (retried: storage can falter) ...
                image_bytes, label = self._retry(lambda i=index: self._read(i),
                                                 f"reading {self._describe(index)}")
            except Exception as e:  # noqa: BLE001 - eager reads raise the store's own errors too
                self._skip(index, e, skipped)
                continue
            readable = index if readable is None else readable  # its raw read works
            if self._loads(args):  # ... for a while only: nothing to repair.
                continue
            try:  # ... or its format: another one, converted to JPEG once, or none.
                converted[index] = preprocess.to_jpeg(image_bytes).numpy()
                labels[index] = int(label)
                logging.info("Converted %s to JPEG: not a JPEG the fast path reads",
                             self._describe(index))
            except tf.errors.OpError as e:
                self._skip(index, e, skipped)
        if converted.keys() == repairs.converted.keys() and skipped == repairs.skipped:
            self._retries += 1
            if self._retries > _MAX_RETRIES:
                raise error
            logging.warning("Input batch %d failed with no unreadable image found; "
                            "retrying: %s", self._position, error.message[:200])
        if readable is None and not repairs:
            raise error  # not one file of the batch can even be read: a bad source
        self.repairs = Repairs(converted, frozenset(skipped), labels,
                               repairs.readable if repairs else readable)
        self._iterator = iter(self._build(self._position, self.repairs).as_numpy_iterator())

    def _skip(self, index: int, error: Exception, skipped: set[int]) -> None:
        skipped.add(index)
        self._unreported[index] = f"{self._describe(index)} ({type(error).__name__})"
        logging.info("Skipping unreadable image %s", self._unreported[index])

    def _loads(self, args: tuple) -> bool:
        try:
            self._load(*args)
            return True
        except Exception:  # noqa: BLE001 - an OpError, or a store's error from an eager read
            return False

    @property
    def num_skipped(self) -> int:
        return len(self.repairs.skipped)

    def take_report(self) -> dict[int, str]:
        """The examples skipped since the last report: index -> where it lives and why."""
        report, self._unreported = self._unreported, {}
        return report
