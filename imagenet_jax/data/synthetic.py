"""Synthetic data made on the devices: the train step's speed with no input pipeline at all.

`dataset=synthetic` has ImageNet's shape (1,000 classes, 1,281,167 train and 50,000
val examples, so schedules and epochs read as on ImageNet); `synthetic:classes=10,
train=5000,val=500` changes any of the three. Each global batch is drawn on the
devices from (seed, step), already sharded like a real one: nothing crosses from the
host, so `bench train` and a training run on it measure compute alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from imagenet_jax.parallel import batch_sharding

if TYPE_CHECKING:
    import tensorflow as tf

IMAGENET_SHAPE = {"classes": 1000, "train": 1_281_167, "val": 50_000}


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    num_classes: int = IMAGENET_SHAPE["classes"]
    num_train: int = IMAGENET_SHAPE["train"]
    num_val: int = IMAGENET_SHAPE["val"]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(f"synthetic_{i}" for i in range(self.num_classes))

    def num_examples(self, split: str) -> int:
        return self.num_train if split == "train" else self.num_val

    def read(self, split: str) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
        raise TypeError("synthetic data is made on the devices: it has no encoded images")

    def describe(self, split: str, index: int) -> str:
        return f"synthetic {split}[{index}]"

    def fingerprint(self) -> str:
        return f"synthetic:{self.num_classes},{self.num_train},{self.num_val}"


def parse_synthetic(arg: str) -> SyntheticSource:
    """'' or 'classes=10,train=5000,val=500' (any subset) -> a SyntheticSource."""
    sizes = dict(IMAGENET_SHAPE)
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        if key not in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad synthetic option {item!r}: expected classes=N, train=N "
                             "or val=N with N >= 1, e.g. synthetic:classes=10,train=5000")
        sizes[key] = int(value)
    return SyntheticSource(sizes["classes"], sizes["train"], sizes["val"])


def batch_maker(source: SyntheticSource, mesh: Mesh, global_batch_size: int, image_size: int,
                seed: int) -> Callable[[jax.Array, jax.Array], dict]:
    """A jitted (position, num_valid) -> global batch, drawn on the devices from (seed,
    position); rows at or past `num_valid` have mask False."""
    shape = (global_batch_size, image_size, image_size, 3)

    def make(position, num_valid):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), position)
        image_key, label_key = jax.random.split(key)
        rows = jnp.arange(global_batch_size)
        return {"image": jax.random.bits(image_key, shape, jnp.uint8),
                "label": jax.random.randint(label_key, shape[:1], 0, source.num_classes),
                "flip": jnp.zeros(shape[:1], bool),
                "index": (position * global_batch_size + rows).astype(jnp.int32),
                "mask": rows < num_valid}

    return jax.jit(make, out_shardings=batch_sharding(mesh))


def train_batches(source: SyntheticSource, mesh: Mesh, global_batch_size: int,
                  image_size: int | Callable[[int], int], seed: int, start_step: int = 0
                  ) -> Iterator[dict]:
    """Endless batches from `start_step`; `image_size` may be a function of the step
    (progressive resizing)."""
    size_of = image_size if callable(image_size) else lambda _: image_size
    makers: dict[int, Callable] = {}  # one jitted maker a size
    step = start_step
    while True:
        size = size_of(step)
        if size not in makers:
            makers[size] = batch_maker(source, mesh, global_batch_size, size, seed)
        yield makers[size](jnp.uint32(step), global_batch_size)
        step += 1


def eval_batches(source: SyntheticSource, mesh: Mesh, global_batch_size: int,
                 image_size: int, seed: int) -> Iterator[dict]:
    """The val split, padded to whole batches; drawn from a different stream than train."""
    make = batch_maker(source, mesh, global_batch_size, image_size, seed + 1)
    total = source.num_examples("val")
    for start in range(0, total, global_batch_size):
        yield make(jnp.uint32(start // global_batch_size), min(global_batch_size, total - start))
