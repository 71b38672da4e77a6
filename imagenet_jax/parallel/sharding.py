"""Where each array of the train state lives: parameters sharded by rules on their paths.

The batch is always split over every batch axis of the mesh (`data` x `fsdp`). With an
`fsdp` axis of size > 1 the parameters are split over it too, ZeRO-3 style: between
steps each device stores 1/fsdp of a sharded parameter and of its optimizer state; the
step all-gathers the parameters, reduce-scatters their gradients, and each device
updates only its own slice. With fsdp size 1 (the default) nothing is sharded: pure
data parallelism, the state replicated.

A parameter's PartitionSpec comes from the first rule that matches it:

1. `sharding_rules` (config): `(regex, spec)` pairs, tried in order; the regex is searched
   (`re.search`) in the parameter's path joined with '/', e.g. `stages/0/0/conv1/conv/kernel`
   or `fc/bias`. `spec` has one entry per leading dimension: None (whole), an axis name,
   or a tuple of axis names; `()` replicates. Each split dimension must divide evenly.
2. The default: a parameter of at least `fsdp_min_size` elements has its largest
   dimension that the fsdp size divides split over `fsdp` (the last such dimension on a
   tie: the output features of a kernel). Smaller parameters (BatchNorm scales and
   biases, most biases) stay replicated: their all-gathers would cost more in latency
   than they save in memory.

BatchNorm statistics, the step and the RNG key are replicated. Optimizer state follows
its parameter: a leaf whose path ends with a parameter's path (optax's states mirror the
parameter tree: momentum `trace`, RMSprop's `nu`, ...) and has its shape gets its
sharding; every other leaf (counts, scalars) is replicated.

Inside the step, sharded parameters are gathered whole once, before the model runs
(`gather_params_first`), and stay whole through the forward and backward passes: the
memory saved is the stored state's (parameters and optimizer state between steps), not
the step's peak, which holds every parameter once. Left to itself, XLA's sharding
propagation carries a parameter's split into the activations it multiplies
(channel-split activations, all-to-alls): model parallelism nobody asked for. Gathered
first, the model runs as in pure data parallelism; the gradients then reduce straight
into the parameters' shards, and each device updates only its own slice of the
parameters and optimizer state. XLA:CPU spells that reduction as an all-reduce followed
by a slice; XLA's GPU and TPU pipelines turn the pair into one reduce-scatter.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagenet_jax.errors import ConfigError
from imagenet_jax.parallel.mesh import replicated
from imagenet_jax.spec import FSDP_AXIS

SpecEntry = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How parameters are sharded: the default fsdp rule's threshold and the overrides."""

    fsdp_min_size: int = 2**18
    overrides: tuple[tuple[str, tuple[SpecEntry, ...]], ...] = ()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ShardingRules:
        overrides = tuple((pattern, tuple(tuple(e) if isinstance(e, list) else e for e in spec))
                          for pattern, spec in config.sharding_rules)
        return cls(fsdp_min_size=config.fsdp_min_size, overrides=overrides)


def path_name(path: Sequence[Any]) -> str:
    """A pytree key path as the '/'-joined names the rules match: `stages/0/0/conv1/conv/kernel`."""
    return "/".join(key_name(key) for key in path)


def key_name(key: Any) -> str:
    for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def default_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> PartitionSpec:
    """The largest dimension that `fsdp_size` divides over `fsdp`, if the array is big enough."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    candidates = [(size, dim) for dim, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    _, dim = max(candidates)  # ties go to the later dimension
    return PartitionSpec(*([None] * dim), FSDP_AXIS)


def checked_spec(name: str, shape: Sequence[int], spec: Sequence[SpecEntry],
                 mesh: Mesh) -> PartitionSpec:
    """`spec` for parameter `name`, or ConfigError if it names an absent axis or splits unevenly."""
    if len(spec) > len(shape):
        raise ConfigError(f"sharding rule for {name} {tuple(shape)}: spec {tuple(spec)} has "
                          f"more entries than the parameter has dimensions")
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        missing = [axis for axis in axes if axis not in mesh.axis_names]
        if missing:
            raise ConfigError(f"sharding rule for {name}: axis {missing[0]!r} is not in the "
                              f"mesh; its axes are {', '.join(mesh.axis_names)}")
        parts = math.prod(mesh.shape[axis] for axis in axes)
        if shape[dim] % parts:
            raise ConfigError(f"sharding rule for {name} {tuple(shape)}: dimension {dim} "
                              f"({shape[dim]}) does not split into {parts} equal parts")
    return PartitionSpec(*spec)


def param_spec(name: str, shape: Sequence[int], mesh: Mesh, rules: ShardingRules
               ) -> PartitionSpec:
    """The PartitionSpec of one parameter: the first matching override, else the default."""
    for pattern, spec in rules.overrides:
        if re.search(pattern, name):
            return checked_spec(name, shape, spec, mesh)
    fsdp_size = mesh.shape.get(FSDP_AXIS, 1)
    return default_spec(shape, fsdp_size, rules.fsdp_min_size)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: ShardingRules) -> Any:
    """A NamedSharding for every parameter of `abstract_params` (arrays or shape structs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path_name(path), x.shape, mesh, rules)),
        abstract_params)


def follow_params(abstract_tree: Any, abstract_params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that mirrors the parameters in places (an optimizer state).

    A leaf whose key path ends with a parameter's key path and whose shape equals that
    parameter's takes its sharding (the longest such path wins); other leaves are
    replicated.
    """
    by_path = {
        tuple(key_name(k) for k in path): (param.shape, sharding)
        for (path, param), sharding in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0],
            jax.tree.leaves(shardings), strict=True)
    }

    def sharding_of(path, leaf) -> NamedSharding:
        names = tuple(key_name(k) for k in path)
        for start in range(len(names)):
            shape, sharding = by_path.get(names[start:], (None, None))
            if shape is not None and tuple(shape) == tuple(leaf.shape):
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding_of, abstract_tree)


def is_sharded(shardings: Any) -> bool:
    """True if any leaf of a tree of NamedShardings splits some dimension."""
    return any(any(entry is not None for entry in s.spec) for s in jax.tree.leaves(shardings))


def gather_params_first(step: Callable, mesh: Mesh, name: str) -> Callable:
    """`step(state, *inputs)` that first all-gathers `state.params` to every device.

    The constraint pins the parameters whole where the model reads them (see the module
    docstring); their shards, and the optimizer state's, are what the step stores and
    returns. `name` names the wrapper, so compilations and profiles still read
    `train_step`.
    """

    def gathered(state, *inputs):
        whole = jax.tree.map(lambda _: replicated(mesh), state.params)
        params = jax.lax.with_sharding_constraint(state.params, whole)
        return step(state.replace(params=params), *inputs)

    gathered.__name__ = gathered.__qualname__ = name
    return gathered
