"""`imagenet-jax plot` and the wall time metrics.jsonl records it draws against."""

import json

import pytest

from imagenet_jax.metrics import MetricsLogger, read_records
from imagenet_jax.plot import plot_runs, run_names


def write_run(workdir, steps, with_time=True):
    workdir.mkdir(parents=True)
    lines = []
    for step in steps:
        for split in ("train", "val"):
            record = {"step": step, "split": split, "loss": 2.0 / step, "top1": step / 100,
                      "top5": min(1.0, step / 50)}
            if split == "train":
                record["learning_rate"] = 0.1
            if with_time:
                record["time"] = step * 1.5
            lines.append(json.dumps(record))
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_overlays_runs_and_names_them(tmp_path):
    write_run(tmp_path / "a" / "run", [10, 20, 30])
    write_run(tmp_path / "b" / "run", [10, 20], with_time=False)  # written before "time"
    out = tmp_path / "curves.png"
    result = plot_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"], out)
    assert result["runs"] == {"a/run": 6, "b/run": 4}
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert run_names(["x/demo", "y/other"]) == ["demo", "other"]
    with pytest.raises(ValueError, match="has no records"):
        plot_runs([tmp_path / "empty"], out)


def test_records_carry_the_time_the_run_has_been_running(tmp_path):
    logger = MetricsLogger(tmp_path, resume_step=0)
    logger.log(1, "train", {"loss": 1.0})
    logger.log(2, "train", {"loss": 0.5})
    logger.close()
    times = [r["time"] for r in read_records(tmp_path)]
    assert 0 <= times[0] <= times[1]
    # A resumed run goes on from its last kept record's time, its downtime not counted.
    records = read_records(tmp_path)
    records[1]["time"] = 1000.0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    logger = MetricsLogger(tmp_path, resume_step=2)
    logger.log(3, "train", {"loss": 0.25})
    logger.close()
    assert read_records(tmp_path)[-1]["time"] >= 1000.0
