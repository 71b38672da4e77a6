"""`bench scaling`: the train step's images/s on 1, 2, 4, ... devices, per-device batch fixed.

Weak scaling, data parallel: `config.batch_size` is the global batch at the LARGEST device
count, and every count runs the same per-device batch, `batch_size / max(counts)`; n
devices then train on a global batch of n times that. The mesh is `data` = n, `fsdp` = 1,
on the first n devices of this one process. Each count is built and timed as `bench
train` does it (`assemble.plan`, `assemble.build`, one synthetic batch placed on the devices,
the step compiled ahead of time, the median of the timed steps).

Efficiency is images/s(n) / (n / n0 x images/s(n0)), n0 the smallest count (normally 1):
1.0 is linear scaling. On fake CPU devices (--xla_force_host_platform_device_count)
all devices share the host's cores, so there it measures the host, not scaling.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from imagenet_jax.bench.train import (
    check_arguments,
    compile_step,
    run_steps,
    step_figures,
    synthetic_batches,
    time_steps,
)
from imagenet_jax.errors import ConfigError
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.train import assemble

SHARED_HOST_NOTE = ("fake CPU devices share the host's cores: efficiency here measures "
                    "the host, not how the step scales on real chips")


def bench_scaling(config: ml_collections.ConfigDict, *,
                  device_counts: Sequence[int] | None = None, steps: int = 10,
                  warmup_steps: int = 2) -> dict[str, Any]:
    """Times the train step of `config` on each device count; one row per count.

    Args:
      config: a trainer config; `batch_size` is the global batch at the largest count.
      device_counts: the counts to run, each at most `jax.device_count()`; default the
        powers of two up to the device count (and the device count itself).
      steps: timed steps per count; the step time is their median.
      warmup_steps: untimed steps per count after compilation.
    """
    check_arguments("synthetic", warmup_steps, steps)
    counts = resolve_device_counts(device_counts)
    per_device = per_device_batch(config.batch_size, counts)
    rows = [measure_count(config, n, per_device, steps, warmup_steps) for n in counts]
    add_efficiency(rows)
    device = jax.devices()[0]
    result = {
        "model": config.model, "image_size": config.image_size, "dtype": config.dtype,
        "per_device_batch": per_device, "platform": device.platform,
        "device_kind": device.device_kind, "jax_version": jax.__version__,
        "steps": steps, "warmup_steps": warmup_steps, "rows": rows,
    }
    if device.platform == "cpu" and max(counts) > 1:
        result["note"] = SHARED_HOST_NOTE
    return result


def resolve_device_counts(device_counts: Sequence[int] | None) -> list[int]:
    """The counts to run, ascending; ConfigError for one this single process cannot run."""
    available = jax.device_count()
    if jax.process_count() > 1:
        raise ConfigError("bench scaling runs in one process (its smaller meshes leave "
                          f"devices out); this job has {jax.process_count()}")
    if device_counts is None:
        powers = itertools.takewhile(lambda n: n <= available, (2**i for i in itertools.count()))
        return sorted(set(powers) | {available})
    counts = sorted(set(device_counts))
    bad = [n for n in counts if not isinstance(n, int) or not 1 <= n <= available]
    if not counts or bad:
        raise ConfigError(f"device counts {list(device_counts)}: each must be an integer "
                          f"from 1 to the {available} devices available")
    return counts


def per_device_batch(global_batch_size: int, counts: Sequence[int]) -> int:
    """`global_batch_size` over the largest count; ConfigError unless it divides evenly."""
    largest = max(counts)
    if global_batch_size % largest:
        raise ConfigError(f"batch_size={global_batch_size} is the global batch at "
                          f"{largest} devices and must be a multiple of {largest}")
    return global_batch_size // largest


def scaled_config(config: ml_collections.ConfigDict, num_devices: int,
                  per_device: int) -> ml_collections.ConfigDict:
    """`config` on a data-parallel mesh of `num_devices`, at `per_device` examples each."""
    scaled = config.copy_and_resolve_references()
    scaled.mesh.data, scaled.mesh.fsdp = num_devices, 1
    scaled.batch_size = scaled.eval_batch_size = per_device * num_devices
    return scaled


def measure_count(config: ml_collections.ConfigDict, num_devices: int, per_device: int,
                  steps: int, warmup_steps: int) -> dict[str, Any]:
    """Builds, compiles and times the train step on the first `num_devices` devices."""
    scaled = scaled_config(config, num_devices, per_device)
    _, derived = assemble.plan(scaled)
    mesh = mesh_from_shape(derived.mesh_shape, derived.dcn_data)
    run = assemble.build(scaled, derived, mesh)
    batches = synthetic_batches(scaled, derived, mesh)
    step_fn, compile_s = compile_step(run.train_step, run.state, next(batches))
    state = run_steps(step_fn, run.state, batches, warmup_steps)
    state, step_seconds, _ = time_steps(step_fn, state, batches, steps)
    del state, run  # donated and done: free them before the next count builds its own
    return {"devices": num_devices, "per_device_batch": per_device,
            "global_batch": scaled.batch_size, "compile_s": compile_s,
            **step_figures(step_seconds, scaled.batch_size)}


def add_efficiency(rows: list[dict[str, Any]]) -> None:
    """Adds each row's images/s over linear scaling from the first (smallest) row."""
    base = rows[0]
    per_device_rate = base["images_per_sec"] / base["devices"]
    for row in rows:
        row["efficiency"] = row["images_per_sec"] / (row["devices"] * per_device_rate)


def format_scaling_table(result: dict[str, Any]) -> str:
    """The rows as an aligned table under a line saying what was measured."""
    lines = [f"{result['model']} at {result['image_size']} px, {result['dtype']}, "
             f"{result['per_device_batch']} examples per device (weak scaling), "
             f"{result['platform']} ({result['device_kind']}), median of {result['steps']} "
             "steps"]
    if "note" in result:
        lines.append(f"note: {result['note']}")
    header = ("devices", "global batch", "step ms (median)", "images/s", "efficiency")
    lines.append("  ".join(f"{h:>16}" for h in header))
    for row in result["rows"]:
        values = (f"{row['devices']:,}", f"{row['global_batch']:,}",
                  f"{row['step_time_ms']:,.1f}", f"{row['images_per_sec']:,.1f}",
                  f"{row['efficiency']:.3f}")
        lines.append("  ".join(f"{v:>16}" for v in values))
    return "\n".join(lines)
