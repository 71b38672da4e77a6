"""`imagenet-jax plot`: a picture of one or more runs from their metrics.jsonl.

Loss, top-1 and top-5 (train and val) against steps; loss and top-1 against the time the
run was running; the learning rate; where the run's wall time went (its goodput records:
the share of each category, stacked, over the run's life). Several runs are overlaid,
one colour each, named by their workdirs; the time breakdown is the first run's that has
one. Records written before metrics.jsonl had a "time" leave the time panels empty for
that run.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from imagenet_jax import storage
from imagenet_jax.run_dir import read_records

# The time breakdown's layers, bottom up (goodput records' "<name>_pct"), and their names.
BREAKDOWN = (("goodput", "goodput"), ("compile", "compile"), ("startup", "start-up"),
             ("input_wait", "input wait"), ("eval", "eval"), ("checkpoint", "checkpoints"),
             ("restore", "restore"), ("lost_work", "lost work"), ("downtime", "downtime"),
             ("other", "other"))
BREAKDOWN_TITLE = "where the time went"

PANELS = (  # (metric, x axis, title)
    ("loss", "step", "loss"), ("top1", "step", "top-1"), ("top5", "step", "top-5"),
    ("loss", "time", "loss against time"), ("top1", "time", "top-1 against time"),
    ("learning_rate", "step", "learning rate"),
)


def run_names(workdirs: Sequence[str | os.PathLike]) -> list[str]:
    """Each workdir's last path component, or more of its path where two share it."""
    parts = [Path(str(w).rstrip("/")).parts for w in workdirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(w) for w in workdirs]


def plot_runs(workdirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Draws the runs in `workdirs` into the PNG `out`; returns what was drawn. Raises
    ValueError for a workdir without records."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    runs = {}
    for name, workdir in zip(run_names(workdirs), workdirs, strict=True):
        records = read_records(workdir)
        if not records:
            raise ValueError(f"{workdir} has no records (no metrics.jsonl, or an empty one)")
        runs[name] = records
    figure, axes = plt.subplots(2, 4, figsize=(17, 7))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (metric, x, title) in zip(axes.flat, PANELS, strict=False):
        for i, (name, records) in enumerate(runs.items()):
            for split, style in (("train", "-"), ("val", "o--")):
                points = [(r[x], r[metric]) for r in records
                          if r["split"] == split and x in r and metric in r]
                if points:
                    xs, ys = zip(*points, strict=True)
                    axis.plot(xs, ys, style, color=colours[i % len(colours)], markersize=3,
                              label=f"{name} {split}")
        if not axis.lines:
            axis.text(0.5, 0.5, f"no {x} in these records", ha="center", va="center",
                      transform=axis.transAxes, color="gray")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("seconds running" if x == "time" else "step")
        axis.grid(alpha=0.3)
        if metric in ("top1", "top5"):
            axis.set_ylim(0, 1)
    draw_breakdown(axes.flat[len(PANELS)], runs)
    axes.flat[len(PANELS) + 1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    out = storage.as_path(out)
    out.write_bytes(buffer.getvalue())
    return {"out": os.fspath(out), "runs": {name: len(r) for name, r in runs.items()}}


def draw_breakdown(axis, runs: dict[str, list[dict]]) -> None:
    """The first run's goodput records as stacked shares of its wall time, against the
    wall time so far (attempts and downtime included)."""
    axis.set_title(BREAKDOWN_TITLE, fontsize=10)
    named = [(name, [r for r in records if r["split"] == "goodput" and "wall_s" in r])
             for name, records in runs.items()]
    name, records = next(((n, r) for n, r in named if r), (None, []))
    if not records:
        axis.text(0.5, 0.5, "no goodput records in these runs", ha="center", va="center",
                  transform=axis.transAxes, color="gray")
        return
    wall = [r["wall_s"] for r in records]
    layers = [[r.get(f"{key}_pct", 0.0) for r in records] for key, _ in BREAKDOWN]
    axis.stackplot(wall, layers, labels=[label for _, label in BREAKDOWN], alpha=0.85)
    axis.set_title(f"{BREAKDOWN_TITLE}: {name}", fontsize=10)
    axis.set_xlabel("seconds of wall time")
    axis.set_ylabel("% of wall time")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
