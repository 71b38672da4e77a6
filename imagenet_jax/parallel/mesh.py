"""The device mesh, the shardings the trainer uses, and getting batches onto it.

Data parallelism is `jax.jit` over global arrays: the batch is sharded along the
mesh's batch axes (`data` and `fsdp`), the train state is replicated (or, over `fsdp`,
sharded by parallel/sharding.py's rules), and XLA inserts the gradient all-reduce (or
reduce-scatter). Every process holds only its own slice of each global batch.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"  # also splits the batch; parameters are sharded over it (ZeRO-3 style)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh's axes that split the batch, major to minor: `data`, then `fsdp`."""
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every batch axis of `mesh`, the rest whole.

    Device (d, f) of a (data, fsdp) mesh holds block d * fsdp + f of the batch, so
    consecutive blocks sit on consecutive devices of the mesh.
    """
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


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
