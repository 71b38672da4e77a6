"""Arranging devices into the trainer's (data, fsdp) mesh along the physical links.

`mesh.mesh_from_shape` reshapes `jax.devices()` in order; on a TPU that puts logical
neighbours wherever the id order happens to fall. `device_grid` asks JAX's `mesh_utils`
instead, which maps the last (most communicating) axis, `fsdp`, onto the fastest
physical links, and in a multi-slice job keeps everything but a split of `data` inside
each slice, so only the gradient all-reduce between data groups crosses the slow
data-centre network (DCN).

What `jax.experimental.mesh_utils` (jax 0.10) does by platform:
- CPU: a plain reshape of the devices in the order given.
- GPU: sorts by device id (XLA's topology-aware numbering), then reshapes.
- TPU: per-generation ring tables for small slices (v2/v3 trays, v4i, v5e/v6e, v5p 2x2x2,
  7x), otherwise the chips' `coords` laid out as a 3-D torus and the logical axes
  assigned to whole physical axes, innermost logical axis first.

`jax.make_mesh` is not used: it silently drops devices beyond the shape's product,
refuses multi-slice devices, splits physical axes only on v5e, and makes every axis
`Explicit` (sharding in types), which the trainer's `NamedSharding`s do not expect.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from imagenet_jax.spec import DATA_AXIS, MESH_AXES


def mesh_from_shape(shape: dict[str, int], dcn_data: int = 1) -> Mesh:
    """The mesh over the first prod(shape) devices, axes in `shape`'s order, laid out by
    `device_grid` (dcn_data: slices the data axis spans)."""
    devices = jax.devices()[:math.prod(shape.values())]
    return Mesh(device_grid(shape, devices, dcn_data=dcn_data), tuple(shape))


def device_grid(
    shape: dict[str, int], devices: Sequence[Any] | None = None, *, dcn_data: int = 1
) -> np.ndarray:
    """An object array of devices with shape `tuple(shape.values())`, axes in `shape`'s order.

    The last axis (`fsdp` in the trainer's order) gets the fastest links. With
    `dcn_data` > 1 the job spans several slices (or, on devices without slices, hosts
    joined by the network): `data` is split into `dcn_data` contiguous blocks, one per
    slice, ordered by slice (or process) index; every other axis stays inside a slice.

    TPU devices are put in id order first (`jax.devices()`'s, the order mesh_utils' ring
    tables assume), so the result does not depend on how `devices` was listed. Devices
    with no physical coordinates, or a layout mesh_utils cannot map, get a plain reshape.
    Physical axes may be split across logical ones when the shape demands it (e.g.
    fsdp 2 on a 4x4x4 torus) rather than fail.

    Raises:
      ValueError: the shape's product is not the number of devices; `dcn_data` does not
        divide `shape['data']`; or `dcn_data` is not the number of slices (processes).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _check_shape(shape, len(devices))
    if devices and devices[0].platform == "tpu":
        devices.sort(key=lambda device: device.id)
    granule_attr, granules = _granules(devices)
    if dcn_data == 1:
        if granule_attr == "slice_index" and len(granules) > 1:
            raise ValueError(
                f"the {len(devices)} devices span {len(granules)} slices, but dcn_data=1: "
                f"set mesh.dcn_data={len(granules)}, so that only '{DATA_AXIS}' crosses slices "
                f"(the '{DATA_AXIS}' size must be a multiple of it)")
        return _single_granule_grid(sizes, devices)
    ici_sizes, dcn_sizes = _split_data_axis(shape, dcn_data)
    _check_granules(granule_attr, granules, dcn_data, math.prod(ici_sizes))
    if not _placeable(devices):
        return _grid_from_granules(ici_sizes, dcn_sizes, granules)
    try:
        return mesh_utils.create_hybrid_device_mesh(
            ici_sizes, dcn_sizes, devices,
            process_is_granule=granule_attr == "process_index",
            allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError) as error:
        _warn_reshape(devices[0], error)
        return _grid_from_granules(ici_sizes, dcn_sizes, granules)


def describe_grid(grid: np.ndarray | Mesh, axis_names: Sequence[str] | None = None) -> str:
    """One line for the log, e.g. 'data 4 x fsdp 2 over 2 slices (DCN data 2), 8 x TPU v4
    (2x2x1 chips per slice)'.

    A `Mesh` names its axes; a bare grid is read with `axis_names`, by default the
    trainer's batch axes (`data`, `fsdp`) in order.
    """
    if isinstance(grid, Mesh):
        axis_names = grid.axis_names
        grid = grid.devices
    if axis_names is None:
        axis_names = MESH_AXES[:grid.ndim]
    if len(axis_names) != grid.ndim:
        raise ValueError(f"{grid.ndim} axis names needed for a grid of shape {grid.shape}, "
                         f"got {tuple(axis_names)}")
    axes = " x ".join(f"{name} {size}" for name, size in zip(axis_names, grid.shape, strict=True))
    devices = list(grid.flat)
    granule_attr, granules = _granules(devices)
    unit = "slice" if granule_attr == "slice_index" else "process"
    span = f"{'on' if len(granules) == 1 else 'over'} {_count(len(granules), unit)}"
    crossing = _axes_crossing_granules(grid, axis_names, granule_attr)
    if crossing and unit == "slice":
        span += f" (DCN {crossing})"  # only slices are joined by the data-centre network
    elif crossing:
        span += f" ({crossing} across processes)"
    hardware = f"{len(devices)} x {devices[0].device_kind}"
    if all(_has_coords(d) for d in devices):
        one_slice = next(iter(granules.values())) if unit == "slice" else devices
        extent = "x".join(str(n) for n in _coords_extent(one_slice))
        hardware += f" ({extent} chips{' per slice' if unit == 'slice' else ''})"
    return f"{axes} {span}, {hardware}"


def _check_shape(shape: dict[str, int], num_devices: int) -> tuple[int, ...]:
    sizes = tuple(shape.values())
    if not sizes or not all(isinstance(size, int) and size >= 1 for size in sizes):
        raise ValueError(f"mesh shape {shape} must map axis names to positive ints, "
                         f"e.g. {{'data': {num_devices}, 'fsdp': 1}}")
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh shape {shape} needs {math.prod(sizes)} devices but {num_devices} were "
            f"given: choose sizes whose product is {num_devices}, "
            f"e.g. {{'data': {num_devices}, 'fsdp': 1}}")
    return sizes


