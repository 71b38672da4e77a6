"""Per-process tf.data pipelines: each process builds only its slice of each global batch.

Order is a pure function of (seed, step), independent of the number of processes
and devices: epoch `e` visits a permutation of the training set drawn from
(seed, e), and global batch `b` is positions [b*G, (b+1)*G) of it, of which process
`p` reads the contiguous slice [p*L, (p+1)*L) (G global, L = G / processes). So
1 process or 8, 1 device or 8, the model sees the same global batches; and a run
resumed at step s rebuilds the pipeline at s instead of replaying the data before it.

Every image takes one branch-free JPEG path. Files that path cannot read never stop
a run and never drop a batch: `SkippingBatches` notices the failing batch, examines
its examples one by one, and rebuilds the pipeline at that batch with `Repairs`: an
image in another format (ImageNet's train set holds a PNG named .JPEG) is converted
to JPEG once and read from memory from then on; an unreadable one (corrupt,
truncated, empty) is replaced by a neutral image with `mask` False, so it counts in
no loss and no metric. Building the pipeline at any step costs no file reads, so the
price is re-reading one batch per bad file, once per pipeline (each evaluation builds
its own and meets its bad files again).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
from absl import logging

from imagenet_jax import storage
from imagenet_jax.data import preprocess, randaugment
from imagenet_jax.data.sources import Source

_NUM_EPOCHS_UNBOUNDED = 2**40
_NEUTRAL_RGB = (124, 116, 104)
_MAX_RETRIES = 2  # a batch that fails with no bad example found is retried this often
READ_BATCH = 64   # records per read call for sources with `read_batch`


def hide_accelerators_from_tensorflow() -> None:
    """TensorFlow is only the input pipeline: keep it off the GPUs/TPUs JAX uses."""
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
class Sharding:
    """Which slice of each global batch this process builds."""

    global_batch_size: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.global_batch_size % self.process_count:
            raise ValueError(f"global batch size {self.global_batch_size} is not divisible by "
                             f"the number of processes ({self.process_count})")

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def local_positions(self, num_batches: int) -> np.ndarray:
        """This process's positions within `num_batches` global batches, in order."""
        positions = np.arange(num_batches * self.global_batch_size, dtype=np.int64)
        per_batch = positions.reshape(num_batches, self.process_count, self.local_batch_size)
        return per_batch[:, self.process_index].reshape(-1)


def steps_per_epoch(source: Source, global_batch_size: int) -> int:
    """Full global batches in one pass over the training split (the remainder is dropped)."""
    return source.num_examples("train") // global_batch_size


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

    def size_of(self, epoch: tf.Tensor) -> int | tf.Tensor:
        """The resolution of `epoch`'s images: a constant unless it changes over epochs."""
        if len(set(self.image_sizes)) <= 1:
            return self.image_sizes[0] if self.image_sizes else self.image_size
        sizes = tf.constant(self.image_sizes, tf.int32)
        return sizes[tf.minimum(tf.cast(epoch, tf.int32), len(self.image_sizes) - 1)]


def train_examples(source: Source, sharding: Sharding, seed: int,
                   start_step: int = 0) -> tf.data.Dataset:
    """(epoch, index) of every example this process reads, endlessly, from `start_step`."""
    num_examples = source.num_examples("train")
    batches_per_epoch = steps_per_epoch(source, sharding.global_batch_size)
    if batches_per_epoch == 0:
        raise ValueError(f"the training split has {num_examples} examples, fewer than one "
                         f"global batch of {sharding.global_batch_size}")
    local_positions = tf.constant(sharding.local_positions(batches_per_epoch))

    def epoch_examples(epoch):
        # A stable sort of random 64-bit keys: a permutation fixed by (seed, epoch).
        keys = tf.random.stateless_uniform([num_examples], seed=tf.stack([seed, epoch]),
                                           minval=None, maxval=None, dtype=tf.int64)
        permutation = tf.argsort(keys, stable=True)
        indices = tf.gather(permutation, local_positions)
        return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(indices), epoch), indices))

    start_epoch, step_in_epoch = divmod(start_step, batches_per_epoch)
    examples = tf.data.Dataset.range(start_epoch, _NUM_EPOCHS_UNBOUNDED).flat_map(epoch_examples)
    # Skipping moves over (epoch, index) pairs only: no file is read or decoded.
    return examples.skip(step_in_epoch * sharding.local_batch_size)


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
    examples = examples.batch(chunk).map(read_many, num_parallel_calls=tf.data.AUTOTUNE)
    return examples.unbatch()


