"""`imagenet-jax eval`: a run's checkpoint on any number of evaluation sets.

`evaluate_run(workdir, specs)` rebuilds the run's model from WORKDIR/config.json (its own
model, resolution and crop, any field overridable), reads the checkpoint (the latest, or
`step`) without changing anything in the workdir, and evaluates each set exactly: every
example once, padded and masked like the train loop's eval, on any device and process
count. Process 0 writes WORKDIR/eval/STEP.json and a reliability diagram per set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from imagenet_jax import models, storage
from imagenet_jax.checkpoint import Checkpointer
from imagenet_jax.config import ConfigError, config_from_json, derive, validate
from imagenet_jax.data import input as data_input
from imagenet_jax.data import wordnet
from imagenet_jax.evaluation import metrics, report
from imagenet_jax.evaluation.predictions import Predictions, predict
from imagenet_jax.evaluation.sets import EvalSet, open_set, unknown_labels
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.train import recipe

WORST_CLASSES = 10


def load_run_config(workdir, overrides: dict[str, Any] | None = None
                    ) -> tuple[ml_collections.ConfigDict, dict]:
    """(the run's config with `overrides` applied, the rest of its config.json)."""
    path = storage.as_path(workdir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{workdir} holds no run: {path} does not exist (train into it "
                          "first, or give the --workdir of a run)") from None
    config = config_from_json(saved["config"])
    for name, value in (overrides or {}).items():
        parent, _, field = name.rpartition(".")
        target = config
        for part in filter(None, parent.split(".")):
            target = target[part]
        target[field] = value
    return config, saved


def evaluate_run(workdir: str | os.PathLike, specs: Sequence[str] = (), *,
                 step: int | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Evaluates checkpoint `step` (default: the latest) of the run in `workdir` on each
    eval set in `specs` (default: the run's own dataset); returns the JSON of eval/STEP.json.

    Raises ConfigError (nothing evaluated) for a workdir with no run or checkpoint, an
    unknown step or set, or a set whose classes the model does not have.
    """
    storage.configure()
    workdir = storage.as_path(workdir)
    config, saved = load_run_config(workdir, overrides)
    specs = list(specs) or [config.dataset]
    validate(config, model_names=models.names(), num_devices=jax.device_count(),
             num_processes=jax.process_count())
    model_classes = tuple(saved.get("class_names") or _classes_of(config))
    eval_sets = [open_set(spec, model_classes=model_classes, run_dataset=config.dataset,
                          data_dir=config.data_dir or None) for spec in specs]

    if not (workdir / "checkpoints").exists():
        raise ConfigError(f"{workdir} has no checkpoint to evaluate ({workdir / 'checkpoints'} "
                          "does not exist)")
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True,
                                read_attempts=config.read_attempts,
                                retry_delay_s=config.read_retry_delay_s)
    try:
        steps = checkpointer.steps()
        if not steps:
            raise ConfigError(f"{workdir} has no finished checkpoint to evaluate (none under "
                              f"{workdir / 'checkpoints'})")
        step = steps[0] if step is None else step
        if step not in steps:
            raise ConfigError(f"{workdir} has no checkpoint of step {step}; its steps: "
                              f"{', '.join(map(str, sorted(steps)))}")
        derived = _derive(config, saved, len(model_classes))
        mesh = mesh_from_shape(derived.mesh_shape)
        run = recipe.build(config, derived, mesh)
        state = checkpointer.restore(step, run.state)
    finally:
        checkpointer.close()
    logging.info("Evaluating step %d of %s on %s", step, workdir, ", ".join(specs))

    heights = wordnet.load().lca_heights(model_classes)
    results = []
    for eval_set in eval_sets:
        batches = data_input.eval_batches(eval_set.source, config, mesh)
        predictions = predict(run.eval_step, state, batches, eval_set.class_map)
        unknown_labels(eval_set, predictions.label)
        skipped = batches.take_report()
        if skipped:
            logging.warning("%s: skipped %d unreadable image(s) on process %d (not counted):"
                            "\n  %s", eval_set.name, len(skipped), jax.process_index(),
                            "\n  ".join(skipped.values()))
        results.append(score(eval_set, predictions, model_classes, heights))
    compare_to_reference(results)
    result = {"step": step, "workdir": os.fspath(workdir), "sets": results}
    if jax.process_index() == 0:
        report.write(workdir / "eval", result)
    return result


def _classes_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The model's classes for a run whose config.json predates "class_names": those of
    its training set, opened again."""
    from imagenet_jax.data import sources

    try:
        return tuple(sources.get_source(config.dataset, config.data_dir or None).class_names)
    except (OSError, ValueError) as e:
        raise ConfigError(f"the run's config.json does not list its classes and its dataset "
                          f"{config.dataset!r} cannot be opened: {e}") from None


def _derive(config: ml_collections.ConfigDict, saved: dict, num_classes: int):
    """The run's derived values on this machine's devices (the mesh may differ)."""
    trained = saved.get("derived", {})
    return derive(config, num_classes=num_classes,
                  num_train_examples=trained.get("num_train_examples", config.batch_size),
                  num_eval_examples=trained.get("num_eval_examples", 0),
                  num_devices=jax.device_count(), num_processes=jax.process_count(),
                  platform=jax.devices()[0].platform)


def score(eval_set: EvalSet, predictions: Predictions, model_classes: tuple[str, ...],
          heights: np.ndarray | None) -> dict:
    """Every metric of one set (see metrics.py for the definitions and their sources)."""
    labels, top = predictions.label, predictions.top_classes
    correct = predictions.correct(1)
    ece, reliability = metrics.expected_calibration_error(predictions.confidence, correct)
    per_class = metrics.per_class_accuracy(correct, labels, len(model_classes))
    worst = sorted(per_class.items(), key=lambda item: (item[1], model_classes[item[0]]))
    result = {
        "name": eval_set.name,
        "kind": eval_set.kind,
        "num_examples": len(predictions),
        "num_classes": len(eval_set.class_names),
        "restricted": eval_set.restricted,
        "top1": _mean(correct),
        "top5": _mean(predictions.correct(5)),
        "nll": metrics.mean_nll(predictions.nll),
        "ece": ece,
        "mistake_severity": (None if heights is None else
                             metrics.mistake_severity(top, labels, heights)),
        "per_class_top1": {model_classes[c]: value for c, value in per_class.items()},
        "worst_classes": [{"class": model_classes[c], "name": wordnet.class_name(model_classes[c]),
                           "top1": value} for c, value in worst[:WORST_CLASSES]],
        "reliability": {"edges": reliability.edges.tolist(),
                        "counts": reliability.counts.tolist(),
                        "accuracy": _list(reliability.accuracy),
                        "confidence": _list(reliability.confidence)},
    }
    if eval_set.real_labels is not None:
        # ReaL's top-k over the images it scores; the other numbers keep the original labels.
        real = [eval_set.real_labels[i] for i in predictions.index]
        real_top1, scored = metrics.real_correct(top, real, 1)
        real_top5, _ = metrics.real_correct(top, real, 5)
        result.update(original_top1=result["top1"], original_num_examples=len(predictions),
                      num_examples=int(scored.sum()), top1=_mean(real_top1[scored]),
                      top5=_mean(real_top5[scored]))
    return result


def compare_to_reference(results: list[dict]) -> None:
    """Adds to each ImageNetV2 set its top-1 drop from the first plain validation set
    evaluated beside it (normally ImageNet's own): Recht et al. report 11-14 points."""
    reference = next((r for r in results if r["kind"] == "val"), None)
    for result in results:
        if result["kind"] == "imagenet_v2" and reference is not None:
            result["reference"] = reference["name"]
            result["top1_drop"] = reference["top1"] - result["top1"]


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _list(values: np.ndarray) -> list:
    """JSON has no NaN: empty bins are null."""
    return [None if np.isnan(v) else float(v) for v in values]
