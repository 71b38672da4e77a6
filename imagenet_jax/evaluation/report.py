"""What `imagenet-jax eval` leaves behind: WORKDIR/eval/STEP.json, a reliability diagram
per set (WORKDIR/eval/STEP.SET.reliability.png), and the table it prints."""

from __future__ import annotations

import io
import json
import math
import re

from etils import epath

from imagenet_jax import storage


def json_safe(value):
    """`value` with NaN and infinities as null: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def slug(name: str) -> str:
    """A set's name as a file name: 'tfds:imagenet_v2/matched-frequency' ->
    'tfds_imagenet_v2_matched-frequency'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def write(directory: epath.Path, result: dict) -> None:
    """WORKDIR/eval/STEP.json (replaced whole) and each set's reliability diagram."""
    if not storage.is_url(directory):
        directory.mkdir(parents=True, exist_ok=True)
    step = result["step"]
    for set_result in result["sets"]:
        path = directory / f"{step}.{slug(set_result['name'])}.reliability.png"
        path.write_bytes(reliability_png(set_result))
        set_result["reliability"]["png"] = str(path)
    storage.write_atomically(directory / f"{step}.json",
                             json.dumps(json_safe(result), indent=1) + "\n")


def reliability_png(set_result: dict) -> bytes:
    """A reliability diagram (Guo et al. 2017, Fig. 1): each confidence bin's accuracy
    against the diagonal of perfect calibration, with how many examples each bin holds."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    bins = set_result["reliability"]
    edges = bins["edges"]
    width = edges[1] - edges[0]
    accuracy = [a if a is not None else 0.0 for a in bins["accuracy"]]
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(edges[:-1], accuracy, width=width, align="edge", edgecolor="black",
            color="tab:blue", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("top-1 accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(f"{set_result['name']}: ECE {set_result['ece']:.4f}", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(edges[:-1], bins["counts"], width=width, align="edge", edgecolor="black",
               color="tab:gray")
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("examples")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def format_table(result: dict) -> str:
    """The sets side by side, then each set's worst classes."""
    header = (f"{'set':<40} {'examples':>9} {'top-1':>7} {'top-5':>7} {'drop':>6} "
              f"{'NLL':>7} {'ECE':>7} {'severity':>8} {'HD@5':>6}")
    lines = [f"Step {result['step']} of {result['workdir']}", header, "-" * len(header)]
    for r in result["sets"]:
        severity = r["mistake_severity"] or {}
        drop = r.get("top1_drop")
        lines.append(
            f"{r['name'][:40]:<40} {r['num_examples']:>9,} {_pct(r['top1']):>7} "
            f"{_pct(r['top5']):>7} {'' if drop is None else _pct(drop):>6} "
            f"{_num(r['nll']):>7} {_num(r['ece']):>7} {_num(severity.get('mean'), 2):>8} "
            f"{_num(severity.get('hierarchical_distance_at_5'), 2):>6}")
    lines.append("top-1/top-5 in %; drop: top-1 below the first validation set (ImageNetV2); "
                 "severity: mean WordNet LCA height of top-1 mistakes; HD@5: mean LCA height "
                 "of the top 5 (Bertinetto et al. 2020); ReaL sets: top-k against ReaL labels.")
    for r in result["sets"]:
        worst = ", ".join(f"{w['name']} ({w['class']}) {_pct(w['top1'])}"
                          for w in r["worst_classes"])
        lines.append(f"{r['name']}: worst classes: {worst}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"
