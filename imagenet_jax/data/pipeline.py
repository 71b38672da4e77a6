"""Per-process tf.data pipelines: each process builds only its slice of each global batch.

Order is a pure function of (seed, step), independent of the number of processes
and devices: epoch `e` visits a permutation of the training set drawn from
(seed, e), and global batch `b` is positions [b*G, (b+1)*G) of it, of which process
`p` reads the contiguous slice [p*L, (p+1)*L) (G global, L = G / processes). So
1 process or 8, 1 device or 8, the model sees the same global batches; and a run
resumed at step s rebuilds the pipeline at s instead of replaying the data before it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from imagenet_jax.data import preprocess
from imagenet_jax.data.sources import FolderSource

_NUM_EPOCHS_UNBOUNDED = 2**40


def hide_accelerators_from_tensorflow() -> None:
    """TensorFlow is only the input pipeline: keep it off the GPUs/TPUs JAX uses."""
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # Already initialised, or no such device type.
        pass


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


def steps_per_epoch(source: FolderSource, global_batch_size: int) -> int:
    """Full global batches in one pass over the training split (the remainder is dropped)."""
    return source.num_examples("train") // global_batch_size


def train_dataset(source: FolderSource, sharding: Sharding, *, image_size: int, seed: int,
                  start_step: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0),
                  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.data.Dataset:
    """Endless batches {'image': uint8 [L, S, S, 3], 'label': int32 [L]} from `start_step` on."""
    hide_accelerators_from_tensorflow()
    num_examples = source.num_examples("train")
    batches_per_epoch = steps_per_epoch(source, sharding.global_batch_size)
    if batches_per_epoch == 0:
        raise ValueError(f"the training split has {num_examples} examples, fewer than one "
                         f"global batch of {sharding.global_batch_size}")
    local_positions = tf.constant(sharding.local_positions(batches_per_epoch))
    paths = tf.constant(source.files["train"])
    labels = tf.constant(source.labels["train"])

    def epoch_examples(epoch):
        # A stable sort of random 64-bit keys: a permutation fixed by (seed, epoch).
        keys = tf.random.stateless_uniform([num_examples], seed=tf.stack([seed, epoch]),
                                           minval=None, maxval=None, dtype=tf.int64)
        permutation = tf.argsort(keys, stable=True)
        indices = tf.gather(permutation, local_positions)
        epochs = tf.fill(tf.shape(indices), epoch)
        return tf.data.Dataset.from_tensor_slices((epochs, indices))

    def load(epoch, index):
        example_seed = tf.random.experimental.stateless_fold_in(tf.stack([seed, epoch]), index)
        image = preprocess.train_image(tf.io.read_file(paths[index]), example_seed, image_size,
                                       crop_scale, crop_ratio)
        return {"image": image, "label": labels[index]}

    start_epoch, step_in_epoch = divmod(start_step, batches_per_epoch)
    ds = tf.data.Dataset.range(start_epoch, _NUM_EPOCHS_UNBOUNDED).flat_map(epoch_examples)
    # Skipping moves over (epoch, index) pairs only: no file is read or decoded.
    ds = ds.skip(step_in_epoch * sharding.local_batch_size)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(sharding.local_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def num_eval_batches(source: FolderSource, split: str, global_batch_size: int) -> int:
    return math.ceil(source.num_examples(split) / global_batch_size)


def eval_dataset(source: FolderSource, sharding: Sharding, *, split: str = "val",
                 image_size: int, crop_ratio: float = 0.875) -> tf.data.Dataset:
    """Every example of `split` exactly once, padded to whole global batches.

    Batches are {'image', 'label', 'mask'}; padding rows repeat the last example with
    mask False. Every process yields the same number of batches.
    """
    hide_accelerators_from_tensorflow()
    num_examples = source.num_examples(split)
    num_batches = num_eval_batches(source, split, sharding.global_batch_size)
    positions = sharding.local_positions(num_batches)
    mask = positions < num_examples
    indices = np.minimum(positions, num_examples - 1)
    paths = tf.constant(source.files[split])
    labels = tf.constant(source.labels[split])

    def load(index, valid):
        image = preprocess.eval_image(tf.io.read_file(paths[index]), image_size, crop_ratio)
        return {"image": image, "label": labels[index], "mask": valid}

    ds = tf.data.Dataset.from_tensor_slices((indices, mask))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(sharding.local_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)
