"""`bench input`: the pipeline's figures and both floors, measured on the same files."""

import collections
import json
import subprocess
import sys

from conftest import REPO, subprocess_env, tiny_config
from PIL import Image

FIELDS = ("images_per_sec", "device_images_per_sec", "eval_images_per_sec",
          "floor_read_images_per_sec", "floor_decode_images_per_sec", "read_one_reader_per_sec",
          "read_scaling", "host_rss_mb")


def test_bench_input_prints_json_with_pipeline_and_floors(tiny_dataset):
    result = subprocess.run(
        [sys.executable, "-m", "imagenet_jax", "bench", "input", f"--config={REPO}/configs/demo.py",
         f"--config.dataset=folder:{tiny_dataset}", "--config.batch_size=16",
         "--config.image_size=32", "--steps=3", "--repeats=3", "--json"],
        cwd=REPO, env=subprocess_env(2), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for field in FIELDS:
        assert figures[field] > 0, field
    assert figures["images_per_pass"] == 3 * 16 and figures["repeats"] == 3
    assert len(figures["images_per_sec_runs"]) == 3
    # The median of the runs is the figure reported.
    runs = sorted(figures["images_per_sec_runs"])
    assert abs(figures["images_per_sec"] - runs[1]) <= 1e-6 * runs[1]
    # Ratios are medians of per-round ratios.
    assert figures["vs_floor_decode"] == sorted(figures["vs_floor_decode_runs"])[1]
    assert figures["read_scaling"] == sorted(figures["read_scaling_runs"])[1]
    assert figures["source"] == "folder"


def test_bench_input_refuses_synthetic_data():
    result = subprocess.run(
        [sys.executable, "-m", "imagenet_jax", "bench", "input", "--config.dataset=synthetic"],
        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "has no input pipeline to measure" in result.stderr


def test_a_pass_is_timed_to_its_last_element_not_its_tear_down():
    """`prefetch_to_device` releases the tf.data iterator it drains inside its own last
    step: that tear-down (about a second at times) must fall outside the clock."""
    from imagenet_jax.bench.input import time_pass
    from imagenet_jax.data.feeding import prefetch_to_device

    now = [0.0]

    class Batches:  # like a tf.data iterator: slow to release
        def __init__(self):
            self.left = 3

        def __iter__(self):
            return self

        def __next__(self):
            if not self.left:
                raise StopIteration
            self.left -= 1
            now[0] += 1.0  # each batch takes a second
            return self.left

        def __del__(self):
            now[0] += 100.0

    def make():
        return prefetch_to_device(Batches(), 2, lambda batch: batch)

    assert time_pass(make, block=False, clock=lambda: now[0]) == 3.0
    assert now[0] == 103.0  # released, outside the clock


def test_floors_read_and_decode_the_pipelines_images(tiny_dataset, monkeypatch):
    """The read floor reads the bytes of each of the pipeline's images READ_REPEATS times
    and decodes none; the decode floor decodes each of them once, whole; each figure
    counts the images its passes handle. Checked on what the passes yield, each pass
    taking 2 s by a stand-in for the clock's rounds, so no timing decides it."""
    from imagenet_jax.bench import input as bench_input

    passes = {}

    def two_seconds_a_pass(measurements, warmup, repeats):
        passes.update({name: make for name, (make, _) in measurements.items()})
        seconds = {name: [2.0] * repeats for name in measurements}
        return seconds, {name: [1.0] * repeats for name in measurements}, [0.0] * repeats

    monkeypatch.setattr(bench_input, "time_rounds", two_seconds_a_pass)
    config = tiny_config(tiny_dataset, batch_size=16, image_size=32)
    figures = bench_input.bench_input(config, batches=3, repeats=3)
    images = figures["images_per_pass"]
    assert images == 3 * 16
    assert figures["images_per_sec"] == images / 2.0
    assert figures["floor_decode_images_per_sec"] == images / 2.0
    assert figures["floor_read_images_per_sec"] == bench_input.READ_REPEATS * images / 2.0

    files = list((tiny_dataset / "train").rglob("*.JPEG"))
    file_bytes = {path.stat().st_size for path in files}
    file_shapes = {(height, width, 3) for width, height in
                   (Image.open(path).size for path in files)}
    read_batches = list(passes["floor_read_images_per_sec"]())
    assert all(batch.ndim == 1 for batch in read_batches), "the read floor decoded"
    read = [int(length) for batch in read_batches for length in batch]
    assert len(read) == bench_input.READ_REPEATS * images
    assert set(read) <= file_bytes, "the read floor yields each file's length in bytes"
    assert all(count % bench_input.READ_REPEATS == 0
               for count in collections.Counter(read).values())
    decode_batches = list(passes["floor_decode_images_per_sec"]())
    assert all(batch.ndim == 2 and batch.shape[1] == 3 for batch in decode_batches), (
        "the decode floor yields no decoded shapes")
    decoded = [tuple(int(n) for n in shape) for batch in decode_batches for shape in batch]
    assert len(decoded) == images
    assert set(decoded) <= file_shapes, "the decode floor yields each image's decoded shape"
