"""From a config to a runnable step: `plan` checks it and derives the run's numbers,
`build` makes the model, the state on the mesh and the compiled train and eval steps.

The training loop and the benchmarks share these, so `bench train` measures exactly
the step a run trains with. Nothing here imports TensorFlow: with the synthetic
dataset, `bench train` runs where only JAX and its libraries are installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from imagenet_jax import models
from imagenet_jax.config import Derived, derive, steps_per_epoch, validate
from imagenet_jax.data import sources
from imagenet_jax.errors import ConfigError
from imagenet_jax.models.layers import batchnorm_groups, freeze_batchnorm, set_batchnorm_groups
from imagenet_jax.parallel.sharding import ShardingRules, path_name
from imagenet_jax.train import hyperrule
from imagenet_jax.train.optim import create_learning_rate_fn, create_optimizer, frozen_mask
from imagenet_jax.train.state import TrainState, create_train_state, split_model
from imagenet_jax.train.steps import jit_eval_step, jit_train_step


def plan(config: ml_collections.ConfigDict) -> tuple[sources.Source, Derived]:
    """Validates `config`, opens its dataset and derives the run's numbers from both.

    Raises ConfigError, before anything is built, for anything the user must fix.
    """
    validate(config, model_names=models.names(), num_devices=jax.device_count(),
             num_processes=jax.process_count())
    unknown = sorted(set(config.model_options) - set(models.options_of(config.model)))
    if unknown:
        raise ConfigError(f"model_options: {config.model} takes no option {unknown[0]!r}; its "
                          f"options: {', '.join(models.options_of(config.model)) or 'none'}")
    try:
        # On the data service its workers are the processes that read (reader processes
        # hand records over through this host's memory, which a remote worker cannot).
        read_processes = 0 if config.data_service else config.tfds_read_processes
        source = sources.get_source(config.dataset, config.data_dir or None, read_processes)
    except (OSError, ValueError) as e:
        raise ConfigError(f"dataset {config.dataset!r}: {e}") from None
    check_processes_see_the_same(source, config.dataset)
    if config.bit_hyperrule:
        apply_hyperrule(config, source)
    derived = derive(config, num_classes=source.num_classes,
                     num_train_examples=source.num_examples("train"),
                     num_eval_examples=source.num_examples("val"),
                     num_devices=jax.device_count(), num_processes=jax.process_count(),
                     platform=jax.devices()[0].platform)
    check_parameter_patterns(config, derived.num_classes)
    return source, derived


def apply_hyperrule(config: ml_collections.ConfigDict, source: sources.Source) -> None:
    """Sets the fields BiT-HyperRule chooses for `source` (hyperrule.py), and logs them."""
    num_examples = source.num_examples("train")
    choices = hyperrule.choose(num_examples, hyperrule.mean_image_area(source))
    epoch_steps = steps_per_epoch(num_examples, config.batch_size)
    if epoch_steps == 0:
        raise ConfigError(f"batch_size={config.batch_size} is larger than the training split "
                          f"({num_examples} examples)")
    hyperrule.apply(config, choices, epoch_steps)
    logging.info("%s", choices.describe())


def parameter_names(config: ml_collections.ConfigDict, num_classes: int) -> list[str]:
    """The '/'-joined paths of the model's parameters, as freeze and lr_multipliers see them."""
    abstract = nnx.eval_shape(lambda: models.create(
        config.model, num_classes=num_classes, rngs=nnx.Rngs(0), **config.model_options))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def check_parameter_patterns(config: ml_collections.ConfigDict, num_classes: int) -> None:
    """ConfigError for a freeze or lr_multipliers regex that finds no parameter (a typo
    would otherwise train everything as usual), or a freeze that finds them all."""
    patterns = [("freeze", config.freeze)] if config.freeze else []
    patterns += [("lr_multipliers", pattern) for pattern, _ in config.lr_multipliers]
    if not patterns:
        return
    names = parameter_names(config, num_classes)
    for field, pattern in patterns:
        if not any(re.search(pattern, name) for name in names):
            raise ConfigError(
                f"{field}: {pattern!r} matches no parameter of {config.model} (searched in "
                f"'/'-joined paths such as {names[0]!r} and {names[-1]!r})")
    if config.freeze and all(re.search(config.freeze, name) for name in names):
        raise ConfigError(f"freeze: {config.freeze!r} matches every parameter of "
                          f"{config.model}: nothing would train")


