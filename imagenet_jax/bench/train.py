"""`bench train`: how fast the configured model's train step runs, and how well it uses the chip.

`bench_train(config)` builds the run exactly as the trainer does (`assemble.plan`,
`assemble.build`), compiles the train step once, times it step by step, and reports compile
time, step time, images/s, FLOPs from XLA's own cost analysis, a dense-matmul rate
measured in the same process, their ratio (MFU) and peak memory. Every config override applies, so
`--config.model=resnet50 --config.image_size=224 --config.batch_size=32` benchmarks that.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from imagenet_jax.bench.host import process_peak_rss_mb
from imagenet_jax.config import Derived
from imagenet_jax.data import sources, synthetic
from imagenet_jax.errors import ConfigError
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.train import assemble
from imagenet_jax.train.goodput import TimeAccount

MODES = ("synthetic", "pipeline")
MATMUL_TARGET_SECONDS = 0.05  # long enough per timed run that dispatch and timer noise vanish
MATMUL_REPEATS = 5


def bench_train(config: ml_collections.ConfigDict, *, mode: str = "synthetic",
                warmup_steps: int = 3, steps: int = 20,
                matmul_size: int | None = None, goodput: bool = False) -> dict[str, Any]:
    """Measures the train step of `config` and returns the figures as a flat dict.

    Modes: "synthetic" reuses one random batch placed on the devices once, so the figures
    are the step alone; "pipeline" feeds batches from the configured tf.data pipeline
    exactly as the train loop does, so a slower step time than synthetic's means the run
    is input-bound (`input_bound_ratio` is the share of each step spent waiting for input).

    FLOPs are XLA's cost analysis of the compiled step: the FLOPs it executes (forward,
    backward and optimizer update, elementwise ops included). It skips the products a
    convolution would take on its zero padding, so it reads below the published
    multiply-add figures (`imagenet-jax models`), the more so at small resolutions; nor
    does it count work on hardware tile padding. `mfu` is that count against the dense
    matmul rate measured here in the same process, not against a datasheet peak.

    Args:
      config: a trainer config; it is validated and its dataset opened as for training
        (synthetic mode reads the number of classes from it, or, when the dataset cannot
        be opened here, times ImageNet's shape: `plan`).
      mode: "synthetic" or "pipeline".
      warmup_steps: untimed steps run after compilation, before the timed ones.
      steps: timed steps; the step time is their median.
      matmul_size: side of the square matmul timed for `matmul_tflops`; default by platform.
      goodput: step as the train loop does, through its time accounting
        (train/goodput.py: the batch through `next_batch`, each step's outputs to the
        device watch), to measure what it costs the step.
    """
    check_arguments(mode, warmup_steps, steps)
    config, (source, derived) = plan(config, mode)
    mesh = mesh_from_shape(derived.mesh_shape, derived.dcn_data)
    run = assemble.build(config, derived, mesh)
    with contextlib.ExitStack() as services:
        batches = (synthetic_batches(config, derived, mesh) if mode == "synthetic"
                   else pipeline_batches(config, source, mesh, services))
        return _bench(config, derived, mesh, run, batches, mode, warmup_steps, steps,
                      matmul_size, goodput)


def _bench(config: ml_collections.ConfigDict, derived: Derived, mesh: Mesh, run: Any,
           batches: Iterator[dict], mode: str, warmup_steps: int, steps: int,
           matmul_size: int | None, goodput: bool = False) -> dict[str, Any]:

    state = run.state
    first_batch = next(batches)
    with count_cache_hits() as hits:
        step_fn, compile_s = compile_step(run.train_step, state, first_batch)
    compile_cache_hit = hits[0] > 0
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), first_batch)
    flops_per_device = compiled_flops(step_fn)
    batches = itertools.chain([first_batch], batches)
    del first_batch

    state = run_steps(step_fn, state, batches, warmup_steps)
    account = TimeAccount() if goodput else None
    try:
        state, step_seconds, input_seconds = time_steps(step_fn, state, batches, steps, account)
    finally:
        if account is not None:
            account.close()
    del state  # the last one is not needed: free it before the matmul allocates
    # Read before the matmul allocates its own buffers: the peak belongs to the step.
    peak_memory_mb, peak_memory_source = peak_memory(mesh)
    # After the peak is read: the warm compile builds a second state of its own.
    with count_cache_hits() as warm_hits:
        compile_warm_s = warm_compile_seconds(config, derived, mesh, abstract_batch)

    matmul = measure_matmul(mesh, jnp.dtype(derived.compute_dtype), matmul_size)
    result = describe_run(config, derived, mesh, mode, warmup_steps, steps)
    result["goodput_accounting"] = goodput
    result["compile_s"] = compile_s
    result["compile_cache_hit"] = compile_cache_hit  # True: compile_s was already warm
    result["compile_warm_s"] = compile_warm_s
    result["compile_warm_cache_hit"] = warm_hits[0] > 0  # False: compile_warm_s is not warm
    result.update(step_figures(step_seconds, config.batch_size))
    result.update(flop_figures(flops_per_device, derived.num_devices,
                               result["step_time_ms"] / 1e3, matmul))
    result["peak_memory_mb"] = peak_memory_mb
    result["peak_memory_source"] = peak_memory_source
    if mode == "pipeline":
        result.update(input_figures(input_seconds, step_seconds))
    return result


def plan(config: ml_collections.ConfigDict, mode: str
         ) -> tuple[ml_collections.ConfigDict, tuple[sources.Source, Derived]]:
    """`assemble.plan(config)`; in synthetic mode, where no example is read, a dataset that
    cannot be opened here (ImageNet on another machine, TensorFlow not installed) gives
    way to `synthetic`, ImageNet's shape (1,000 classes), with a warning."""
    try:
        return config, assemble.plan(config)
    except (ConfigError, ImportError) as e:
        dataset_error = isinstance(e, ImportError) or str(e).startswith("dataset ")
        if mode != "synthetic" or not dataset_error:
            raise
        from absl import logging

        logging.warning("bench train: dataset %r cannot be opened here (%s); synthetic mode "
                        "reads no example: timing with dataset 'synthetic' (ImageNet's shape, "
                        "1,000 classes) instead.", config.dataset, str(e)[:200])
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.dataset = "synthetic"
        return config, assemble.plan(config)


def check_arguments(mode: str, warmup_steps: int, steps: int) -> None:
    """Raises ConfigError, before anything is built, for a mode or step count that cannot run."""
    if mode not in MODES:
        raise ConfigError(f"unknown bench mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")


def synthetic_batches(config: ml_collections.ConfigDict, derived: Derived,
                      mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
    """One random uint8 batch, drawn on the devices already sharded like the trainer's
    (data/synthetic.py), forever: the step alone, no input."""
    source = synthetic.SyntheticSource(num_classes=derived.num_classes)
    make = synthetic.batch_maker(source, mesh, config.batch_size, config.image_size,
                                 config.seed)
    return itertools.repeat(make(jnp.uint32(0), config.batch_size))


def pipeline_batches(config: ml_collections.ConfigDict, source: sources.Source, mesh: Mesh,
                     services: contextlib.ExitStack) -> Iterator[dict[str, jax.Array]]:
    """The train loop's own input: its tf.data pipeline (on `config.data_service` when it
    names one, which `services` stops), prefetched to the devices."""
    from imagenet_jax.data import (
        loader,  # TensorFlow: only in this mode
        service,
    )

    data_service = service.connect(config.data_service)
    if data_service is not None:
        services.enter_context(data_service)
    batches = loader.train_batches(source, config, mesh, data_service=data_service)
    services.callback(batches.close)
    return batches


def compile_step(train_step: Callable, state: Any, batch: dict) -> tuple[Callable, float]:
    """The train step lowered and compiled ahead of time, and the seconds that took.

    Timing includes tracing and lowering. Calling the returned executable never
    compiles, so the timed steps hold no compilation.
    """
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    return compiled, time.perf_counter() - start


@contextlib.contextmanager
def count_cache_hits() -> Iterator[list[int]]:
    """Counts persistent compilation cache hits inside the block: [hits]."""
    hits = [0]

    def listen(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits[0] += 1

    jax.monitoring.register_event_listener(listen)
    try:
        yield hits
    finally:
        jax.monitoring.unregister_event_listener(listen)


def warm_compile_seconds(config: ml_collections.ConfigDict, derived: Derived, mesh: Mesh,
                         batch: dict) -> float | None:
    """The compile time of a restarted run: a new train step, built as a new process would,
    whose compilation the persistent cache (written by the first) answers. None when no
    persistent cache is on."""
    if not jax.config.jax_compilation_cache_dir:
        return None
    again = assemble.build(config, derived, mesh)
    start = time.perf_counter()
    again.train_step.lower(again.state, batch).compile()
    seconds = time.perf_counter() - start
    del again  # its state is not needed: free it before the matmul allocates
    return seconds


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one execution of `compiled` on one device, or None if XLA does not say.

    `cost_analysis()` is a dict in recent JAX and a list of dicts (one per HLO module)
    in older ones. For a program sharded over a mesh it describes the per-device
    program, so a global figure is this times the number of devices. That global figure
    counts what every device executes: with the state replicated, each device runs the
    whole optimizer update, so that part counts once per device.
    """
    analysis = compiled.cost_analysis()
    modules = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    flops = sum(float((module or {}).get("flops", 0.0)) for module in modules)
    return flops if flops > 0 else None


def run_steps(step_fn: Callable, state: Any, batches: Iterator[dict], num_steps: int) -> Any:
    """Untimed steps; returns the final state once it is computed."""
    for _ in range(num_steps):
        state, _ = step_fn(state, next(batches))
    return jax.block_until_ready(state)


def time_steps(step_fn: Callable, state: Any, batches: Iterator[dict], num_steps: int,
               account: TimeAccount | None = None) -> tuple[Any, list[float], list[float]]:
    """Runs `num_steps` steps one at a time and returns (state, step seconds, input seconds).

    Each step is timed from asking for its batch to its new state being ready, so the
    step time holds any wait for input; the input time is that wait alone. The step
    donates its state: the returned one is fed back in. With `account`, each step goes
    through it as in the train loop.
    """
    step_seconds, input_seconds = [], []
    for _ in range(num_steps):
        start = time.perf_counter()
        batch = next(batches) if account is None else account.next_batch(batches)
        fetched = time.perf_counter()
        state, metrics = step_fn(state, batch)
        if account is not None:
            account.dispatched(metrics)
        state = jax.block_until_ready(state)
        end = time.perf_counter()
        step_seconds.append(end - start)
        input_seconds.append(fetched - start)
    return state, step_seconds, input_seconds


def peak_memory(mesh: Mesh) -> tuple[float, str]:
    """Peak memory in MiB and where it was read.

    GPUs and TPUs report the allocator's peak per device (the largest over this
    process's devices is taken); CPUs report nothing, so the process's peak resident
    set stands in, which includes the whole process (TensorFlow, Python, the batch).
    """
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    peaks = []
    for device in local:
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    if peaks:
        return max(peaks) / 2**20, "device_peak_bytes_in_use"
    return process_peak_rss_mb(), "process_peak_rss"


def default_matmul_size(platform: str) -> int:
    """Big enough to reach the matrix units' rate; the repeat count does the rest."""
    return 2048 if platform == "cpu" else 8192


def measure_matmul(mesh: Mesh, dtype: jnp.dtype, size: int | None) -> dict[str, Any]:
    """The dense matmul rate of the mesh, measured on one of its devices.

    A jitted chain of `count` square products, `count` chosen so one run takes at least
    MATMUL_TARGET_SECONDS; the rate is 2 n^3 count over the median of MATMUL_REPEATS
    runs. It is multiplied by the mesh's compute units: one per device on GPU/TPU, but
    one per process on CPU, whose devices (e.g. --xla_force_host_platform_device_count)
    share the host's cores.
    """
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    size = size or default_matmul_size(device.platform)
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
    # Scaled by 1/sqrt(n): each product keeps the entries' magnitude, so no overflow.
    b = jax.device_put((jax.random.normal(key_b, (size, size), jnp.float32)
                        / math.sqrt(size)).astype(dtype), device)
    count = calibrate_matmul_count(a, b)
    seconds = [time_matmul(a, b, count) for _ in range(MATMUL_REPEATS)]
    one_device_tflops = 2 * size**3 * count / float(np.median(seconds)) / 1e12
    units = (len({d.process_index for d in mesh.devices.flat}) if device.platform == "cpu"
             else mesh.devices.size)
    return {"matmul_size": size, "matmul_dtype": jnp.dtype(dtype).name,
            "matmul_tflops_one_device": one_device_tflops, "matmul_units": units,
            "matmul_tflops": one_device_tflops * units}


@jax.jit
def matmul_chain(a: jax.Array, b: jax.Array, count: jax.Array) -> jax.Array:
    """`a @ b @ b ...` (`count` products); each depends on the last, so none is hoisted."""
    return jax.lax.fori_loop(0, count, lambda _, x: x @ b, a)


def time_matmul(a: jax.Array, b: jax.Array, count: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(matmul_chain(a, b, jnp.int32(count)))
    return time.perf_counter() - start


def calibrate_matmul_count(a: jax.Array, b: jax.Array) -> int:
    """Products per timed run so that one run lasts at least MATMUL_TARGET_SECONDS."""
    time_matmul(a, b, 1)  # compiles; the count is a traced argument, so once for all counts
    one = min(time_matmul(a, b, 1) for _ in range(2))
    return max(1, math.ceil(MATMUL_TARGET_SECONDS / one))


def describe_run(config: ml_collections.ConfigDict, derived: Derived, mesh: Mesh, mode: str,
                 warmup_steps: int, steps: int) -> dict[str, Any]:
    """What was measured and on what: the identifying half of the result."""
    device = mesh.devices.flat[0]
    return {
        "model": config.model,
        "dataset": config.dataset,
        "image_size": config.image_size,
        "global_batch_size": config.batch_size,
        "dtype": derived.compute_dtype,
        "mode": mode,
        "devices": derived.num_devices,
        "processes": derived.num_processes,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "jax_version": jax.__version__,
        "warmup_steps": warmup_steps,
        "steps": steps,
    }


def step_figures(step_seconds: list[float], global_batch_size: int) -> dict[str, float]:
    """Median and 10th/90th percentile step times, and the images/s of the median."""
    median, p10, p90 = np.percentile(step_seconds, [50, 10, 90])
    return {
        "step_time_ms": float(median) * 1e3,
        "step_time_ms_p10": float(p10) * 1e3,
        "step_time_ms_p90": float(p90) * 1e3,
        "images_per_sec": global_batch_size / float(median),
    }


def flop_figures(flops_per_device: float | None, num_devices: int, step_seconds: float,
                 matmul: dict[str, Any]) -> dict[str, Any]:
    """Achieved TFLOP/s of the whole mesh and its ratio to the measured matmul rate."""
    flops_per_step = None if flops_per_device is None else flops_per_device * num_devices
    tflops = None if flops_per_step is None else flops_per_step / step_seconds / 1e12
    mfu = None if tflops is None else tflops / matmul["matmul_tflops"]
    return {"flops_per_step": flops_per_step, "tflops": tflops, **matmul, "mfu": mfu}


def input_figures(input_seconds: list[float], step_seconds: list[float]) -> dict[str, float]:
    """How long each step waited for its batch, and that wait's share of all step time."""
    return {
        "input_wait_ms": float(np.median(input_seconds)) * 1e3,
        "input_bound_ratio": sum(input_seconds) / sum(step_seconds),
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as an aligned two-column table, one figure a line, in the dict's order."""
    width = max(len(name) for name in result)
    return "\n".join(f"{name:<{width}}  {format_value(value)}" for name, value in result.items())


def format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-3):
        return f"{value:.4e}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.4g}"
