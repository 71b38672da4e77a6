"""Orbax checkpoints of the train state: async, every N steps and at the end, last K kept.

Orbax writes each step into a temporary folder and renames it when complete, so a
run killed mid-save never leaves a checkpoint that looks finished. Every process
writes its own shards; restoring places each array straight into the sharding of
the live state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """The run's checkpoint folder: `save` at intervals, `restore_latest` on start."""

    def __init__(self, directory: str | Path, *, every_steps: int, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
            enable_async_checkpointing=True,
            # Wait for the previous async save rather than skip an interval step.
            enable_should_save_is_saving_in_progress_check=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts an async save if `step` is on the interval (or `force`); returns whether."""
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore_latest(self, state: Any) -> Any:
        """The newest readable checkpoint, laid out like `state`; `state` if there is none.

        Arrays go straight into `state`'s shardings, so a checkpoint written on 8 devices
        restores on 4 or 1. A checkpoint that fails to read is skipped with a warning
        naming its step, and the one before it is tried.
        """
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                logging.warning("Checkpoint of step %d in %s cannot be read (%s: %s); "
                                "moving it aside and trying the previous one.", step,
                                self.directory, type(e).__name__, str(e)[:300])
                self._set_aside(step)
                continue
            logging.info("Restored the checkpoint of step %d from %s", step, self.directory)
            return restored
        return state

    def _set_aside(self, step: int) -> None:
        """Renames an unreadable step folder so that it is never the latest again."""
        if jax.process_index() == 0:
            bad = self.directory / str(step)
            if bad.exists():
                bad.rename(self.directory / f"{step}.unreadable")
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
