"""Where a command's log lines go: the console shows warnings, errors and the progress
lines; every line is kept in a file, TMPDIR/imagenet_jax_logs/COMMAND.HOST.PID.log, which
joins the run (WORKDIR/logs/) once the run has trained.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from absl import logging


class QuietCheckpointLibrary(std_logging.Filter):
    """Orbax logs several INFO lines per save; keep its warnings and errors only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def log_at_info() -> None:
    """absl logs at INFO, less Orbax's chatter, wherever its lines go."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(QuietCheckpointLibrary())


def log_to_file(command: str) -> Path | None:
    """Every log line to TMPDIR/imagenet_jax_logs/COMMAND.HOST.PID.log, and only warnings
    and errors to the console. Returns the file; None where it cannot be written (the
    console then keeps every line)."""
    folder = Path(tempfile.gettempdir()) / "imagenet_jax_logs"
    path = folder / f"{command}.{socket.gethostname()}.{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = std_logging.FileHandler(path)
    except OSError:
        return None
    handler.setFormatter(logging.PythonFormatter())
    handler.addFilter(QuietCheckpointLibrary())
    std_logging.getLogger().addHandler(handler)
    logging.get_absl_handler().setLevel(std_logging.WARNING)
    return path


def keep_log(log_file: Path | None, workdir: str) -> None:
    """The log joins the run, as WORKDIR/logs/NAME, once the run has trained (finished,
    preempted or stopped on a non-finite step). A run refused before (a bad config,
    another run's checkpoint) leaves the workdir exactly as it was, its log in TMPDIR."""
    if log_file is None:
        return
    from imagenet_jax import run_dir, storage

    try:
        for handler in std_logging.getLogger().handlers:
            handler.flush()
        target = run_dir.logs(workdir) / log_file.name
        if not storage.is_url(workdir):
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(log_file.read_text(errors="replace"))
    except Exception as e:  # noqa: BLE001 - the run's outcome matters more than its log
        logging.warning("Could not copy the log %s into %s: %s", log_file, workdir, e)


@contextlib.contextmanager
def native_stderr_to(path: Path | None) -> Iterator[None]:
    """Sends what native code writes to stderr (TensorFlow's start-up lines: oneDNN, absl's
    'All log messages before absl::InitializeLog()') to `path` while the block runs."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as target:
        os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow_quietly(log_file: Path | None) -> None:
    """Imports TensorFlow with its start-up lines sent to the log file, not the console."""
    with native_stderr_to(log_file):
        import tensorflow  # noqa: F401
