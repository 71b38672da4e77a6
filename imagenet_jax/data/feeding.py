"""Host-local batches onto the devices: each process's slice of a global batch becomes a
global array (`make_global_batch`), and `prefetch_to_device` keeps transfers in flight
ahead of the step."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from imagenet_jax.parallel import batch_sharding


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
