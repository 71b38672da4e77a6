"""device_grid: the (data, fsdp) mesh laid along the physical links, on fake TPU topologies.

The TPU, multi-slice and multi-process cases use fake device objects: mesh_utils reads
only plain attributes of a device, so a dataclass stands in for one. What each fake
carries, and why:
- `id`: TPU devices are put in id order first (and mesh_utils sorts GPUs by it).
- `platform`: 'tpu' sends mesh_utils to its torus layout; 'cpu' to a plain reshape.
- `device_kind`: picks mesh_utils' per-generation handler. 'TPU v4' has none, so the
  layout comes from `coords` alone; 'TPU v3' uses a fixed ring over id order.
- `coords` (x, y, z) and `core_on_chip`: where the chip sits in the torus; one core per
  chip (core_on_chip 0) is what mesh_utils requires of v4.
- `slice_index`: which slice of a multi-slice job (create_hybrid_device_mesh groups by it);
  `process_index`: the host, the grouping when devices carry no slice_index.
"""

import dataclasses
import itertools
import logging
import random

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from imagenet_jax.parallel.topology import describe_grid, device_grid


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    id: int
    process_index: int
    coords: tuple[int, int, int]
    core_on_chip: int = 0
    slice_index: int = 0
    device_kind: str = "TPU v4"
    platform: str = "tpu"


@dataclasses.dataclass(frozen=True)
class FakeCpu:  # no slice_index, no coords: like a CPU (or a GPU host) device
    id: int
    process_index: int
    device_kind: str = "cpu"
    platform: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeCpuOneSlice(FakeCpu):  # every device in slice 0, as some GPU runtimes report
    slice_index: int = 0


