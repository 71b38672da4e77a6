"""`bench train`: every figure present and sane, both modes; and the train loop compiles once.

Figures are checked for presence and consistency only: performance is measured by
benchmarks, never asserted in tests.
"""

import collections
import contextlib
import json
import math
import subprocess
import sys

import jax
import pytest
from conftest import REPO, subprocess_env, tiny_config

from imagenet_jax.bench.train import bench_train, format_table
from imagenet_jax.config import ConfigError
from imagenet_jax.train import loop

REQUIRED_POSITIVE = ("images_per_sec", "step_time_ms", "step_time_ms_p10", "step_time_ms_p90",
                     "compile_s", "flops_per_step", "tflops", "matmul_tflops", "mfu",
                     "peak_memory_mb")
DESCRIPTIVE = ("model", "image_size", "global_batch_size", "dtype", "devices", "platform",
               "device_kind", "mode", "jax_version", "peak_memory_source")
SMALL_MATMUL = 256  # the rate is not under test; keep its timing short on shared CPUs


# JAX records every XLA compilation under this event, with the jitted function's name.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations():
    """Counts XLA compilations by function name while the block runs."""
    counts = collections.Counter()

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            # 'jit(train_step)': jit names the partial after the function it wraps.
            name = kwargs.get("fun_name", "?")
            counts[name.removeprefix("jit(").removesuffix(")")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _bench(config, **kwargs):
    return bench_train(config, warmup_steps=1, steps=3, matmul_size=SMALL_MATMUL, **kwargs)


def _assert_complete(result):
    for key in REQUIRED_POSITIVE:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    for key in DESCRIPTIVE:
        assert result[key] not in (None, ""), key
    assert result["step_time_ms_p10"] <= result["step_time_ms"] <= result["step_time_ms_p90"]
    assert result["mfu"] == pytest.approx(result["tflops"] / result["matmul_tflops"], rel=1e-9)
    step_seconds = result["step_time_ms"] / 1e3
    assert result["images_per_sec"] == pytest.approx(result["global_batch_size"] / step_seconds)
    assert result["tflops"] == pytest.approx(result["flops_per_step"] / step_seconds / 1e12)


@pytest.fixture(scope="module")
def synthetic_on_8(tiny_dataset):
    """One synthetic bench over the 8 fake devices, and the compilations it made."""
    with count_compilations() as counts:
        result = _bench(tiny_config(tiny_dataset, batch_size=16))
    return result, counts


def test_synthetic_on_8_devices(synthetic_on_8):
    result, counts = synthetic_on_8
    # Compiled ahead, never in the timed loop: once cold, and once by a second train step
    # built for the warm figure, which the persistent cache answers (JAX's compile event
    # covers a cache load too).
    assert counts["train_step"] == 2, dict(counts)
    assert result["compile_warm_cache_hit"] and result["compile_warm_s"] > 0
    _assert_complete(result)
    assert result["mode"] == "synthetic"
    assert result["devices"] == 8 and result["global_batch_size"] == 16
    assert result["model"] == "resnet_tiny" and result["image_size"] == 16
    assert result["platform"] == "cpu" and result["jax_version"] == jax.__version__
    # The 8 fake CPU devices share the host's cores: the matmul rate counts them once.
    assert result["matmul_units"] == 1
    assert result["matmul_tflops"] == result["matmul_tflops_one_device"]


def test_flops_count_the_whole_mesh(tiny_dataset, synthetic_on_8):
    """XLA's cost analysis describes the per-device program; the result scales it back up.

    Not exactly equal: with the state replicated, each of the 8 devices runs the whole
    optimizer update, which is large next to ResNet-tiny's 2 images a device at 16 px.
    Left per device, the 8-device figure would read about 1/8 of the 1-device one.
    """
    on_8, _ = synthetic_on_8
    config = tiny_config(tiny_dataset, batch_size=16)
    config.mesh.data = 1
    on_1 = _bench(config)
    assert on_1["devices"] == 1
    assert on_1["flops_per_step"] <= on_8["flops_per_step"] <= 1.5 * on_1["flops_per_step"]


def test_pipeline_mode_on_one_device(tiny_dataset):
    config = tiny_config(tiny_dataset, image_size=32, batch_size=8)
    config.mesh.data = 1
    result = _bench(config, mode="pipeline")
    _assert_complete(result)
    assert result["mode"] == "pipeline" and result["devices"] == 1
    assert result["image_size"] == 32
    assert 0 <= result["input_bound_ratio"] <= 1
    assert result["input_wait_ms"] >= 0


def test_table_and_json_hold_every_figure(tiny_dataset):
    config = tiny_config(tiny_dataset, batch_size=8)
    config.mesh.data = 1
    result = _bench(config)
    table = format_table(result).splitlines()
    assert [line.split()[0] for line in table] == list(result)
    value_column = max(len(name) for name in result) + 2
    assert all(line[value_column - 1] == " " and line[value_column] != " " for line in table)
    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "synthetc"}, "unknown bench mode 'synthetc'; valid modes: synthetic, pipeline"),
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"warmup_steps": -1}, "warmup_steps must be a non-negative integer, got -1"),
])
def test_bad_arguments_fail_before_anything_runs(tiny_dataset, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        bench_train(tiny_config(tiny_dataset), **kwargs)


def test_train_loop_compiles_each_step_once(tiny_dataset, tmp_path):
    """Interleaved evals, logs and a profile must not recompile the train or eval step;
    progressive resizing compiles the train step once per size.

    400 train examples at batch 32: 12 steps an epoch, 24 in all (epoch 0 at 12 px,
    epoch 1 at 16), an eval every 6 steps (always at 16 px; the last eval batch padded:
    70 examples at 16), a log every 3, step 6 traced by the profiler.
    """
    config = tiny_config(tiny_dataset, num_epochs=2.0, eval_every_epochs=0.5,
                         log_every_steps=3, checkpoint_every_steps=100,
                         profile_start_step=6, profile_num_steps=1)
    config.progressive_resize.update(start_size=12, end_size=16, start_epoch=0.0,
                                     end_epoch=1.0, step=4)
    config.mesh.data = 1  # a trace of 8 fake devices costs ~9 s more on 2 cores
    with count_compilations() as counts:
        result = loop.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 24 and result["num_examples"] == 70
    assert counts["train_step"] == 2, dict(counts)  # 12 px and 16 px
    assert counts["eval_step"] == 1, dict(counts)
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1, traces
    assert b"train_step" in traces[0].read_bytes(), "the trace holds the step's execution"


def test_profile_window_is_what_the_run_has_left(tmp_path):
    window = lambda first, count, start, end: loop.StepProfiler(  # noqa: E731
        tmp_path, first, count, start, end).steps
    assert window(10, 5, 0, 100) == range(10, 15)
    assert window(10, 5, 12, 100) == range(13, 15), "a resumed run traces what is left"
    assert window(10, 5, 0, 12) == range(10, 13), "clamped to the run's last step"
    assert not window(10, 5, 20, 100) and not window(200, 5, 0, 100)
    assert not window(10, 0, 0, 100), "0 steps: off"


def test_bench_train_on_synthetic_data_runs_without_tensorflow():
    """The GPU check runs on machines that have JAX and its libraries but no TensorFlow
    (the input pipeline's library) and no dataset: nothing on that path may import it,
    and a config naming ImageNet still times its step, on ImageNet's shape."""
    argv = ["imagenet-jax", "bench", "train", "--config=configs/demo.py",
            "--config.dataset=tfds:imagenet2012", "--config.batch_size=8",
            "--config.mesh.data=1", "--steps=2", "--warmup_steps=1", "--json"]
    code = ("import sys; sys.modules.update(tensorflow=None, tensorflow_datasets=None); "
            f"sys.argv = {argv!r}; from imagenet_jax.cli import run; run()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(1),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["mode"] == "synthetic" and row["images_per_sec"] > 0
    assert row["dataset"] == "synthetic" and "cannot be opened here" in result.stderr
