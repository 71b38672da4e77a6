"""The per-process tf.data pipelines: each process builds only its slice of each global batch.

`train_dataset` and `eval_dataset` read the examples that `order` assigns to this
process (in batches of records for sources that read through Python), decode and
crop them (`preprocess`), and batch them as uint8; `skipping_train_batches` and
`skipping_eval_batches` carry them past unreadable files (`repair`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import tensorflow as tf

from imagenet_jax.data import preprocess, randaugment
from imagenet_jax.data.order import (
    BatchSlice,
    as_written,
    eval_examples,
    step_examples,
    train_examples,
)
from imagenet_jax.data.repair import ReadRetry, Repairs, SkippingBatches, repaired_reader
from imagenet_jax.data.sources import Source

READ_BATCH = 64   # records per read call for sources with `read_batch`


def set_up_host() -> None:
    """TensorFlow is only the input pipeline: keep it off the GPUs/TPUs JAX uses. (The
    CLI also sets the allocator up for the pipeline's buffers, `allocator`.)"""
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # Already initialised, or no such device type.
        pass


def dataset_options() -> tf.data.Options:
    """Each image's ops run on one thread: the parallelism is across images
    (num_parallel_calls), and per-op thread pools only add hand-offs for tensors this
    small."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return options


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The training pipeline's parameters: everything its batches depend on."""

    image_size: int
    seed: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Progressive resizing: the size of each epoch (the last one's for every epoch after);
    # () = image_size throughout.
    image_sizes: tuple[int, ...] = ()
    randaugment: tuple[int, float] | None = None  # (ops per image, magnitude)

    def size_of(self, epoch: int | tf.Tensor) -> int | tf.Tensor:
        """The resolution of `epoch`'s images (an int, or in-graph a tensor): a constant
        unless it changes over epochs."""
        if len(set(self.image_sizes)) <= 1:
            return self.image_sizes[0] if self.image_sizes else self.image_size
        if isinstance(epoch, int):
            return self.image_sizes[min(epoch, len(self.image_sizes) - 1)]
        sizes = tf.constant(self.image_sizes, tf.int32)
        return sizes[tf.minimum(tf.cast(epoch, tf.int32), len(self.image_sizes) - 1)]


def train_decoder(spec: TrainSpec) -> Callable[..., dict]:
    """(epoch, index, image bytes, label, mask) -> one training example {'image', 'label',
    'flip', 'mask'}."""
    def decode(epoch, index, image_bytes, label, mask):
        example_seed = tf.random.experimental.stateless_fold_in(tf.stack([spec.seed, epoch]),
                                                                index)
        image, flip = preprocess.train_image(image_bytes, example_seed, spec.size_of(epoch),
                                             spec.crop_scale, spec.crop_ratio)
        if spec.randaugment:
            # Its own stream: the crops and flips stay those of a run without it.
            augment_seed = tf.random.experimental.stateless_fold_in(example_seed, 1)
            image = randaugment.randaugment(image, augment_seed, *spec.randaugment)
        return {"image": image, "label": label, "flip": flip, "mask": mask}

    return decode


def train_loader(source: Source, spec: TrainSpec, repairs: Repairs = Repairs()
                 ) -> Callable[[tf.Tensor, tf.Tensor], dict]:
    """(epoch, index) -> one training example, read and decoded."""
    read, decode = repaired_reader(source.read("train"), repairs), train_decoder(spec)
    return lambda epoch, index: decode(epoch, index, *read(index))


def batch_reader(source: Source, split: str) -> Callable | None:
    """The source's batched read (`read_batch`: indices [n] -> bytes [n], labels [n]), if
    it has one for `split`; else None, and examples are read one at a time."""
    read_batch = getattr(source, "read_batch", None)
    return read_batch(split) if read_batch else None


def _read_in_batches(examples: tf.data.Dataset, read_batch: Callable, repairs: Repairs,
                     local_batch_size: int) -> tf.data.Dataset:
    """Elements (..., index) -> (..., index, image bytes, label, mask), reading up to
    READ_BATCH records a call: for sources whose read has a fixed per-call cost (TFDS's,
    through Python), which one call per image would pay a million times an epoch. The
    calls never straddle two local batches, so a failed read fails its own batch."""
    read = repaired_reader(read_batch, repairs)

    def read_many(*args):
        return (*args, *read(args[-1]))

    chunk = math.gcd(local_batch_size, READ_BATCH)
    examples = examples.batch(chunk).map(as_written(read_many), num_parallel_calls=tf.data.AUTOTUNE)
    return examples.unbatch()


def train_dataset(source: Source, batch_slice: BatchSlice, spec: TrainSpec, start_step: int = 0,
                  repairs: Repairs = Repairs()) -> tf.data.Dataset:
    """Endless local batches from `start_step`: {'image': uint8 [L, S, S, 3], 'label':
    int32 [L], 'flip': bool [L], 'mask': bool [L]}; skipped examples have mask False.
    A batch never straddles two epochs, so under progressive resizing its images share
    their epoch's size S."""
    set_up_host()
    ds = train_examples(source, batch_slice, spec.seed, start_step)
    ds = _train_examples_loaded(ds, source, spec, repairs, batch_slice.local_batch_size)
    ds = ds.batch(batch_slice.local_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


def keyed_train_dataset(source: Source, batch_slice: BatchSlice, spec: TrainSpec, start_step: int,
                        stop_step: int, repairs: Repairs = Repairs()) -> tf.data.Dataset:
    """The local batch of each step in [start_step, stop_step), `train_dataset`'s batches
    with the step as 'position' (int64): what a data service worker makes, one step per
    split of its `Dataset.range`, in whatever order the service delivers them."""
    set_up_host()
    examples_of = step_examples(source, batch_slice, spec.seed)
    ds = tf.data.Dataset.range(start_step, stop_step).flat_map(as_written(
        lambda step: examples_of(step).map(as_written(lambda epoch, index: (step, epoch, index)))))
    ds = _train_examples_loaded(ds, source, spec, repairs, batch_slice.local_batch_size)
    return _keyed_batches(ds, batch_slice.local_batch_size)


def _train_examples_loaded(examples: tf.data.Dataset, source: Source, spec: TrainSpec,
                           repairs: Repairs, local_batch_size: int) -> tf.data.Dataset:
    """Elements ([position,] epoch, index) -> training examples (with 'position' when the
    elements carry one)."""
    if read_batch := batch_reader(source, "train"):
        examples = _read_in_batches(examples, read_batch, repairs, local_batch_size)
        decode = train_decoder(spec)
        return examples.map(as_written(lambda *args: _with_key(args[:-5], decode(*args[-5:]))),
                            num_parallel_calls=tf.data.AUTOTUNE)
    load = train_loader(source, spec, repairs)
    return examples.map(as_written(lambda *args: _with_key(args[:-2], load(*args[-2:]))),
                        num_parallel_calls=tf.data.AUTOTUNE)


def _with_key(key: tuple, example: dict) -> dict:
    return {**example, "position": key[0]} if key else example


def _keyed_batches(examples: tf.data.Dataset, local_batch_size: int) -> tf.data.Dataset:
    """Batches of `local_batch_size` examples that share one 'position', kept as a scalar."""
    ds = examples.batch(local_batch_size, drop_remainder=True)
    ds = ds.map(as_written(lambda batch: {**batch, "position": batch["position"][0]}))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


def eval_decoder(image_size: int, crop_ratio: float) -> Callable[..., dict]:
    """(index, valid, image bytes, label, readable) -> one evaluation example."""
    def decode(index, valid, image_bytes, label, readable):
        image = preprocess.eval_image(image_bytes, image_size, crop_ratio)
        return {"image": image, "label": label, "index": tf.cast(index, tf.int32),
                "mask": valid & readable}

    return decode


def eval_loader(source: Source, split: str, image_size: int, crop_ratio: float,
                repairs: Repairs = Repairs()) -> Callable[[tf.Tensor, tf.Tensor], dict]:
    """(index, valid) -> one evaluation example {'image', 'label', 'index', 'mask'}."""
    read = repaired_reader(source.read(split), repairs)
    decode = eval_decoder(image_size, crop_ratio)
    return lambda index, valid: decode(index, valid, *read(index))


def eval_dataset(source: Source, batch_slice: BatchSlice, *, split: str = "val",
                 image_size: int, crop_ratio: float = 0.875, start_batch: int = 0,
                 repairs: Repairs = Repairs()) -> tf.data.Dataset:
    """Every example of `split` exactly once, padded to whole global batches.

    Batches are {'image', 'label', 'index', 'mask'} (index: the example's position in
    `split`); padding rows repeat the last example with mask False, and so do skipped
    examples. Every process yields the same number of batches.
    """
    set_up_host()
    indices, valid = eval_examples(source, batch_slice, split)
    start = start_batch * batch_slice.local_batch_size
    ds = tf.data.Dataset.from_tensor_slices((valid[start:], indices[start:]))
    ds = _eval_examples_loaded(ds, source, split, image_size, crop_ratio, repairs,
                               batch_slice.local_batch_size)
    ds = ds.batch(batch_slice.local_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


def keyed_eval_dataset(source: Source, batch_slice: BatchSlice, *, split: str, image_size: int,
                       crop_ratio: float, start_batch: int, stop_batch: int,
                       repairs: Repairs = Repairs()) -> tf.data.Dataset:
    """`eval_dataset`'s batches [start_batch, stop_batch), each with its batch number as
    'position': what a data service worker makes, one batch per split."""
    set_up_host()
    indices, valid = eval_examples(source, batch_slice, split)
    shape = (-1, batch_slice.local_batch_size)
    indices, valid = tf.constant(indices.reshape(shape)), tf.constant(valid.reshape(shape))

    def examples_of(batch):
        examples = tf.data.Dataset.from_tensor_slices((valid[batch], indices[batch]))
        return examples.map(as_written(lambda v, index: (batch, v, index)))

    ds = tf.data.Dataset.range(start_batch, stop_batch).flat_map(as_written(examples_of))
    ds = _eval_examples_loaded(ds, source, split, image_size, crop_ratio, repairs,
                               batch_slice.local_batch_size)
    return _keyed_batches(ds, batch_slice.local_batch_size)


def _eval_examples_loaded(examples: tf.data.Dataset, source: Source, split: str,
                          image_size: int, crop_ratio: float, repairs: Repairs,
                          local_batch_size: int) -> tf.data.Dataset:
    """Elements ([position,] valid, index) -> evaluation examples (with 'position' when
    the elements carry one)."""
    if read_batch := batch_reader(source, split):
        examples = _read_in_batches(examples, read_batch, repairs, local_batch_size)
        decode = eval_decoder(image_size, crop_ratio)
        return examples.map(as_written(
            lambda *args: _with_key(args[:-5], decode(args[-4], args[-5], *args[-3:]))),
            num_parallel_calls=tf.data.AUTOTUNE)
    load = eval_loader(source, split, image_size, crop_ratio, repairs)
    return examples.map(as_written(lambda *args: _with_key(args[:-2], load(args[-1], args[-2]))),
                        num_parallel_calls=tf.data.AUTOTUNE)


def _eager_reader(source: Source, split: str) -> Callable[[int], tuple[tf.Tensor, tf.Tensor]]:
    read = source.read(split)
    return lambda index: read(tf.constant(index, tf.int64))


def skipping_train_batches(source: Source, batch_slice: BatchSlice, spec: TrainSpec,
                           start_step: int = 0, retry: ReadRetry = ReadRetry(),
                           repairs: Repairs = Repairs()) -> SkippingBatches:
    """`train_dataset` from `start_step`, carried past unreadable images (and those
    `repairs` already knows)."""
    def build(step, repairs):
        return train_dataset(source, batch_slice, spec, step, repairs)

    def examples_at(step):
        pairs = train_examples(source, batch_slice, spec.seed, step)
        pairs = pairs.take(batch_slice.local_batch_size)
        return [(int(index), (tf.constant(epoch), tf.constant(index)))
                for epoch, index in pairs.as_numpy_iterator()]

    return SkippingBatches(build, examples_at, train_loader(source, spec),
                           _eager_reader(source, "train"),
                           lambda index: source.describe("train", index), start_step, retry,
                           repairs)


def skipping_eval_batches(source: Source, batch_slice: BatchSlice, *, split: str = "val",
                          image_size: int, crop_ratio: float = 0.875,
                          start_batch: int = 0, retry: ReadRetry = ReadRetry(),
                          repairs: Repairs = Repairs()) -> SkippingBatches:
    """`eval_dataset` from `start_batch`, carried past unreadable images (they count as
    not evaluated)."""
    indices, valid = eval_examples(source, batch_slice, split)
    size = batch_slice.local_batch_size

    def build(batch, repairs):
        return eval_dataset(source, batch_slice, split=split, image_size=image_size,
                            crop_ratio=crop_ratio, start_batch=batch, repairs=repairs)

    def examples_at(batch):
        rows = slice(batch * size, (batch + 1) * size)
        return [(int(i), (tf.constant(i, tf.int64), tf.constant(v)))
                for i, v in zip(indices[rows], valid[rows], strict=True)]

    return SkippingBatches(build, examples_at,
                           eval_loader(source, split, image_size, crop_ratio),
                           _eager_reader(source, split),
                           lambda index: source.describe(split, index), start_batch, retry,
                           repairs)