def train_dataset(source: Source, sharding: Sharding, *, image_size: int, seed: int,
                  start_step: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0),
                  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                  image_sizes: tuple[int, ...] = (), randaugment: tuple[int, float] | None = None,
                  repairs: Repairs = Repairs()) -> tf.data.Dataset:
    """Endless local batches from `start_step`: {'image': uint8 [L, S, S, 3], 'label':
    int32 [L], 'flip': bool [L], 'mask': bool [L]}; skipped examples have mask False.
    A batch never straddles two epochs, so under progressive resizing its images share
    their epoch's size S."""
    hide_accelerators_from_tensorflow()
    spec = TrainSpec(image_size, seed, tuple(crop_scale), tuple(crop_ratio),
                     tuple(image_sizes), randaugment)
    ds = train_examples(source, sharding, seed, start_step)
    if read_batch := batch_reader(source, "train"):
        ds = _read_in_batches(ds, read_batch, repairs, sharding.local_batch_size)
        ds = ds.map(train_decoder(spec), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(train_loader(source, spec, repairs), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(sharding.local_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


def num_eval_batches(source: Source, split: str, global_batch_size: int) -> int:
    return math.ceil(source.num_examples(split) / global_batch_size)


def eval_examples(source: Source, sharding: Sharding, split: str) -> tuple[np.ndarray, np.ndarray]:
    """This process's example indices for evaluating `split`, and which are real (not
    padding): every process gets the same number of whole batches."""
    num_examples = source.num_examples(split)
    positions = sharding.local_positions(num_eval_batches(source, split,
                                                          sharding.global_batch_size))
    return np.minimum(positions, num_examples - 1), positions < num_examples


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


def eval_dataset(source: Source, sharding: Sharding, *, split: str = "val",
                 image_size: int, crop_ratio: float = 0.875, start_batch: int = 0,
                 repairs: Repairs = Repairs()) -> tf.data.Dataset:
    """Every example of `split` exactly once, padded to whole global batches.

    Batches are {'image', 'label', 'index', 'mask'} (index: the example's position in
    `split`); padding rows repeat the last example with mask False, and so do skipped
    examples. Every process yields the same number of
    batches.
    """
    hide_accelerators_from_tensorflow()
    indices, valid = eval_examples(source, sharding, split)
    start = start_batch * sharding.local_batch_size
    ds = tf.data.Dataset.from_tensor_slices((valid[start:], indices[start:]))
    if read_batch := batch_reader(source, split):
        ds = _read_in_batches(ds, read_batch, repairs, sharding.local_batch_size)
        decode = eval_decoder(image_size, crop_ratio)
        ds = ds.map(lambda valid, index, *read: decode(index, valid, *read),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        load = eval_loader(source, split, image_size, crop_ratio, repairs)
        ds = ds.map(lambda valid, index: load(index, valid), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(sharding.local_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


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
                 start: int = 0, retry: ReadRetry = ReadRetry()):
        self._build, self._examples_at, self._load = build, examples_at, load
        self._read, self._describe = read, describe
        self._retry = retry
        self._position = start
        self.repairs = Repairs()
        self._unreported: dict[int, str] = {}
        self._iterator = iter(build(start, self.repairs).as_numpy_iterator())
        self._retries = 0

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


def _eager_reader(source: Source, split: str) -> Callable[[int], tuple[tf.Tensor, tf.Tensor]]:
    read = source.read(split)
    return lambda index: read(tf.constant(index, tf.int64))


def skipping_train_batches(source: Source, sharding: Sharding, spec: TrainSpec,
                           start_step: int = 0, retry: ReadRetry = ReadRetry()
                           ) -> SkippingBatches:
    """`train_dataset` from `start_step`, carried past unreadable images."""
    def build(step, repairs):
        return train_dataset(source, sharding, **dataclasses.asdict(spec), start_step=step,
                             repairs=repairs)

    def examples_at(step):
        pairs = train_examples(source, sharding, spec.seed, step).take(sharding.local_batch_size)
        return [(int(index), (tf.constant(epoch), tf.constant(index)))
                for epoch, index in pairs.as_numpy_iterator()]

    return SkippingBatches(build, examples_at, train_loader(source, spec),
                           _eager_reader(source, "train"),
                           lambda index: source.describe("train", index), start_step, retry)


def skipping_eval_batches(source: Source, sharding: Sharding, *, split: str = "val",
                          image_size: int, crop_ratio: float = 0.875,
                          retry: ReadRetry = ReadRetry()) -> SkippingBatches:
    """`eval_dataset`, carried past unreadable images (they count as not evaluated)."""
    indices, valid = eval_examples(source, sharding, split)
    size = sharding.local_batch_size

    def build(batch, repairs):
        return eval_dataset(source, sharding, split=split, image_size=image_size,
                            crop_ratio=crop_ratio, start_batch=batch, repairs=repairs)

    def examples_at(batch):
        rows = slice(batch * size, (batch + 1) * size)
        return [(int(i), (tf.constant(i, tf.int64), tf.constant(v)))
                for i, v in zip(indices[rows], valid[rows], strict=True)]

    return SkippingBatches(build, examples_at,
                           eval_loader(source, split, image_size, crop_ratio),
                           _eager_reader(source, split),
                           lambda index: source.describe(split, index), retry=retry)
