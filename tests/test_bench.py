"""`bench train`: every figure present and sane, both modes; and the train loop compiles once.

Figures are checked against what is known without a clock (ResNet-tiny's FLOPs counted by
hand, the batch, the devices, a wait put into the pipeline), never against a speed:
performance is measured by benchmarks, never asserted in tests.
"""

import collections
import contextlib
import json
import math
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, subprocess_env, tiny_config

from imagenet_jax import run_dir
from imagenet_jax.bench.train import bench_train, format_table
from imagenet_jax.data import loader
from imagenet_jax.errors import ConfigError
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


def _assert_complete(result, *, global_batch_size: int, image_size: int, devices: int):
    """Every figure present, finite and positive; and the FLOP figures those of ResNet-tiny's
    step at this batch and size, as counted by hand from its layers (`train_flop_bounds`).

    Step time cancels out of the two rates' ratios: images/s against TFLOP/s, and against
    MFU times the matmul rate, give the FLOPs of one image, the same whatever the timing.
    MFU is not bounded by 1 here: that is a timing too, and on a shared 2-core machine the
    rate of a few short matmuls swings 2x between runs (ResNet-tiny at 32 px reached 0.66).
    """
    for key in REQUIRED_POSITIVE:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    for key in DESCRIPTIVE:
        assert result[key] not in (None, ""), key
    assert result["step_time_ms_p10"] <= result["step_time_ms"] <= result["step_time_ms_p90"]
    assert (result["global_batch_size"], result["image_size"], result["devices"]) == (
        global_batch_size, image_size, devices)
    assert result["model"] == "resnet_tiny"
    low, high = train_flop_bounds(image_size, NUM_CLASSES)
    per_image = {
        "flops_per_step": result["flops_per_step"] / global_batch_size,
        "tflops over images_per_sec": result["tflops"] * 1e12 / result["images_per_sec"],
        "mfu x matmul_tflops over images_per_sec":
            result["mfu"] * result["matmul_tflops"] * 1e12 / result["images_per_sec"],
    }
    for name, flops in per_image.items():
        assert low <= flops <= high, (name, f"{flops:.4g} FLOPs an image, expected "
                                            f"{low:.4g} to {high:.4g}")


NUM_CLASSES = 10  # the tiny dataset's
RESNET_TINY_STAGES = (16, 32, 64, 128)  # one BasicBlock a stage; stride 2 from the second