def check_processes_see_the_same(source: sources.Source, spec: str) -> None:
    """Raises ConfigError on every process unless all of them list the same examples:
    a host whose mount shows one more file would shift every index and label after it
    and train on other data, silently."""
    if jax.process_count() == 1:
        return
    digest = bytes.fromhex(hashlib.sha256(source.fingerprint().encode()).hexdigest())
    local = np.concatenate([
        np.asarray([source.num_examples("train"), source.num_examples("val")], np.uint32),
        np.frombuffer(digest, np.uint32)])
    rows = np.asarray(multihost_utils.process_allgather(local))
    differ = [p for p in range(len(rows)) if not np.array_equal(rows[p], rows[0])]
    if differ:
        p = differ[0]
        if (rows[p][:2] == rows[0][:2]).all():
            what = (f"the same counts ({rows[0][0]} train / {rows[0][1]} val) but other files "
                    "or labels")
        else:
            what = (f"{rows[p][0]} train / {rows[p][1]} val examples against process 0's "
                    f"{rows[0][0]} / {rows[0][1]}")
        raise ConfigError(
            f"dataset {spec!r}: the processes do not list the same files: process {p} has "
            f"{what} ({len(differ)} of {len(rows)} processes differ from process 0); every "
            "host must read the same dataset: look for a stale mount or a partial copy")


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run is made of, built from its config: model, state and compiled steps."""

    graphdef: nnx.GraphDef
    state: TrainState
    train_step: Callable    # (state, batch) -> (state, TrainMetrics); donates state
    eval_step: Callable     # (state, batch, ClassMap) -> per-example predictions
    learning_rate_fn: Callable


def model_maker(config: ml_collections.ConfigDict,
                derived: Derived) -> Callable[[nnx.Rngs], nnx.Module]:
    """rngs -> the run's model: its architecture, classes, compute dtype, BatchNorm groups
    and frozen BatchNorms."""
    dtype = jnp.dtype(derived.compute_dtype)
    bn_groups = batchnorm_groups(config.batchnorm_group_examples, config.batch_size)

    def model_fn(rngs: nnx.Rngs) -> nnx.Module:
        model = models.create(config.model, num_classes=derived.num_classes, dtype=dtype,
                              rngs=rngs, **config.model_options)
        model = set_batchnorm_groups(model, bn_groups, config.batchnorm_unbiased_var)
        return freeze_batchnorm(model, lambda path: config.batchnorm_frozen or bool(
            config.freeze and re.search(config.freeze, f"{path}/scale")))

    return model_fn


def weight_shapes(config: ml_collections.ConfigDict, derived: Derived) -> dict[str, dict]:
    """{"params": ..., "model_state": ...} of the state `build` makes, as shapes and dtypes
    (jax.ShapeDtypeStruct), traced without creating an array: what init_from checks a
    source against before a model is built."""
    model_fn = model_maker(config, derived)
    _, params, model_state = split_model(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    return {"params": params, "model_state": model_state}


def build(config: ml_collections.ConfigDict, derived: Derived, mesh: Mesh) -> Run:
    """The model, optimizer, initial state on `mesh`, and the jitted train and eval steps."""
    learning_rate_fn = create_learning_rate_fn(config, derived)
    tx = create_optimizer(config)
    dtype = jnp.dtype(derived.compute_dtype)
    graphdef, state = create_train_state(model_maker(config, derived), tx, mesh, config.seed,
                                         dynamic_loss_scale=dtype == jnp.float16,
                                         rules=ShardingRules.from_config(config),
                                         ema=config.ema_decay > 0,
                                         portable_cpu_math=config.portable_cpu_math)
    train_step = jit_train_step(mesh, state, portable_cpu_math=config.portable_cpu_math,
                                graphdef=graphdef, tx=tx,
                                learning_rate_fn=learning_rate_fn,
                                label_smoothing=config.label_smoothing, dtype=dtype,
                                ema_decay=config.ema_decay, mixup_alpha=config.mixup_alpha,
                                cutmix_alpha=config.cutmix_alpha,
                                frozen=frozen_mask(config.freeze, state.params)
                                if config.freeze else None)
    eval_step = jit_eval_step(mesh, state, portable_cpu_math=config.portable_cpu_math,
                              graphdef=graphdef, dtype=dtype)
    return Run(graphdef, state, train_step, eval_step, learning_rate_fn)
