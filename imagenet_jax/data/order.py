"""Which examples each process reads, in which order: a pure function of (seed, step).

Epoch `e` visits a permutation of the training set drawn from (seed, e), and global
batch `b` is positions [b*G, (b+1)*G) of it, of which process `p` reads the contiguous
slice [p*L, (p+1)*L) (G global, L = G / processes). So 1 process or 8, 1 device or 8,
the model sees the same global batches; and a run resumed at step s starts the order at
s instead of replaying the data before it. Evaluation reads each example of a split
once, padded to whole global batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from imagenet_jax import config
from imagenet_jax.data.sources import Source

_NUM_EPOCHS_UNBOUNDED = 2**40


@dataclasses.dataclass(frozen=True)
class BatchSlice:
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
    """Full global batches in one pass over the training split (config.steps_per_epoch)."""
    return config.steps_per_epoch(source.num_examples("train"), global_batch_size)


def epoch_permutation(num_examples: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """In-graph: the order of the training set in `epoch`, fixed by (seed, epoch): a stable
    sort of random 64-bit keys (int32 indices)."""
    keys = tf.random.stateless_uniform([num_examples], seed=tf.stack([seed, epoch]),
                                       minval=None, maxval=None, dtype=tf.int64)
    return tf.argsort(keys, stable=True)


def as_written(fn: Callable) -> Callable:
    """`fn`, for a tf.data transformation to trace as written, without AutoGraph's rewrite
    of its Python. The pipeline's functions branch and loop with TensorFlow's own ops
    (tf.cond, tf.where, vectorised maps) or over Python values, which the rewrite leaves
    alone: it made the same graphs, and cost each process ~2 s of its start (BENCHMARKS.md).
    A Python `if` on a tensor in such a function fails at once, where AutoGraph would have
    made it a tf.cond: write the tf.cond."""
    return tf.autograph.experimental.do_not_convert(fn)


def _batches_per_epoch(source: Source, batch_slice: BatchSlice) -> int:
    batches = steps_per_epoch(source, batch_slice.global_batch_size)
    if batches == 0:
        raise ValueError(f"the training split has {source.num_examples('train')} examples, "
                         f"fewer than one global batch of {batch_slice.global_batch_size}")
    return batches


def train_examples(source: Source, batch_slice: BatchSlice, seed: int,
                   start_step: int = 0) -> tf.data.Dataset:
    """(epoch, index) of every example this process reads, endlessly, from `start_step`."""
    num_examples = source.num_examples("train")
    batches_per_epoch = _batches_per_epoch(source, batch_slice)
    local_positions = tf.constant(batch_slice.local_positions(batches_per_epoch))

    def epoch_examples(epoch):
        indices = tf.gather(epoch_permutation(num_examples, seed, epoch), local_positions)
        return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(indices), epoch), indices))

    start_epoch, step_in_epoch = divmod(start_step, batches_per_epoch)
    examples = tf.data.Dataset.range(start_epoch, _NUM_EPOCHS_UNBOUNDED).flat_map(
        as_written(epoch_examples))
    # Skipping moves over (epoch, index) pairs only: no file is read or decoded.
    return examples.skip(step_in_epoch * batch_slice.local_batch_size)


def step_examples(source: Source, batch_slice: BatchSlice, seed: int
                  ) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """In-graph: step -> the (epoch, index) pairs of this process's slice of that step's
    global batch, the very pairs `train_examples` yields for it. One step alone, so that a
    data service worker can make any step (each one sorts its epoch's keys again)."""
    num_examples = source.num_examples("train")
    batches_per_epoch = _batches_per_epoch(source, batch_slice)
    local_positions = tf.constant(batch_slice.local_positions(batches_per_epoch).reshape(
        batches_per_epoch, batch_slice.local_batch_size))

    def examples_of(step: tf.Tensor) -> tf.data.Dataset:
        step = tf.cast(step, tf.int64)
        epoch = step // batches_per_epoch
        indices = tf.gather(epoch_permutation(num_examples, seed, epoch),
                            local_positions[step % batches_per_epoch])
        return tf.data.Dataset.from_tensor_slices((tf.fill(tf.shape(indices), epoch), indices))

    return examples_of


def num_eval_batches(source: Source, split: str, global_batch_size: int) -> int:
    return math.ceil(source.num_examples(split) / global_batch_size)


def eval_examples(source: Source, batch_slice: BatchSlice,
                  split: str) -> tuple[np.ndarray, np.ndarray]:
    """This process's example indices for evaluating `split`, and which are real (not
    padding): every process gets the same number of whole batches."""
    num_examples = source.num_examples(split)
    positions = batch_slice.local_positions(num_eval_batches(source, split,
                                                          batch_slice.global_batch_size))
    return np.minimum(positions, num_examples - 1), positions < num_examples
