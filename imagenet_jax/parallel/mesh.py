"""The device mesh's axes and the shardings the trainer uses (batches reach them through
data/feeding.py).

Data parallelism is `jax.jit` over global arrays: the batch is sharded along the
mesh's batch axes (`data` and `fsdp`), the train state is replicated (or, over `fsdp`,
sharded by parallel/sharding.py's rules), and XLA inserts the gradient all-reduce (or
reduce-scatter). Every process holds only its own slice of each global batch.
"""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagenet_jax.spec import MESH_AXES


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh's axes that split the batch, major to minor: `data`, then `fsdp`."""
    return tuple(axis for axis in MESH_AXES if axis in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every batch axis of `mesh`, the rest whole.

    Device (d, f) of a (data, fsdp) mesh holds block d * fsdp + f of the batch, so
    consecutive blocks sit on consecutive devices of the mesh.
    """
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def compiler_options(mesh: Mesh, portable_cpu_math: bool, *,
                     runs_once: bool = False) -> dict | None:
    """XLA options for a program on `mesh`.

    With `portable_cpu_math`, on CPUs, math that rounds alike on every x86 CPU: by default
    XLA's CPU backend computes rsqrt (BatchNorm's, in every step) as a hardware estimate
    refined by Newton steps whose number and starting estimate differ between AMD and
    Intel CPUs; training amplifies that last bit, and the demo ended with different
    accuracies on the two. With it, rsqrt is IEEE's 1/sqrt everywhere, at a cost on CPUs
    (BENCHMARKS.md, "The demo's figures on other CPUs").

    `runs_once` (the state's initialiser): on CPUs, LLVM's optimisation level 1 instead of
    2. The initialiser's random-number code is long and runs once: level 1 compiles it in
    about half the time, to the same bits (tests/test_train.py; BENCHMARKS.md).
    """
    options = {}
    if mesh.devices.flat[0].platform == "cpu":
        if portable_cpu_math:
            options["xla_cpu_enable_platform_dependent_math"] = False
        if runs_once:
            options["xla_backend_optimization_level"] = 1
    return options or None
