"""A run read back from its workdir: config, classes and a checkpoint, changing nothing.

`imagenet-jax eval`, `predict` and `export` all start here: WORKDIR/config.json gives the
model, resolution and crop (any field overridable) and the model's classes; a checkpoint
(the latest, or a given step) is read with a read-only manager, safe beside a run that
is still writing its checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from imagenet_jax import models, run_dir
from imagenet_jax.checkpoint import Checkpointer
from imagenet_jax.config import (
    Derived,
    config_from_json,
    derive,
    set_field,
    validate,
)
from imagenet_jax.errors import ConfigError
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.train import assemble
from imagenet_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class SavedRun:
    config: ml_collections.ConfigDict
    class_names: tuple[str, ...]  # the model's classes, in output order
    derived: Derived
    mesh: Mesh
    run: assemble.Run
    state: TrainState             # the checkpoint's
    step: int


def load_config(workdir, overrides: dict[str, Any] | None = None
                ) -> tuple[ml_collections.ConfigDict, run_dir.SavedConfig]:
    """(the run's config with `overrides` ({'FIELD' or 'A.B': value}) applied, the whole
    config.json); ConfigError for a workdir that holds no run."""
    saved = run_dir.read_config(workdir)
    config = config_from_json(saved.config)
    for name, value in (overrides or {}).items():
        set_field(config, name, value)
    validate(config, model_names=models.names(), num_devices=jax.device_count(),
             num_processes=jax.process_count())
    return config, saved


def class_names(config: ml_collections.ConfigDict, saved: run_dir.SavedConfig
                ) -> tuple[str, ...]:
    """The model's classes: from config.json, or, for a run that predates them there,
    from its training set opened again."""
    if saved.class_names:
        return saved.class_names
    from imagenet_jax.data import sources

    try:
        return tuple(sources.get_source(config.dataset, config.data_dir or None).class_names)
    except (OSError, ValueError) as e:
        raise ConfigError(f"the run's config.json does not list its classes and its dataset "
                          f"{config.dataset!r} cannot be opened: {e}") from None


def load_saved_run(workdir: str | os.PathLike, *, step: int | None = None,
                   overrides: dict[str, Any] | None = None,
                   loaded: tuple[ml_collections.ConfigDict, run_dir.SavedConfig] | None = None
                   ) -> SavedRun:
    """The run in `workdir` with checkpoint `step` (default: the latest) restored on this
    machine's devices; `loaded`: what `load_config` already returned for it. ConfigError
    for no run, no checkpoint or an unknown step."""
    config, saved = loaded or load_config(workdir, overrides)
    classes = class_names(config, saved)
    if not run_dir.checkpoints(workdir).exists():
        raise ConfigError(f"{workdir} has no checkpoint ({run_dir.checkpoints(workdir)} does "
                          "not exist)")
    checkpointer = Checkpointer(run_dir.checkpoints(workdir), read_only=True,
                                read_attempts=config.read_attempts,
                                retry_delay_s=config.read_retry_delay_s)
    try:
        step = checkpoint_step(checkpointer, workdir, step)
        derived = _derive(config, saved, len(classes))
        mesh = mesh_from_shape(derived.mesh_shape, derived.dcn_data)
        run = assemble.build(config, derived, mesh)
        state = checkpointer.restore(step, run.state)
    finally:
        checkpointer.close()
    if state.ema is not None:
        # A run with ema_decay is used through its averaged weights, the ones its
        # 'val_ema' records scored (and usually the better ones).
        logging.info("Using the EMA of the weights (ema_decay=%g) of step %d", config.ema_decay,
                     step)
        state = state.with_ema_weights()
    return SavedRun(config, classes, derived, mesh, run, state, step)


def checkpoint_step(checkpointer: Checkpointer, workdir, step: int | None) -> int:
    """`step`, or the latest for None, among the finished checkpoints of `checkpointer`
    (the run in `workdir`); ConfigError for none at all or a step it does not hold."""
    steps = checkpointer.steps()
    if not steps:
        raise ConfigError(f"{workdir} has no finished checkpoint (none under "
                          f"{run_dir.checkpoints(workdir)})")
    step = steps[0] if step is None else step
    if step not in steps:
        raise ConfigError(f"{workdir} has no checkpoint of step {step}; its steps: "
                          f"{', '.join(map(str, sorted(steps)))}")
    return step


def _derive(config: ml_collections.ConfigDict, saved: run_dir.SavedConfig,
            num_classes: int) -> Derived:
    """The run's derived values on this machine's devices (the mesh may differ). A run
    without them (weights imported without a dataset) gets one batch's worth of training
    examples and no evaluation examples: its schedule is not used here."""
    trained = saved.derived or {}
    return derive(config, num_classes=num_classes,
                  num_train_examples=trained.get("num_train_examples", config.batch_size),
                  num_eval_examples=trained.get("num_eval_examples", 0),
                  num_devices=jax.device_count(), num_processes=jax.process_count(),
                  platform=jax.devices()[0].platform)
