"""Orbax checkpoints of the train state: async, every N steps and at the end, last K kept.

Commits are marked by a file, not by a rename: each step is written into its final
folder and `commit_success.txt` is written last (Orbax's COMMIT_FILE mode), and a folder
without it is never listed, restored or kept. Renaming a folder is atomic on a local
disk but not on Cloud Storage nor on a gcsfuse mount (a copy and a delete of every
object), while creating one small object is atomic everywhere; so one protocol holds
on every store, and a run killed mid-save never leaves a checkpoint that looks finished.

Restoring is one decision for all processes. Process 0 lists the steps; every process
reads the newest (retrying with backoff) and they agree on the outcome:
  - read by all: that is the run's state;
  - written for another config (tree, shapes or dtypes differ): `CheckpointMismatch`,
    before anything is written or renamed;
  - damaged or missing files (the same error after every retry): moved aside as
    `STEP.unreadable` by process 0, and the step before is tried;
  - any other failure (an unreachable store, a permission): `StorageUnavailable`,
    nothing renamed: the same command works once the store does.
"""

from __future__ import annotations

import enum
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import options as ocp_options

from imagenet_jax import storage
from imagenet_jax.errors import ConfigError, StorageUnavailable

ITEM = "default"  # the folder Orbax's manager gives the single item of each step
# Error texts of a checkpoint whose files are damaged or missing (TensorStore's status
# codes, Orbax's own words): the same on every retry, unlike a store that is unreachable.
_DAMAGE_MARKERS = ("DATA_LOSS", "NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION",
                   "OUT_OF_RANGE", "incomplete checkpoint", "does not exist")


class CheckpointMismatch(ConfigError):
    """The workdir's checkpoint was written by another config: nothing was changed."""


class CheckpointDamaged(ConfigError):
    """A checkpoint asked for by step cannot be read: its files are damaged or missing."""


class Outcome(enum.IntEnum):
    """What a process found reading one step; the processes act on the largest."""

    RESTORED = 0
    DAMAGED = 1
    MISMATCH = 2
    UNAVAILABLE = 3