def _split_data_axis(
    shape: dict[str, int], dcn_data: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The per-slice (ICI) and across-slice (DCN) shapes: `data` split dcn_data ways."""
    if DATA_AXIS not in shape:
        raise ValueError(f"dcn_data={dcn_data} splits the '{DATA_AXIS}' axis, which mesh "
                         f"shape {shape} lacks")
    data_size = shape[DATA_AXIS]
    if not isinstance(dcn_data, int) or dcn_data < 1 or data_size % dcn_data:
        divisors = [n for n in range(1, data_size + 1) if data_size % n == 0]
        raise ValueError(f"dcn_data={dcn_data} must divide shape['{DATA_AXIS}']={data_size}: "
                         f"valid values are {', '.join(map(str, divisors))}")
    ici = tuple(size // dcn_data if name == DATA_AXIS else size for name, size in shape.items())
    dcn = tuple(dcn_data if name == DATA_AXIS else 1 for name in shape)
    return ici, dcn


def _granules(devices: Sequence[Any]) -> tuple[str, dict[int, list[Any]]]:
    """Devices grouped into the units the slow network joins, in index order: slices
    where devices report more than one, otherwise processes (hosts)."""
    attr = "process_index"
    if all(hasattr(d, "slice_index") for d in devices):
        if len({d.slice_index for d in devices}) > 1:
            attr = "slice_index"
    groups: dict[int, list[Any]] = collections.defaultdict(list)
    for device in devices:
        groups[getattr(device, attr)].append(device)
    return attr, dict(sorted(groups.items()))


def _check_granules(
    attr: str, granules: dict[int, list[Any]], dcn_data: int, per_granule: int
) -> None:
    unit = "slice" if attr == "slice_index" else "process"
    if len(granules) != dcn_data:
        raise ValueError(
            f"dcn_data={dcn_data} but the devices span {_count(len(granules), unit)} "
            f"(grouped by {attr}): set dcn_data to {len(granules)}, or to 1 to lay them "
            f"out as one group")
    counts = {index: len(group) for index, group in granules.items()}
    if set(counts.values()) != {per_granule}:
        raise ValueError(f"each of the {_count(dcn_data, unit)} must hold {per_granule} "
                         f"devices for this shape, but they hold {counts} (by {attr})")


def _placeable(devices: Sequence[Any]) -> bool:
    """Whether mesh_utils can take these devices: any but TPUs without coordinates (it
    reads `coords` and `core_on_chip` of every TPU; CPUs and GPUs it only reshapes)."""
    return all(d.platform != "tpu" or _has_coords(d) for d in devices)


def _has_coords(device: Any) -> bool:
    return hasattr(device, "coords") and hasattr(device, "core_on_chip")


def _single_granule_grid(sizes: tuple[int, ...], devices: list[Any]) -> np.ndarray:
    if not _placeable(devices):
        return _object_array(devices).reshape(sizes)
    try:
        return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError) as error:
        # mesh_utils signals "cannot map this layout" (holes in the coordinates, several
        # cores per chip of an unknown kind) with these; training still works unmapped.
        _warn_reshape(devices[0], error)
        return _object_array(devices).reshape(sizes)


def _grid_from_granules(
    ici_sizes: tuple[int, ...], dcn_sizes: tuple[int, ...], granules: dict[int, list[Any]]
) -> np.ndarray:
    """The hybrid layout by plain reshapes: granule g's block is `data` rows g*n..(g+1)*n."""
    blocks = [_object_array(group).reshape(ici_sizes) for group in granules.values()]
    data_axis = [dcn > 1 for dcn in dcn_sizes].index(True)
    return np.concatenate(blocks, axis=data_axis)


def _object_array(devices: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of `devices`, whatever sequence protocol a device object has."""
    array = np.empty(len(devices), dtype=object)
    array[:] = list(devices)
    return array


def _warn_reshape(device: Any, error: Exception) -> None:
    logging.warning("mesh_utils cannot lay out these %s devices (%s): plain reshape in id "
                    "order instead; collectives may take longer routes", device.device_kind,
                    str(error).splitlines()[0][:200])


def _axes_crossing_granules(grid: np.ndarray, axis_names: Sequence[str], attr: str) -> str:
    """'data 2' when walking the data axis (others held at 0) meets 2 granules."""
    crossing = []
    for axis, name in enumerate(axis_names):
        line = grid[tuple(slice(None) if i == axis else 0 for i in range(grid.ndim))]
        count = len({getattr(d, attr) for d in line.flat})
        if count > 1:
            crossing.append(f"{name} {count}")
    return ", ".join(crossing)


def _count(number: int, unit: str) -> str:
    return f"{number} {unit if number == 1 else unit + ('es' if unit.endswith('s') else 's')}"


def _coords_extent(devices: Sequence[Any]) -> tuple[int, ...]:
    """The bounding box of the chips' coordinates, e.g. (2, 2, 1)."""
    coords = np.array([d.coords for d in devices])
    return tuple(int(n) for n in coords.max(axis=0) - coords.min(axis=0) + 1)
