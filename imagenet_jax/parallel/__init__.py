"""Device meshes, sharding and host-local <-> global arrays."""

from imagenet_jax.parallel.mesh import (
    BATCH_AXES,
    DATA_AXIS,
    FSDP_AXIS,
    batch_axes,
    batch_sharding,
    make_mesh,
    replicated,
)
from imagenet_jax.parallel.topology import describe_grid, device_grid, mesh_from_shape

__all__ = [
    "BATCH_AXES",
    "DATA_AXIS",
    "FSDP_AXIS",
    "batch_axes",
    "batch_sharding",
    "describe_grid",
    "device_grid",
    "make_mesh",
    "mesh_from_shape",
    "replicated",
]
