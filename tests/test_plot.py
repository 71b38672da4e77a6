"""`imagenet-jax plot` and the wall time metrics.jsonl records it draws against."""

import json
import types

import numpy as np
import pytest
from matplotlib import colors, image
from matplotlib.figure import Figure

from imagenet_jax import metric_writers
from imagenet_jax.metric_writers import MetricsLogger
from imagenet_jax.plot import plot_runs, run_names
from imagenet_jax.run_dir import read_records

# Each panel's title: (the metric drawn, against what).
PANELS = {"loss": ("loss", "step"), "top-1": ("top1", "step"), "top-5": ("top5", "step"),
          "loss against time": ("loss", "time"), "top-1 against time": ("top1", "time"),
          "learning rate": ("learning_rate", "step")}


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
                record["time"] = step * 1.5 + 7  # not the step, nor a multiple of it
            lines.append(json.dumps(record))
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def drawn_lines(figure) -> dict[str, dict[str, tuple[list, list]]]:
    """Each curve panel's lines, by title: label -> (x data, y data)."""
    return {axis.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                               for line in axis.lines}
            for axis in figure.axes if axis.get_title() in PANELS}


def expected_lines(runs: dict[str, list[int]], timed: set[str]):
    """What each panel must draw of the runs `write_run` wrote (name -> steps), those in
    `timed` with a "time": run split -> (x data, y data)."""
    metric = {"loss": lambda step: 2.0 / step, "top1": lambda step: step / 100,
              "top5": lambda step: min(1.0, step / 50), "learning_rate": lambda step: 0.1}
    axis = {"step": lambda step: step, "time": lambda step: step * 1.5 + 7}
    panels = {}
    for title, (name, x) in PANELS.items():
        panels[title] = {
            f"{run} {split}": ([axis[x](step) for step in steps],
                               [metric[name](step) for step in steps])
            for run, steps in runs.items() for split in ("train", "val")
            if (x == "step" or run in timed) and (name != "learning_rate" or split == "train")}
    return panels


def test_plot_overlays_runs_and_names_them(tmp_path, monkeypatch):
    saved = []  # the figures plot_runs saves
    savefig = Figure.savefig

    def keep_figure(figure, *args, **kwargs):
        saved.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_figure)
    write_run(tmp_path / "a" / "run", [10, 20, 30])
    write_run(tmp_path / "b" / "run", [10, 20], with_time=False)  # written before "time"
    out = tmp_path / "curves.png"
    result = plot_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"], out)
    assert result["runs"] == {"a/run": 6, "b/run": 4}
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # Every record drawn where it belongs, the time panels against the records' "time"
    # (run b has none: nothing of it there).
    (figure,) = saved
    drawn = drawn_lines(figure)
    assert drawn == expected_lines({"a/run": [10, 20, 30], "b/run": [10, 20]}, {"a/run"})
    assert drawn["loss against time"]["a/run train"][0] == [22.0, 37.0, 52.0]
    assert set(drawn["top-1 against time"]) == {"a/run train", "a/run val"}
    # The file holds the drawing: the figure's size, each run's lines in its own colour.
    pixels = image.imread(out)[..., :3]
    assert pixels.shape[:2] == (560, 1360)  # 17 x 7 inches at 80 dpi
    for colour in ("C0", "C1"):
        rgb = np.float32(colors.to_rgb(colour))
        assert np.sum(np.all(np.abs(pixels - rgb) < 0.02, axis=-1)) > 200, colour

    # Neither run has goodput records: the breakdown panel says so.
    (breakdown,) = [a for a in figure.axes if a.get_title().startswith("where the time went")]
    assert [t.get_text() for t in breakdown.texts] == ["no goodput records in these runs"]

    assert run_names(["x/demo", "y/other"]) == ["demo", "other"]
    with pytest.raises(ValueError, match="has no records"):
        plot_runs([tmp_path / "empty"], out)


def test_records_carry_the_time_the_run_has_been_running(tmp_path, monkeypatch):
    clock = [100.0]  # time.monotonic() as metric_writers.py reads it, moved on by the test
    monkeypatch.setattr(metric_writers, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    logger = MetricsLogger(tmp_path, resume_step=0)
    clock[0] = 102.5
    logger.log(1, "train", {"loss": 1.0})
    clock[0] = 104.0
    logger.log(2, "train", {"loss": 0.5})
    logger.close()
    times = [r["time"] for r in read_records(tmp_path)]
    assert times == [2.5, 4.0]
    # A resumed run goes on from its last kept record's time, its downtime not counted.
    records = read_records(tmp_path)
    records[1]["time"] = 1000.0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    clock[0] = 5000.0  # the run was down for over an hour
    logger = MetricsLogger(tmp_path, resume_step=2)
    clock[0] = 5007.25
    logger.log(3, "train", {"loss": 0.25})
    logger.close()
    assert [r["time"] for r in read_records(tmp_path)] == [2.5, 1000.0, 1007.25]


def test_the_breakdown_panel_stacks_the_first_timed_run_shares_over_its_wall_time(
        tmp_path, monkeypatch):
    saved = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda figure, *a, **k: saved.append(figure) or savefig(figure, *a, **k))
    write_run(tmp_path / "untimed", [10, 20])
    write_run(tmp_path / "timed", [10, 20])
    shares = [{"goodput_pct": 50.0, "compile_pct": 40.0, "startup_pct": 10.0, "wall_s": 30.0},
              {"goodput_pct": 80.0, "compile_pct": 12.0, "startup_pct": 3.0, "input_wait_pct": 5.0,
               "wall_s": 100.0}]
    with (tmp_path / "timed" / "metrics.jsonl").open("a") as file:
        for step, figures in zip((10, 20), shares, strict=True):
            file.write(json.dumps({"step": step, "split": "goodput", **figures}) + "\n")
    plot_runs([tmp_path / "untimed", tmp_path / "timed"], tmp_path / "out.png")
    (figure,) = saved
    (axis,) = [a for a in figure.axes if a.get_title().startswith("where the time went")]
    assert axis.get_title() == "where the time went: timed"
    layers = axis.collections  # one filled layer per category, goodput at the bottom
    assert len(layers) == 10 and layers[0].get_label() == "goodput"
    top = layers[-1].get_paths()[0].vertices  # the last layer's outline reaches the total
    assert {(x, y) for x, y in top if x in (30.0, 100.0)} >= {(30.0, 100.0), (100.0, 100.0)}
