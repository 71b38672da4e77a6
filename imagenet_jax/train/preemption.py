"""A preemption notice, turned into a step at which every process saves and stops.

The notice is checked between steps, from the host, without waiting on the step just
dispatched: a flag set by a signal handler or, on several processes, JAX's preemption
sync point, at which all of them agree on a step. The loop then saves a checkpoint and
raises `errors.Preempted` (exit status 75: start the same command again to resume).
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


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
