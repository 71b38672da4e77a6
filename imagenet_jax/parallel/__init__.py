"""Device meshes, sharding and host-local <-> global arrays."""

from imagenet_jax.parallel.mesh import (
    BATCH_AXES,
    DATA_AXIS,
    FSDP_AXIS,
    batch_axes,
    batch_sharding,
    make_global_batch,
    make_mesh,
    mesh_from_shape,
    prefetch_to_device,
    replicated,
)

__all__ = [
    "BATCH_AXES",
    "DATA_AXIS",
    "FSDP_AXIS",
    "batch_axes",
    "batch_sharding",
    "make_global_batch",
    "make_mesh",
    "mesh_from_shape",
    "prefetch_to_device",
    "replicated",
]
