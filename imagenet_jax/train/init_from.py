"""A new run's first weights from another's (config.init_from): fine-tuning and transfer.

The source is a workdir (its latest checkpoint, or `@STEP`; the EMA weights where that run
kept them, `:raw` for the raw ones) or a torchvision weights file. Parameters and BatchNorm
statistics are taken from it; the step, the optimizer state and the EMA start fresh.

The classifier, and any auxiliary head, is every tensor whose shape depends on the number
of classes (found by building the model for two class counts, so no model lists its head
by name). `config.init_head` decides what becomes of it: kept (the same classes), its rows
of this dataset's classes taken (`keep_subset`: classes matched by name), or reset to the
fresh run's own initialisation. Every other tensor must be in the source with its shape:
the first that is not ends the run before the model is built or anything is written, with
its name and shapes.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from imagenet_jax import models, run_dir, storage
from imagenet_jax.errors import ConfigError
from imagenet_jax.parallel.sharding import path_name
from imagenet_jax.train.state import TrainState, split_model

WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt")
_STEP = re.compile(r"@(?P<step>\d+|latest)(?P<raw>:raw)?$")


@dataclasses.dataclass(frozen=True)
class Weights:
    """A source's tensors on the host, by '/'-joined path."""

    description: str           # "runs/demo step 552 (EMA weights)", "resnet50.safetensors"
    model: str
    params: dict[str, np.ndarray]
    model_state: dict[str, np.ndarray]
    class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Report:
    """What became of each tensor: taken from the source, reset (a new head) or left out
    (the source's, with no place in this model: an auxiliary head it does not build)."""

    source: str
    head: str                  # the init_head mode applied
    taken: tuple[str, ...]
    reset: tuple[str, ...]
    left_out: tuple[str, ...]

    def summary(self) -> str:
        return (f"Initialised from {self.source}: {len(self.taken)} tensors taken, "
                f"{len(self.reset)} reset, {len(self.left_out)} left out (head: {self.head})")


def parse(spec: str) -> tuple[str, int | None, bool]:
    """`PATH[@STEP|@latest][:raw]` -> (PATH, STEP or None for the latest, raw)."""
    match = _STEP.search(spec)
    if not match:
        return spec, None, False
    step = None if match["step"] == "latest" else int(match["step"])
    return spec[:match.start()], step, bool(match["raw"])


def read(spec: str, config: ml_collections.ConfigDict) -> Weights:
    """The tensors `spec` (config.init_from) names; ConfigError, one line, for a path that
    names nothing, a file that is not weights, a workdir without that checkpoint."""
    path, step, raw = parse(spec)
    where = storage.as_path(path)
    if not where.exists():
        raise ConfigError(f"init_from {spec!r}: {path} does not exist (a workdir or a weights "
                          f"file: {', '.join(WEIGHTS_SUFFIXES)})")
    if where.is_dir():
        return _read_run(spec, where, step, raw)
    if step is not None or raw:
        raise ConfigError(f"init_from {spec!r}: @STEP and :raw name a workdir's checkpoints; "
                          f"{path} is a file")
    return _read_weights_file(spec, Path(path), config)


