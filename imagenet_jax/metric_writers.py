"""Where metrics go: CLU writers (TensorBoard events and the console) and metrics.jsonl.

`metrics.jsonl` holds one JSON object per logged record, e.g.
`{"step": 400, "split": "val", "loss": 0.41, "top1": 0.93, "top5": 0.99, ..., "time": 81.2}`
(time: seconds the run had been running), so that any tool can read a run:
`run_dir.read_records(workdir)`, `imagenet-jax plot`. Only process 0 writes files.

Object stores have no append, so the file is never appended to: process 0 keeps the
run's records and replaces the whole file at each record, all at once (an upload, or a
local write and rename). Whatever kills the run, the file holds whole records, and a
resumed run first drops the records past its checkpoint, so each record appears once.
The file stays small: 100 bytes or so a record, a few MB for a 90-epoch ImageNet run.
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
        self._lines: list[str] = []
        # Each record's "time": seconds the run has been running, carried on by a resumed
        # run from its last kept record (the time it was down is not counted).
        self._started, self._time_before = time.monotonic(), 0.0
        if self.is_writer:
            records = run_dir.read_records(workdir)
            kept = [r for r in records if r["step"] <= resume_step]
            self._lines = [json.dumps(r) + "\n" for r in kept]
            self._time_before = max((r.get("time", 0.0) for r in kept), default=0.0)
            if len(kept) != len(records):  # a resumed run rewrites what came after
                self._write(final=True)

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        scalars = {k: v if isinstance(v, int) else float(np.asarray(v)) for k, v in metrics.items()}
        self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in scalars.items()})
        if self.is_writer:
            seconds = round(self._time_before + time.monotonic() - self._started, 3)
            record = {"step": step, "split": split, **scalars, "time": seconds}
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