def _conv_taps(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """A convolution along one axis with padding kernel // 2: (output positions, products
    that fall on the input rather than on its zero padding, summed over the outputs)."""
    pad = kernel // 2
    outputs = (size + 2 * pad - kernel) // stride + 1
    taps = sum(1 for j in range(outputs) for t in range(kernel)
               if 0 <= j * stride - pad + t < size)
    return outputs, taps


def train_flop_bounds(image_size: int, num_classes: int) -> tuple[float, float]:
    """FLOPs of one image in a train step of ResNet-tiny (models/resnet.py: a 3x3 stem of
    16 channels at stride 1, then RESNET_TINY_STAGES), from its convolutions and classifier
    alone: each multiply-add is 2 FLOPs and happens three times (forward, the input's
    gradient, the weights' gradient).

    Low: 0.9x the products on the image only (XLA's cost analysis skips those on the zero
    padding, and the stem needs no input gradient). High: 1.25x every product, padding
    included, leaving room for BatchNorm, ReLU, the loss and, replicated on each of 8
    devices, the optimizer update (together 5-18% at these sizes).
    """
    convs = [(image_size, 3, 1, 3, RESNET_TINY_STAGES[0])]  # (input size, k, stride, in, out)
    size, channels = image_size, RESNET_TINY_STAGES[0]
    for i, planes in enumerate(RESNET_TINY_STAGES):
        stride = 1 if i == 0 else 2
        outputs, _ = _conv_taps(size, 3, stride)
        convs += [(size, 3, stride, channels, planes), (outputs, 3, 1, planes, planes)]
        if stride != 1 or channels != planes:
            convs.append((size, 1, stride, channels, planes))  # the projection shortcut
        size, channels = outputs, planes
    on_image = on_all = channels * num_classes
    for size, kernel, stride, inputs, outputs in convs:
        positions, taps = _conv_taps(size, kernel, stride)
        on_image += taps**2 * inputs * outputs
        on_all += positions**2 * kernel**2 * inputs * outputs
    return 0.9 * 2 * 3 * on_image, 1.25 * 2 * 3 * on_all


@pytest.fixture(scope="module")
def synthetic_on_8(tiny_dataset):
    """One synthetic bench over the 8 fake devices, and the compilations it made."""
    with count_compilations() as counts:
        result = _bench(tiny_config(tiny_dataset, batch_size=16))
    return result, counts


@pytest.fixture(scope="module")
def synthetic_on_1(tiny_dataset):
    """The same bench on one device."""
    config = tiny_config(tiny_dataset, batch_size=16)
    config.mesh.data = 1
    return _bench(config)


def test_synthetic_on_8_devices(synthetic_on_8):
    result, counts = synthetic_on_8
    # Compiled ahead, never in the timed loop: once cold, and once by a second train step
    # built for the warm figure, which the persistent cache answers (JAX's compile event
    # covers a cache load too).
    assert counts["train_step"] == 2, dict(counts)
    assert result["compile_warm_cache_hit"] and result["compile_warm_s"] > 0
    _assert_complete(result, global_batch_size=16, image_size=16, devices=8)
    assert result["mode"] == "synthetic"
    assert result["platform"] == "cpu" and result["jax_version"] == jax.__version__
    # The 8 fake CPU devices share the host's cores: the matmul rate counts them once.
    assert result["matmul_units"] == 1
    assert result["matmul_tflops"] == result["matmul_tflops_one_device"]


def test_flops_count_the_whole_mesh(synthetic_on_8, synthetic_on_1):
    """XLA's cost analysis describes the per-device program; the result scales it back up.

    Not exactly equal: with the state replicated, each of the 8 devices runs the whole
    optimizer update, which is large next to ResNet-tiny's 2 images a device at 16 px.
    Left per device, the 8-device figure would read about 1/8 of the 1-device one.
    """
    on_8, _ = synthetic_on_8
    on_1 = synthetic_on_1
    assert on_1["devices"] == 1
    assert on_1["flops_per_step"] <= on_8["flops_per_step"] <= 1.5 * on_1["flops_per_step"]


INPUT_DELAY_S = 0.02  # added to each batch the pipeline hands out: a wait the bench must see


class SlowCountedBatches:
    """The train loop's batches (data/loader.py's `train_batches`), each handed out
    INPUT_DELAY_S late, with the labels of each batch handed out and whether it was closed."""

    def __init__(self, batches):
        self.batches, self.labels, self.closed = batches, [], False

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        time.sleep(INPUT_DELAY_S)
        self.labels.append(np.asarray(batch["label"]))
        return batch

    def close(self):
        self.closed = True
        self.batches.close()


def test_pipeline_mode_on_one_device(tiny_dataset, monkeypatch):
    """Each step, warm-up and timed, takes a new batch of the train loop's pipeline, and
    the time spent waiting for it is what input_wait_ms reports; the pipeline is closed."""
    opened = []
    train_batches = loader.train_batches

    def slow_train_batches(*args, **kwargs):
        opened.append(SlowCountedBatches(train_batches(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(loader, "train_batches", slow_train_batches)
    config = tiny_config(tiny_dataset, image_size=32, batch_size=8)
    config.mesh.data = 1
    result = _bench(config, mode="pipeline", goodput=True)  # through the loop's accounting
    _assert_complete(result, global_batch_size=8, image_size=32, devices=1)
    assert result["mode"] == "pipeline" and result["goodput_accounting"] is True
    assert len(opened) == 1, f"the train loop's pipeline opened {len(opened)} times, not once"
    (pipeline,) = opened
    assert pipeline.closed
    # The first batch compiles the step and runs the one warm-up step; 3 timed steps follow.
    assert len(pipeline.labels) == 1 + 3, "a step without a batch of its own"
    assert all(labels.shape == (8,) and set(labels) <= set(range(NUM_CLASSES))
               for labels in pipeline.labels)
    assert len({tuple(labels) for labels in pipeline.labels}) > 1, "one batch over and over"
    # Every step waited INPUT_DELAY_S at least for its batch, and its time holds that wait.
    assert result["input_wait_ms"] >= 1e3 * INPUT_DELAY_S
    assert result["step_time_ms_p10"] >= 1e3 * INPUT_DELAY_S
    assert result["step_time_ms"] >= result["input_wait_ms"]
    assert 0 < result["input_bound_ratio"] <= 1


def test_table_and_json_hold_every_figure(synthetic_on_1):
    result = synthetic_on_1
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
    # Where its time went: every category the run had is there, and they add up to its
    # wall time, in the run's final record as in its attempt's own figures.
    final = run_dir.read_records(tmp_path / "run")[-1]
    assert final["split"] == "goodput" and final["step"] == 24
    for category in ("training", "startup", "compile", "eval", "checkpoint", "other"):
        assert final[f"{category}_s"] > 0, category
    shares = [final["goodput_pct"]] + [v for k, v in final.items()
                                       if k.endswith("_pct") and k != "goodput_pct"]
    assert sum(shares) == pytest.approx(100.0, abs=0.01)
    assert sum(final["attempt_seconds"].values()) == pytest.approx(final["attempt_wall_s"],
                                                                  abs=1e-3)


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