def _read_weights_file(spec: str, path: Path, config: ml_collections.ConfigDict) -> Weights:
    from imagenet_jax.weights import (
        WeightsError,
        imagenet_or_numbered,
        load_torchvision,
        read_tensors,
        tensors_classes,
    )

    try:
        read_tensors(path)  # (read again below: a file that is not weights is told as such)
    except WeightsError as e:
        raise ConfigError(f"init_from {spec!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - safetensors' and torch's own errors
        raise ConfigError(f"init_from {spec!r}: {path} is not a weights file "
                          f"({type(e).__name__}: {str(e)[:200]})") from None
    try:
        model = load_torchvision(config.model, path, **config.model_options)
    except WeightsError as e:
        raise ConfigError(f"init_from {spec!r}: {e}") from None
    _, params, model_state = split_model(model)
    classes = imagenet_or_numbered(tensors_classes(model))
    return Weights(str(path), config.model, _flat(params), _flat(model_state), classes)


def _read_run(spec: str, workdir, step: int | None, raw: bool) -> Weights:
    from imagenet_jax.checkpoint import Checkpointer
    from imagenet_jax.config import config_from_json
    from imagenet_jax.saved_run import checkpoint_step

    if not run_dir.path(workdir).joinpath(run_dir.CONFIG).exists():
        raise ConfigError(f"init_from {spec!r}: {workdir} is a folder but not a run (no "
                          f"{run_dir.CONFIG}) nor a weights file")
    saved = run_dir.read_config(workdir)
    source_config = config_from_json(saved.config)
    folder = run_dir.checkpoints(workdir)
    if not folder.exists():
        raise ConfigError(f"init_from {spec!r}: {workdir} has no finished checkpoint")
    checkpointer = Checkpointer(folder, read_only=True)
    try:
        step = checkpoint_step(checkpointer, workdir, step)
        tree = checkpointer.load(step)
    except ConfigError as e:
        raise ConfigError(f"init_from {spec!r}: {e}") from None
    finally:
        checkpointer.close()
    ema = tree.get("ema")
    use_ema = bool(ema) and not raw
    weights = ema if use_ema else tree
    kind = "EMA weights" if use_ema else "raw weights" if ema else "weights"
    return Weights(f"{workdir} step {step} ({kind})", source_config.model,
                   _flat(weights["params"]), _flat(weights["model_state"]),
                   tuple(saved.class_names))


def _flat(tree) -> dict[str, np.ndarray]:
    return {path_name(path): np.asarray(jax.device_get(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def class_axes(config: ml_collections.ConfigDict, shapes: dict[str, tuple[int, ...]],
               num_classes: int) -> dict[str, int]:
    """{path: axis} of every tensor whose shape depends on the number of classes (the
    classifier and auxiliary heads): `shapes`, the model's for `num_classes`, and the model
    built for one more class differ there and nowhere else."""
    abstract = nnx.eval_shape(lambda: models.create(
        config.model, num_classes=num_classes + 1, rngs=nnx.Rngs(0), **config.model_options))
    pure = nnx.to_pure_dict(nnx.state(abstract))
    more = {path_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}
    return {name: next(axis for axis, (a, b) in enumerate(zip(shape, more[name], strict=True))
                       if a != b)
            for name, shape in shapes.items() if shape != more[name]}


def head_mode(init_head: str, source_classes: tuple[str, ...],
              classes: tuple[str, ...]) -> str:
    """init_head with 'auto' resolved: keep, keep_subset or reset."""
    if init_head != "auto":
        return init_head
    if tuple(source_classes) == tuple(classes):
        return "keep"
    if source_classes and set(classes) <= set(source_classes):
        return "keep_subset"
    return "reset"


@dataclasses.dataclass(frozen=True)
class Fitted:
    """A source's tensors matched to this model: the host value of each tensor taken, by
    (group, name), and what became of every tensor."""

    values: dict[tuple[str, str], np.ndarray]
    report: Report


def fit(weights: Weights, target: dict[str, dict], config: ml_collections.ConfigDict,
        class_names: tuple[str, ...]) -> Fitted:
    """`weights` matched to this model, its head by config.init_head. `target`: this model's
    {"params": ..., "model_state": ...}, their shapes (assemble.weight_shapes) being enough:
    a source that does not fit is refused before any model is built, with ConfigError
    naming the first tensor that does not fit."""
    head = head_mode(config.init_head, weights.class_names, class_names)
    leaves = {group: {path_name(path): leaf for path, leaf
                      in jax.tree_util.tree_flatten_with_path(target[group])[0]}
              for group in ("params", "model_state")}
    heads = class_axes(config, {name: tuple(leaf.shape) for group in leaves.values()
                                for name, leaf in group.items()}, len(class_names))
    rows = _head_rows(head, weights, class_names, config.init_from)
    values, report = {}, {"taken": [], "reset": [], "left_out": []}
    for group, wanted_here in leaves.items():
        source = getattr(weights, group)
        # The body before the heads: a tensor of another architecture is named as such.
        for name, wanted in sorted(wanted_here.items(), key=lambda item: item[0] in heads):
            value = _take(name, wanted, source, heads, head, rows, weights, config)
            if value is None:
                report["reset"].append(name)
            else:
                values[group, name] = value
                report["taken"].append(name)
        for name in sorted(source.keys() - wanted_here.keys()):
            if weights.model != config.model:
                _mismatch(weights, config, f"{name} {_shape(source[name])} there, which "
                          f"{config.model} has no place for")
            report["left_out"].append(name)
    return Fitted(values, Report(weights.description, head, tuple(report["taken"]),
                                 tuple(report["reset"]), tuple(report["left_out"])))


def apply(fitted: Fitted, state: TrainState) -> TrainState:
    """`state` (a fresh run's, on its devices) with the fitted tensors in place; the step,
    the optimizer state and the RNG stay fresh, and the EMA starts at the new weights."""
    params = _replaced(state.params, {n: v for (g, n), v in fitted.values.items()
                                      if g == "params"})
    model_state = _replaced(state.model_state, {n: v for (g, n), v in fitted.values.items()
                                                if g == "model_state"})
    fresh = state.replace(params=params, model_state=model_state)
    if state.ema is not None:  # the averages start at the initial weights, as in every run
        fresh = fresh.replace(ema=state.ema.replace(params=jax.tree.map(jax.numpy.copy, params),
                                                    model_state=jax.tree.map(jax.numpy.copy,
                                                                             model_state)))
    return fresh


def _head_rows(head: str, weights: Weights, class_names: tuple[str, ...],
               spec: str) -> np.ndarray | None:
    """keep_subset: the source's row of each of this dataset's classes."""
    if head != "keep_subset":
        return None
    index = {name: i for i, name in enumerate(weights.class_names)}
    missing = [name for name in class_names if name not in index]
    if missing:
        raise ConfigError(f"init_head=keep_subset: {len(missing)} of this dataset's "
                          f"{len(class_names)} classes are not among the source's "
                          f"({len(weights.class_names)}), e.g. {missing[0]!r} (init_from "
                          f"{spec!r}); use init_head=reset")
    return np.asarray([index[name] for name in class_names])


def _take(name: str, wanted: jax.ShapeDtypeStruct, source: dict, heads: dict, head: str,
          rows: np.ndarray | None, weights: Weights, config) -> np.ndarray | None:
    """The source's value for tensor `name` of this model, or None to keep the fresh one."""
    if name in heads and head == "reset":
        return None
    if name not in source:
        if name in heads:  # an auxiliary head the source did not build
            return None
        _mismatch(weights, config, f"no {name} there, which {config.model} needs "
                  f"({_shape(wanted)})")
    value = source[name]
    if name in heads and head == "keep_subset":
        value = np.take(value, rows, axis=heads[name])
    if tuple(value.shape) != tuple(wanted.shape):
        if name in heads and head == "keep":
            raise ConfigError(
                f"init_head=keep: the head {name} is {_shape(value)} in init_from "
                f"{config.init_from!r} and {_shape(wanted)} here (other classes); use "
                "init_head=reset, or auto")
        _mismatch(weights, config, f"{name} is {_shape(value)} there and {_shape(wanted)} here")
    return value.astype(wanted.dtype)


def _mismatch(weights: Weights, config, what: str) -> None:
    other = f"a {weights.model}" if weights.model != config.model else "the same architecture"
    raise ConfigError(f"init_from {config.init_from!r} ({other}) does not fit {config.model}: "
                      f"{what}")


def _shape(array) -> str:
    return f"[{', '.join(map(str, array.shape))}]"


def _replaced(tree: dict, values: dict[str, np.ndarray]) -> dict:
    """`tree` (arrays on the devices) with the leaves named in `values` replaced, each laid
    out in its leaf's sharding (every process holds the whole host value)."""
    def replace(path, leaf):
        value = values.get(path_name(path))
        if value is None:
            return leaf
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

    return jax.tree_util.tree_map_with_path(replace, tree)


def log_report(report: Report) -> None:
    """Every tensor once in the log, by what became of it."""
    logging.info("%s", report.summary())
    for what in ("taken", "reset", "left_out"):
        names = getattr(report, what)
        if names:
            logging.info("init_from, %s (%d): %s", what.replace("_", " "), len(names),
                         ", ".join(names))
