"""What stops a run early and how: preemption notices and non-finite steps.

Both are checked between steps, from the host, without waiting on the step just
dispatched: a preemption notice is a flag set by a signal handler (or, on several
processes, JAX's preemption sync point, at which all of them agree on a step); a
non-finite step is a flag the step returns, fetched only at sync points (a log or a
checkpoint), so the loop never blocks on the device in between.
"""

from __future__ import annotations

import functools
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the job should be started again, and will resume


class Preempted(Exception):
    """The run saved a checkpoint at `step` and stopped because it was asked to."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step} and stopped; "
                         "run the same command again to resume")
        self.step = step


class NonFiniteError(Exception):
    """A train step produced a non-finite loss or gradient norm."""

    def __init__(self, step: int, last_checkpoint: int | None):
        kept = ("no checkpoint was saved before it" if last_checkpoint is None else
                f"the last good checkpoint (step {last_checkpoint}) is intact")
        super().__init__(
            f"non-finite loss or gradient norm at step {step}; the run stopped and {kept}. "
            "Lower the learning rate, or set --config.on_nonfinite=skip to skip such steps")
        self.step = step


class PreemptionWatcher:
    """Turns SIGTERM (or a TPU maintenance notice) into a step at which to save and stop.

    With one process, a SIGTERM handler sets a flag. With several, JAX's preemption
    sync manager (started by `jax.distributed.initialize`) owns the signal and picks a
    step that every process reaches, so that all of them save the same step.
    """

    def __init__(self):
        self._multiprocess = jax.process_count() > 1
        self._notice = threading.Event()
        self._previous_handler = None
        if not self._multiprocess:
            if threading.current_thread() is threading.main_thread():
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
            else:
                logging.warning("Not on the main thread: SIGTERM will not save a checkpoint.")

    def _on_signal(self, signum, frame) -> None:
        del frame
        logging.warning("Received signal %d: saving a checkpoint at the next step.", signum)
        self._notice.set()

    def reached(self, step: int) -> bool:
        if self._multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._notice.is_set()

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


class TrainMetricsBuffer:
    """Train metrics of recent steps, left on the device until a sync point.

    `check()` fetches only the non-finite flags; `drain()` also merges the metrics for
    logging. With `on_nonfinite="stop"` the first bad step raises NonFiniteError; with
    "skip" the step already left the state unchanged (see steps.train_step) and is
    counted.
    """

    def __init__(self, on_nonfinite: str, last_checkpoint_fn):
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self._last_checkpoint_fn = last_checkpoint_fn
        self._pending: list = []
        self._checked = 0

    def add(self, step: int, metrics) -> None:
        self._pending.append((step, metrics))

    def check(self) -> None:
        unchecked = self._pending[self._checked:]
        flags = jax.device_get([m.nonfinite_steps.total for _, m in unchecked])
        for (step, _), flag in zip(unchecked, flags, strict=True):
            if flag > 0:
                if self.on_nonfinite == "stop":
                    raise NonFiniteError(step, self._last_checkpoint_fn())
                self.skipped_steps += 1
                logging.warning("Skipped step %d: non-finite loss or gradient norm.", step)
        self._checked = len(self._pending)

    def drain(self) -> dict:
        self.check()
        collections = jax.device_get([m for _, m in self._pending])
        self._pending, self._checked = [], 0
        merged = functools.reduce(lambda a, b: a.merge(b), collections)
        result = {k: float(v) for k, v in merged.compute().items()}
        result["skipped_steps_total"] = self.skipped_steps
        return result
