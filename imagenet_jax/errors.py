"""Why a command stops before it is done: the errors imagenet_jax raises on purpose, and
the exit status each one ends the command with.

Every error here carries its `exit_status`, so a launcher or a scheduler can tell "start
me again" (75) from "fix the config" (2) without reading the log. `imagenet-jax --help`
lists the statuses from `ExitStatus`. This module imports nothing of imagenet_jax, so
any part of it may import this one.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """The exit statuses of `imagenet-jax`, each with what it means for the caller."""

    OK = 0
    FAILED = 1
    BAD_CONFIG = 2
    NONFINITE = 3
    NO_JOB = 4
    STORAGE = 5
    PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: try again later

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitStatus.OK: "done (a finished run found again is done too)",
    ExitStatus.FAILED: "an unexpected error (the log has its traceback), or predict found "
                       "an unreadable image",
    ExitStatus.BAD_CONFIG: "bad flags or config; nothing ran and the workdir is untouched",
    ExitStatus.NONFINITE: "a non-finite loss or gradient norm stopped training; the last "
                          "good checkpoint is intact",
    ExitStatus.NO_JOB: "this process could not join the multi-process job",
    ExitStatus.STORAGE: "checkpoints could not be read for a reason other than damage; "
                        "nothing was changed",
    ExitStatus.PREEMPTED: "preempted: a checkpoint was saved; run the same command again to "
                          "resume",
}


class Error(Exception):
    """An error imagenet_jax raises on purpose; its message says what to do."""

    exit_status = ExitStatus.FAILED


class ConfigError(Error, ValueError):
    """A config that cannot run; the message says what is wrong and what is valid."""

    exit_status = ExitStatus.BAD_CONFIG


class JobUnavailable(Error, RuntimeError):
    """This process could not join the multi-process job: the message says what was tried."""

    exit_status = ExitStatus.NO_JOB


class StorageUnavailable(Error, RuntimeError):
    """Checkpoints could not be read for a reason other than damage: nothing was changed."""

    exit_status = ExitStatus.STORAGE


class NonFiniteError(Error):
    """A train step produced a non-finite loss or gradient norm."""

    exit_status = ExitStatus.NONFINITE

    def __init__(self, step: int, last_checkpoint: int | None):
        kept = ("no checkpoint was saved before it" if last_checkpoint is None else
                f"the last good checkpoint (step {last_checkpoint}) is intact")
        super().__init__(
            f"non-finite loss or gradient norm at step {step}; the run stopped and {kept}. "
            "Lower the learning rate, or set --config.on_nonfinite=skip to skip such steps")
        self.step = step


class Preempted(Error):
    """The run saved a checkpoint at `step` and stopped because it was asked to."""

    exit_status = ExitStatus.PREEMPTED

    def __init__(self, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step} and stopped; "
                         "run the same command again to resume")
        self.step = step
