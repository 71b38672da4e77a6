"""`bench input`: the pipeline's figures and both floors, measured on the same files."""

import json
import subprocess
import sys

from conftest import REPO, subprocess_env

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
    # Reading bytes is cheaper than reading and decoding them, whatever the noise.
    assert figures["floor_read_images_per_sec"] > figures["floor_decode_images_per_sec"]


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
