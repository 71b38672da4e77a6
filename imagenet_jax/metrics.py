"""Where metrics go: CLU writers (TensorBoard events and the console) and metrics.jsonl.

`metrics.jsonl` holds one JSON object per logged record, e.g.
`{"step": 400, "split": "val", "loss": 0.41, "top1": 0.93, "top5": 0.99, ...}`,
so that any tool can read a run. Only process 0 writes files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, workdir: str | Path, *, resume_step: int = 0):
        self.is_writer = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(
            str(workdir), just_logging=not self.is_writer, asynchronous=True)
        self.path = Path(workdir) / METRICS_FILE
        if self.is_writer:
            truncate_after(self.path, resume_step)

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        scalars = {k: v if isinstance(v, int) else float(np.asarray(v)) for k, v in metrics.items()}
        self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
        if self.is_writer:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Drops records past `step`: a resumed run rewrites them, so each step appears once."""
    records = read_records(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) != len(records):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
