"""Weights between files and runs: torchvision weights imported into a new workdir as its
step-0 checkpoint, and a run's checkpoint exported as a torchvision state dict. The
mapping itself is weights.py's; this module only reads and writes runs (run_dir.py's
layout, checkpoint.py's checkpoints).
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from imagenet_jax.weights import (
    AUX_PREFIXES,
    TORCHVISION_MODELS,
    WeightsError,
    imagenet_or_numbered,
    load_torchvision,
    save_torchvision,
    tensors_classes,
)


def import_to_workdir(name: str, weights: str | os.PathLike, workdir: str | os.PathLike,
                      config, *, open_dataset: bool = True) -> dict:
    """Writes a step-0 checkpoint of model `name` with torchvision `weights` into `workdir`,
    and its config.json: `imagenet-jax train` fine-tunes from it (the same number of
    classes), `eval`, `predict` and `export` read it. Returns what was written.

    The classes are ImageNet's 1,000 wnids for a 1,000-class file, else class_0...; with
    `open_dataset`, the dataset of `config` is opened for the run's derived values and
    classes when it can be (its class count must then match). Refuses a workdir that
    already holds checkpoints.
    """
    from imagenet_jax import checkpoint, run_dir
    from imagenet_jax.config import derive
    from imagenet_jax.errors import ConfigError
    from imagenet_jax.parallel import mesh_from_shape
    from imagenet_jax.train import assemble
    from imagenet_jax.train.state import split_model

    workdir = run_dir.path(workdir)
    model = load_torchvision(name, weights, **config.model_options)
    config.model = name
    if name in AUX_PREFIXES:  # as loaded, so that train and eval build the same model
        aux_head = model.aux1 if name == "googlenet" else model.AuxLogits
        with config.unlocked():
            config.model_options.aux_logits = aux_head is not None
            config.model_options.transform_input = bool(model.transform_input)
    num_classes = tensors_classes(model)
    class_names = imagenet_or_numbered(num_classes)
    source = derived = None
    if open_dataset:
        try:
            source, derived = assemble.plan(config)
        except ConfigError:  # no dataset here: the classes and sizes come from the weights
            pass
    if source is not None:
        if source.num_classes != num_classes:
            raise ConfigError(f"the weights have {num_classes} classes and dataset "
                              f"{config.dataset!r} {source.num_classes}; to fine-tune onto "
                              "other classes, train a new workdir with "
                              f"--config.init_from={weights} (a new head is made)")
        class_names = tuple(source.class_names)
    else:
        derived = derive(config, num_classes=num_classes, num_train_examples=config.batch_size,
                         num_eval_examples=0, num_devices=jax.device_count(),
                         num_processes=jax.process_count(), platform=jax.devices()[0].platform)
    run_dir.check_writable(workdir)
    run_dir.create(workdir)
    mesh = mesh_from_shape(derived.mesh_shape, derived.dcn_data)
    run = assemble.build(config, derived, mesh)
    _, params, model_state = split_model(model)
    state = run.state.replace(
        params=jax.device_put(params, jax.tree.map(lambda x: x.sharding, run.state.params)),
        model_state=jax.device_put(model_state, jax.tree.map(lambda x: x.sharding,
                                                             run.state.model_state)))
    checkpointer = checkpoint.Checkpointer(run_dir.checkpoints(workdir),
                                           keep=config.keep_checkpoints)
    try:
        if checkpointer.latest_step() is not None:
            raise ConfigError(f"{workdir} already holds checkpoints (step "
                              f"{checkpointer.latest_step()}); import into a new --workdir")
        checkpointer.save(0, state, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        run_dir.write_config(workdir, config, class_names, derived if source else None)
    return {"workdir": os.fspath(workdir), "model": name, "num_classes": num_classes,
            "model_options": dict(config.model_options)}


def export_from_workdir(workdir: str | os.PathLike, out: str | os.PathLike, *,
                        step: int | None = None) -> dict:
    """Writes checkpoint `step` (default: the latest) of the run in `workdir` as a
    torchvision state dict (`out`, .safetensors)."""
    from imagenet_jax import saved_run

    restored = saved_run.load_saved_run(workdir, step=step)
    if restored.config.model not in TORCHVISION_MODELS:
        raise WeightsError(f"{restored.config.model!r} is not a torchvision architecture; "
                           f"those are: {', '.join(sorted(TORCHVISION_MODELS))}")
    model = nnx.merge(restored.run.graphdef, jax.device_get(restored.state.params),
                      jax.device_get(restored.state.model_state))
    if jax.process_index() == 0:
        save_torchvision(model, out)
    return {"step": restored.step, "model": restored.config.model, "out": os.fspath(out)}
