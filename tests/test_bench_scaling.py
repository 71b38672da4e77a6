"""`bench scaling`: one row per device count, every figure present and positive.

Performance is never asserted: on fake CPU devices it measures the shared host.
"""

import json
import math

import pytest
from conftest import tiny_config

from imagenet_jax.bench.scaling import bench_scaling, format_scaling_table
from imagenet_jax.errors import ConfigError

POSITIVE = ("step_time_ms", "step_time_ms_p10", "step_time_ms_p90", "images_per_sec",
            "compile_s", "efficiency")


def test_rows_hold_every_figure_at_a_fixed_per_device_batch(tiny_dataset):
    config = tiny_config(tiny_dataset, batch_size=8)
    result = bench_scaling(config, device_counts=(2, 1), steps=2, warmup_steps=1)
    rows = result["rows"]
    assert [row["devices"] for row in rows] == [1, 2]
    assert [row["global_batch"] for row in rows] == [4, 8]  # batch_size is the global at 2
    assert result["per_device_batch"] == 4 and all(r["per_device_batch"] == 4 for r in rows)
    for row in rows:
        for key in POSITIVE:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0
        assert row["images_per_sec"] == pytest.approx(
            row["global_batch"] / (row["step_time_ms"] / 1e3))
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["efficiency"] == pytest.approx(
        rows[1]["images_per_sec"] / (2 * rows[0]["images_per_sec"]))
    assert "share the host's cores" in result["note"]
    assert json.loads(json.dumps(result)) == result
    table = format_scaling_table(result).splitlines()
    assert "weak scaling" in table[0] and "efficiency" in table[2]
    assert [line.split()[0] for line in table[3:]] == ["1", "2"]


@pytest.mark.parametrize("kwargs,message", [
    ({"device_counts": (1, 16)}, "each must be an integer from 1 to the 8 devices"),
    ({"device_counts": (3,)}, "must be a multiple of 3"),
    ({"steps": 0}, "steps must be a positive integer"),
])
def test_bad_arguments_fail_before_anything_runs(tiny_dataset, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        bench_scaling(tiny_config(tiny_dataset, batch_size=8), **kwargs)
