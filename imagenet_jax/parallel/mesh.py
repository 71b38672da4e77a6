"""The device mesh, the shardings the trainer uses, and getting batches onto it.

Data parallelism is `jax.jit` over global arrays: the batch is sharded along the
mesh's `data` axis, the train state is replicated, and XLA inserts the gradient
all-reduce. Every process holds only its own slice of each global batch.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def mesh_from_shape(shape: dict[str, int]) -> Mesh:
    """The mesh over the first prod(shape) devices, axes in `shape`'s order."""
    sizes = tuple(shape.values())
    devices = np.asarray(jax.devices()[:int(np.prod(sizes))]).reshape(sizes)
    return Mesh(devices, tuple(shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays on `mesh`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch
    )


def prefetch_to_device(
    iterator: Iterable[Any], size: int, put: Callable[[Any], Any]
) -> Iterator[Any]:
    """Keeps `size` batches in flight to the devices ahead of the consumer.

    `put` starts an asynchronous transfer and returns at once, so the copy of the
    next batches overlaps the step running on the current one.
    """
    queue: collections.deque = collections.deque()
    for batch in iterator:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
