"""Where metrics go: CLU writers (TensorBoard events and the console) and metrics.jsonl.

`metrics.jsonl` holds one JSON object per logged record, e.g.
`{"step": 400, "split": "val", "loss": 0.41, "top1": 0.93, "top5": 0.99, ..., "time": 81.2}`
(time: seconds the run had been running), so that any tool can read a run:
`run_dir.read_records(workdir)`, `imagenet-jax plot`. Only process 0 writes files.

Object stores have no append, so the file is never appended to: process 0 keeps the
run's records and replaces the whole file at each record, all at once (an upload, or a
local write and rename). Whatever kills the run, the file holds whole records.

Each record carries its "attempt" (1, then 2 for the first resumed run, ...), and an
attempt's first record the step it "resumed_from". A resumed run keeps the records of the
attempts before it, those past its checkpoint included (they say how much work was lost:
train/goodput.py); `run_dir.read_records` leaves those out, so that each (step, split)
is read once. The file stays small: 100 bytes or so a record (a goodput record, one per
log and checkpoint, about 1 KB), a few MB for a 90-epoch ImageNet run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from imagenet_jax import run_dir, storage


class MetricsLogger:
    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0):
        self.is_writer = jax.process_index() == 0
        workdir = storage.as_path(workdir)
        events = self.is_writer and _tensorboard_can_write(workdir)
        self.writer = metric_writers.create_default_writer(
            os.fspath(workdir), just_logging=not events, asynchronous=True)
        self.path = run_dir.metrics(workdir)
        self.resume_step = resume_step
        self._lines: list[str] = []
        # Each record's "time": seconds the run has been running, carried on by a resumed
        # run from its last kept record (the time it was down is not counted).
        self._started, self._time_before = time.monotonic(), 0.0
        self.history: list[dict] = []  # every record of the attempts before this one
        if self.is_writer:
            self.history = run_dir.read_records(workdir, every_attempt=True)
            self._lines = [json.dumps(r) + "\n" for r in self.history]
            kept = [r for r in run_dir.kept_records(self.history) if r["step"] <= resume_step]
            self._time_before = max((r.get("time", 0.0) for r in kept), default=0.0)
        self.attempt = 1 + max((r.get("attempt", 0) for r in self.history), default=0)
        self._first = True

    def log(self, step: int, split: str, metrics: Mapping[str, float], *,
            details: Mapping | None = None) -> None:
        """A record of `metrics` (scalars, also TensorBoard's), with `details` (any JSON,
        in metrics.jsonl only)."""
        scalars = {k: v if isinstance(v, int) else float(np.asarray(v)) for k, v in metrics.items()}
        self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
        if self.is_writer:
            seconds = round(self._time_before + time.monotonic() - self._started, 3)
            record = {"step": step, "split": split, **scalars, **(details or {}),
                      "time": seconds, "attempt": self.attempt}
            if self._first:
                record["resumed_from"] = self.resume_step
                self._first = False
            self._lines.append(json.dumps(record) + "\n")
            self._write(final=False)

    def _write(self, final: bool) -> None:
        """Replaces the file with every record so far. A failed write costs nothing (the
        next one holds the same records too) unless it is the `final` one, which retries
        and then raises."""
        write = lambda: storage.write_atomically(self.path, "".join(self._lines))  # noqa: E731
        if final:
            storage.retry(write, attempts=4, delay_s=1.0, what=f"writing {self.path}")
            return
        try:
            write()
        except Exception as e:  # noqa: BLE001 - any store error; the records are kept
            logging.warning("Could not write %s (%s); the next record rewrites it.", self.path, e)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.is_writer and self._lines:
            self._write(final=True)


def _tensorboard_can_write(workdir) -> bool:
    """TensorBoard events go through TensorFlow's own GCS client, whose endpoint is
    compiled in: it cannot reach an emulator, so there the events are left out."""
    if storage.is_url(workdir) and storage.emulator_host():
        logging.warning("%s is set: TensorFlow's Cloud Storage client cannot reach an emulator, "
                        "so no TensorBoard events are written to %s (metrics.jsonl is).",
                        storage.EMULATOR_ENV, workdir)
        return False
    return True
