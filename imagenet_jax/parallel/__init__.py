"""Device meshes, sharding and host-local <-> global arrays."""

from imagenet_jax.parallel.mesh import (
    DATA_AXIS,
    batch_sharding,
    make_global_batch,
    make_mesh,
    mesh_from_shape,
    prefetch_to_device,
    replicated,
)

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "make_global_batch",
    "make_mesh",
    "mesh_from_shape",
    "prefetch_to_device",
    "replicated",
]