class Checkpointer:
    """The run's checkpoint folder: `save` at intervals, `restore_latest` on start."""

    def __init__(self, directory: str | os.PathLike, *, every_steps: int = 1, keep: int = 1,
                 read_attempts: int = 4, retry_delay_s: float = 1.0, read_only: bool = False):
        """`read_only`: for reading a run's checkpoints while it may still be writing them
        (`imagenet-jax eval`): nothing is created, deleted or cleaned up."""
        self.directory = storage.as_path(directory)
        self.read_attempts, self.retry_delay_s = read_attempts, retry_delay_s
        options = ocp.CheckpointManagerOptions(  # (every field spelled out: no warnings)
            read_only=True, save_interval_steps=0, create=False, max_to_keep=None,
            cleanup_tmp_directories=False) if read_only else ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
            enable_async_checkpointing=True,
            # Wait for the previous async save rather than skip an interval step.
            enable_should_save_is_saving_in_progress_check=False,
            atomicity_options=ocp_options.AtomicityOptions(
                mode=ocp_options.AtomicityMode.COMMIT_FILE),
        )
        # OCDBT (a few files per process, Orbax's default) wherever the store supports it;
        # against an emulator, one zarr folder per array (see storage.py).
        self._use_ocdbt = storage.supports_conditional_writes(self.directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers=ocp.StandardCheckpointHandler(use_ocdbt=self._use_ocdbt))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts an async save if `step` is on the interval (or `force`); returns whether."""
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore_latest(self, state: Any) -> Any:
        """The newest checkpoint every process can read, laid out like `state`; `state`
        itself if there is none. See the module docstring for what each failure does.

        Arrays go straight into `state`'s shardings, so a checkpoint written on 8 devices
        restores on 4 or 1.
        """
        for step in self._steps_of_process_0():
            outcome, result = self._read(step, _target_of(state))
            agreed = _agree(outcome)
            if agreed == Outcome.RESTORED:
                logging.info("Restored the checkpoint of step %d from %s", step, self.directory)
                return result
            if agreed != Outcome.DAMAGED:
                self._raise(step, outcome, agreed, result)
            why = (f"{type(result).__name__}: {str(result)[:300]}"
                   if outcome == Outcome.DAMAGED else "damaged as another process reads it")
            logging.warning("The checkpoint of step %d in %s is damaged (%s); moving it aside "
                            "and trying the one before.", step, self.directory, why)
            self._set_aside(step)
        return state

    def steps(self) -> list[int]:
        """The finished steps, newest first, as every process is told by process 0."""
        return self._steps_of_process_0()

    def restore(self, step: int, state: Any) -> Any:
        """Checkpoint `step`, laid out like `state`, changing nothing in the folder: a
        damaged step is an error here, not set aside."""
        outcome, result = self._read(step, _target_of(state))
        agreed = _agree(outcome)
        if agreed == Outcome.RESTORED:
            return result
        self._raise(step, outcome, agreed, result)

    def _raise(self, step: int, outcome: Outcome, agreed: Outcome, result: Any) -> None:
        """The error for a step the processes agree they cannot restore."""
        if agreed == Outcome.MISMATCH:
            what = result if outcome == Outcome.MISMATCH else "another process found so"
            raise CheckpointMismatch(
                f"the checkpoint of step {step} in {self.directory} was written by another "
                f"config ({what}); nothing was changed. Train this config in a new "
                "--workdir, or run the same config as before on this one")
        why = (f"{type(result).__name__}: {str(result)[:300]}" if outcome == agreed
               else "on another process")
        if agreed == Outcome.DAMAGED:
            raise CheckpointDamaged(f"the checkpoint of step {step} in {self.directory} is "
                                    f"damaged ({why}); nothing was changed")
        raise StorageUnavailable(
            f"could not read the checkpoint of step {step} in {self.directory} after "
            f"{self.read_attempts} attempts ({why}); nothing was changed: run the "
            "same command again once the storage answers")

    def _steps_of_process_0(self) -> list[int]:
        """Finished steps, newest first, as process 0 lists them (one list for all)."""
        steps = storage.retry(self._manager.all_steps, attempts=self.read_attempts,
                              delay_s=self.retry_delay_s, what=f"listing {self.directory}")
        steps = np.asarray(sorted(steps, reverse=True), np.int64)
        if jax.process_count() == 1:
            return steps.tolist()
        count = int(multihost_utils.broadcast_one_to_all(np.int64(len(steps))))
        padded = np.zeros(count, np.int64)
        padded[:min(count, len(steps))] = steps[:count]
        return multihost_utils.broadcast_one_to_all(padded).tolist()

    def _read(self, step: int, target: Any) -> tuple[Outcome, Any]:
        """(outcome, restored state | what differs | the last error) for this process."""
        item = self.directory / str(step) / ITEM
        handler = ocp.StandardCheckpointHandler(use_ocdbt=self._use_ocdbt)

        def attempt():
            differences = describe_mismatch(handler.metadata(item), target)
            if differences:
                return Outcome.MISMATCH, differences
            return Outcome.RESTORED, handler.restore(item, args=ocp.args.StandardRestore(target))

        try:
            return storage.retry(attempt, attempts=self.read_attempts, delay_s=self.retry_delay_s,
                                 what=f"reading the checkpoint of step {step}")
        except Exception as e:  # noqa: BLE001 - classified, then acted on by all processes
            return (Outcome.DAMAGED if is_damage(e) else Outcome.UNAVAILABLE), e
        finally:
            handler.close()

    def _set_aside(self, step: int) -> None:
        """Renames a damaged step folder so that it is never the latest again; nothing is
        deleted. Process 0 renames, then every process lists again."""
        if jax.process_index() == 0:
            folder = self.directory / str(step)
            aside = self.directory / f"{step}.unreadable"
            suffix = 1
            while aside.exists():
                suffix += 1
                aside = self.directory / f"{step}.unreadable-{suffix}"
            if folder.exists():
                folder.rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"imagenet_jax: set aside step {step}")
        self._manager.reload()

    def load(self, step: int | None = None) -> Any:
        """The arrays of checkpoint `step` (default: latest) on this process's first device,
        whatever topology wrote them: for inspection and comparison."""
        step = self.latest_step() if step is None else step
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=device),
            self._manager.item_metadata(step))
        return self._manager.restore(step, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _target_of(state: Any) -> Any:
    """Shape structs of `state` in its shardings: what a restore reads into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _agree(outcome: Outcome) -> Outcome:
    """The worst outcome over all processes: each acts on the same one."""
    if jax.process_count() == 1:
        return outcome
    outcomes = multihost_utils.process_allgather(np.int32(outcome))
    return Outcome(int(np.max(outcomes)))


def is_damage(error: BaseException) -> bool:
    """Whether `error` says the checkpoint's files are damaged or missing, rather than that
    the store could not be reached (which must never cost a checkpoint)."""
    if isinstance(error, FileNotFoundError | NotADirectoryError | json.JSONDecodeError |
                  UnicodeDecodeError | KeyError):
        return True
    if isinstance(error, ConnectionError | TimeoutError | PermissionError):
        return False
    text = str(error)
    if any(word in text for word in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED",
                                     "UNAUTHENTICATED", "RESOURCE_EXHAUSTED")):
        return False
    return any(marker in text for marker in _DAMAGE_MARKERS)


def _path_names(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def describe_mismatch(metadata: Any, target: Any) -> str:
    """'' when the checkpoint's arrays (paths, shapes, dtypes) are those of `target`; else
    one line naming how many differ, with an example of each kind."""
    tree = getattr(metadata, "tree", metadata)
    saved = {_path_names(p): (tuple(m.shape), np.dtype(m.dtype))
             for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
    wanted = {_path_names(p): (tuple(x.shape), np.dtype(x.dtype))
              for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    only_saved = sorted(saved.keys() - wanted.keys())
    only_wanted = sorted(wanted.keys() - saved.keys())
    differ = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
    parts = []
    if differ:
        k = differ[0]
        parts.append(f"{len(differ)} array(s) differ in shape or dtype, e.g. {k}: "
                     f"{_describe(saved[k])} saved, {_describe(wanted[k])} now")
    if only_saved:
        parts.append(f"{len(only_saved)} only in the checkpoint, e.g. {only_saved[0]}")
    if only_wanted:
        parts.append(f"{len(only_wanted)} only in this config, e.g. {only_wanted[0]}")
    return "; ".join(parts)


def _describe(shape_dtype: tuple) -> str:
    shape, dtype = shape_dtype
    return f"{dtype.name}{list(shape)}"