def tpu_slice(dims: tuple[int, int, int], *, slice_index: int = 0,
              first_id: int = 0) -> list[FakeTpu]:
    """The chips of a dims[0] x dims[1] x dims[2] slice, numbered host by host as on a
    multi-host v4 slice: each host (4 ids, one process) owns a 2x2x1 block of chips."""
    def host_tiled(xyz: tuple[int, int, int]) -> tuple[int, ...]:
        x, y, z = xyz
        return z, y // 2, x // 2, y % 2, x % 2

    coords = sorted(itertools.product(*(range(n) for n in dims)), key=host_tiled)
    return [FakeTpu(first_id + i, (first_id + i) // 4, xyz, slice_index=slice_index)
            for i, xyz in enumerate(coords)]


def shuffled(devices: list, seed: int) -> list:
    devices = list(devices)
    random.Random(seed).shuffle(devices)
    return devices


def hops(a: FakeTpu, b: FakeTpu, extent: tuple[int, int, int]) -> int:
    """Links between two chips of a torus of `extent` chips (wraparound on every axis)."""
    return sum(min(abs(i - j), n - abs(i - j))
               for i, j, n in zip(a.coords, b.coords, extent, strict=True))


def ids(grid: np.ndarray) -> list:
    return [[device.id for device in row] for row in grid]


# (1) Real (fake CPU) devices: no topology, so the order given is kept.

def test_cpu_devices_are_reshaped_in_order():
    grid = device_grid({"data": 4, "fsdp": 2})
    assert grid.shape == (4, 2)
    assert grid.tolist() == np.asarray(jax.devices()).reshape(4, 2).tolist()
    mesh = Mesh(grid, ("data", "fsdp"))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert describe_grid(mesh) == "data 4 x fsdp 2 on 1 process, 8 x cpu"


def test_cpu_devices_keep_the_order_they_are_given_in():
    devices = jax.devices()[::-1]
    assert device_grid({"data": 8}, devices).tolist() == devices


# (2) One TPU slice: fsdp on neighbouring chips, whatever order the chips are listed in.

def test_tpu_v4_slice_puts_fsdp_neighbours_one_hop_apart():
    chips = tpu_slice((2, 2, 2))
    grid = device_grid({"data": 4, "fsdp": 2}, shuffled(chips, seed=0))
    assert sorted(d.id for d in grid.flat) == [d.id for d in chips]
    for row in grid:
        assert hops(row[0], row[1], (2, 2, 2)) == 1, [d.coords for d in row]
    for seed in range(1, 4):
        assert ids(device_grid({"data": 4, "fsdp": 2}, shuffled(chips, seed))) == ids(grid)


def test_tpu_v4_fsdp_rings_lie_along_one_physical_axis():
    # On 4x4x4 a host's ids cover a 2x2 block, so fsdp 4 in id order would be a 2x2
    # square, not a ring; mesh_utils gives each fsdp group a whole axis, wraparound included.
    grid = device_grid({"data": 16, "fsdp": 4}, shuffled(tpu_slice((4, 4, 4)), seed=0))
    for row in grid:
        ring = list(row) + [row[0]]
        assert [hops(a, b, (4, 4, 4)) for a, b in itertools.pairwise(ring)] == [1] * 4, \
            [d.coords for d in row]


def test_tpu_v4_torus_is_split_when_fsdp_fits_no_whole_axis(caplog):
    # fsdp 2 on a 4x4x4 torus: no physical axis has size 2, so one is split in two.
    with caplog.at_level(logging.WARNING):
        grid = device_grid({"data": 32, "fsdp": 2}, shuffled(tpu_slice((4, 4, 4)), seed=0))
    assert "plain reshape" not in caplog.text  # placed by mesh_utils, not the fallback
    assert grid.shape == (32, 2)
    assert all(hops(row[0], row[1], (4, 4, 4)) == 1 for row in grid)


def test_tpu_v3_ring_follows_id_order_not_listing_order():
    # v3: 4 chips x 2 cores, laid on mesh_utils' fixed ring over ids (its docstring's
    # 0, 1, 2, 3, 6, 7, 4, 5), however the cores are listed.
    cores = [FakeTpu(i, 0, (i // 2 % 2, i // 4, 0), core_on_chip=i % 2, device_kind="TPU v3")
             for i in range(8)]
    for seed in range(3):
        grid = device_grid({"data": 4, "fsdp": 2}, shuffled(cores, seed))
        assert ids(grid) == [[0, 1], [2, 3], [6, 7], [4, 5]]


def test_tpu_devices_without_coordinates_are_reshaped_in_id_order():
    @dataclasses.dataclass(frozen=True)
    class BareTpu:
        id: int
        process_index: int = 0
        device_kind: str = "TPU v4"
        platform: str = "tpu"

    grid = device_grid({"data": 2, "fsdp": 2}, [BareTpu(i) for i in (3, 1, 0, 2)])
    assert ids(grid) == [[0, 1], [2, 3]]


def test_layout_mesh_utils_cannot_map_falls_back_with_a_warning(caplog):
    # Two cores per chip of a kind mesh_utils expects in megacore mode (one per chip).
    cores = [FakeTpu(i, 0, (i // 2 % 2, i // 4, 0), core_on_chip=i % 2) for i in range(8)]
    with caplog.at_level(logging.WARNING):
        grid = device_grid({"data": 4, "fsdp": 2}, shuffled(cores, seed=0))
    assert ids(grid) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert "plain reshape" in caplog.text


# (3) Two slices: data split across them, everything else inside one.

def two_v4_slices() -> list[FakeTpu]:
    return tpu_slice((2, 2, 1), slice_index=0) + tpu_slice((2, 2, 1), slice_index=1,
                                                           first_id=4)


def test_two_slices_split_data_in_contiguous_halves():
    grid = device_grid({"data": 4, "fsdp": 2}, shuffled(two_v4_slices(), seed=0), dcn_data=2)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    assert slice_of.tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
    for row in grid:
        assert hops(row[0], row[1], (2, 2, 1)) == 1  # fsdp on one ICI link, never across slices
    assert describe_grid(grid) == (
        "data 4 x fsdp 2 over 2 slices (DCN data 2), 8 x TPU v4 (2x2x1 chips per slice)")


def test_two_slices_with_dcn_data_1_is_an_error():
    with pytest.raises(ValueError, match=r"span 2 slices, but dcn_data=1: set mesh.dcn_data=2"):
        device_grid({"data": 4, "fsdp": 2}, two_v4_slices())


# (4) No slices: processes (hosts) are the groups the network joins.

@pytest.mark.parametrize("device_class", [FakeCpu, FakeCpuOneSlice])
def test_processes_group_data_when_devices_have_no_slices(device_class):
    # Listed with the two processes interleaved: 0, 1, 0, 1, ...
    devices = [device_class(i, i % 2) for i in range(8)]
    grid = device_grid({"data": 4, "fsdp": 2}, devices, dcn_data=2)
    assert ids(grid) == [[0, 2], [4, 6], [1, 3], [5, 7]]  # each process's in listed order
    assert describe_grid(grid) == (
        "data 4 x fsdp 2 over 2 processes (data 2 across processes), 8 x cpu")
    # Without dcn_data the devices are simply reshaped, whichever process they are on.
    assert ids(device_grid({"data": 4, "fsdp": 2}, devices)) == [[0, 1], [2, 3], [4, 5],
                                                                  [6, 7]]


# (5) Errors a user can act on.

def test_shape_that_does_not_match_the_device_count():
    with pytest.raises(ValueError, match=r"needs 16 devices but 8 were given: choose sizes "
                                         r"whose product is 8"):
        device_grid({"data": 4, "fsdp": 4})
    with pytest.raises(ValueError, match=r"positive ints"):
        device_grid({"data": 0, "fsdp": 8})


def test_dcn_data_must_divide_the_data_axis():
    with pytest.raises(ValueError, match=r"dcn_data=3 must divide shape\['data'\]=4: "
                                         r"valid values are 1, 2, 4"):
        device_grid({"data": 4, "fsdp": 2}, dcn_data=3)
    with pytest.raises(ValueError, match=r"splits the 'data' axis, which mesh shape"):
        device_grid({"fsdp": 8}, dcn_data=2)


def test_dcn_data_must_equal_the_number_of_slices_or_processes():
    with pytest.raises(ValueError, match=r"dcn_data=4 but the devices span 2 slices "
                                         r"\(grouped by slice_index\): set dcn_data to 2"):
        device_grid({"data": 8, "fsdp": 1}, two_v4_slices(), dcn_data=4)
    with pytest.raises(ValueError, match=r"dcn_data=2 but the devices span 1 process "
                                         r"\(grouped by process_index\): set dcn_data to 1"):
        device_grid({"data": 4, "fsdp": 2}, dcn_data=2)


def test_slices_of_unequal_size_are_an_error():
    chips = tpu_slice((2, 1, 1), slice_index=0) + tpu_slice((3, 2, 1), slice_index=1,
                                                            first_id=2)
    with pytest.raises(ValueError, match=r"each of the 2 slices must hold 4 devices for this "
                                         r"shape, but they hold \{0: 2, 1: 6\}"):
        device_grid({"data": 4, "fsdp": 2}, chips, dcn_data=2)
