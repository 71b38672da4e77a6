"""Device meshes, sharding and host-local <-> global arrays."""

from imagenet_jax.parallel.mesh import batch_axes, batch_sharding, compiler_options, replicated
from imagenet_jax.parallel.topology import describe_grid, device_grid, mesh_from_shape

__all__ = [
    "batch_axes",
    "batch_sharding",
    "compiler_options",
    "describe_grid",
    "device_grid",
    "mesh_from_shape",
    "replicated",
]
