"""`imagenet-jax eval`: a run's checkpoint on any number of evaluation sets.

`evaluate_run(workdir, specs)` rebuilds the run's model from WORKDIR/config.json (its own
model, resolution and crop, any field overridable), reads the checkpoint (the latest, or
`step`) without changing anything in the workdir, and evaluates each set exactly: every
example once, padded and masked like the train loop's eval, on any device and process
count. Process 0 writes WORKDIR/eval/STEP.json and a reliability diagram per set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from imagenet_jax import run_dir, saved_run, storage
from imagenet_jax.data import loader, wordnet
from imagenet_jax.evaluation import report, scores
from imagenet_jax.evaluation.predictions import Predictions, collect_predictions
from imagenet_jax.evaluation.sets import EvalSet, open_set, unknown_labels
from imagenet_jax.train.loop import report_skipped

WORST_CLASSES = 10


def evaluate_run(workdir: str | os.PathLike, specs: Sequence[str] = (), *,
                 step: int | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Evaluates checkpoint `step` (default: the latest) of the run in `workdir` on each
    eval set in `specs` (default: the run's own dataset); returns the JSON of eval/STEP.json.

    Raises ConfigError (nothing evaluated) for a workdir with no run or checkpoint, an
    unknown step or set, or a set whose classes the model does not have.
    """
    storage.configure()
    workdir = storage.as_path(workdir)
    config, saved = saved_run.load_config(workdir, overrides)
    specs = list(specs) or [config.dataset]
    model_classes = saved_run.class_names(config, saved)
    # The sets first: a wrong one is reported before the model is built.
    eval_sets = [open_set(spec, model_classes=model_classes, run_dataset=config.dataset,
                          data_dir=config.data_dir or None) for spec in specs]
    restored = saved_run.load_saved_run(workdir, step=step, loaded=(config, saved))
    step, state, run, mesh = restored.step, restored.state, restored.run, restored.mesh
    logging.info("Evaluating step %d of %s on %s", step, workdir, ", ".join(specs))

    heights = wordnet.load().lca_heights(model_classes)
    results = []
    for eval_set in eval_sets:
        batches = loader.eval_batches(eval_set.source, config, mesh)
        predictions = collect_predictions(run.eval_step, state, batches, eval_set.class_map)
        unknown_labels(eval_set, predictions.label)
        report_skipped(batches.take_report(), f"{eval_set.name} (not counted)")
        results.append(score(eval_set, predictions, model_classes, heights))
    compare_to_reference(results)
    result = {"step": step, "workdir": os.fspath(workdir), "sets": results}
    if jax.process_index() == 0:
        report.write(run_dir.eval_results(workdir), result)
    return result


def score(eval_set: EvalSet, predictions: Predictions, model_classes: tuple[str, ...],
          heights: np.ndarray | None) -> dict:
    """Every metric of one set (see scores.py for the definitions and their sources)."""
    labels, top = predictions.label, predictions.top_classes
    correct = predictions.correct(1)
    ece, reliability = scores.expected_calibration_error(predictions.confidence, correct)
    per_class = scores.per_class_accuracy(correct, labels, len(model_classes))
    worst = sorted(per_class.items(), key=lambda item: (item[1], model_classes[item[0]]))
    result = {
        "name": eval_set.name,
        "kind": eval_set.kind,
        "num_examples": len(predictions),
        "num_classes": len(eval_set.class_names),
        "restricted": eval_set.restricted,
        "top1": scores.mean(correct),
        "top5": scores.mean(predictions.correct(5)),
        "nll": scores.mean_nll(predictions.nll),
        "ece": ece,
        "mistake_severity": (None if heights is None else
                             scores.mistake_severity(top, labels, heights)),
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
        real_top1, scored = scores.real_correct(top, real, 1)
        real_top5, _ = scores.real_correct(top, real, 5)
        result.update(original_top1=result["top1"], original_num_examples=len(predictions),
                      num_examples=int(scored.sum()), top1=scores.mean(real_top1[scored]),
                      top5=scores.mean(real_top5[scored]))
    return result


def compare_to_reference(results: list[dict]) -> None:
    """Adds to each ImageNetV2 set its top-1 drop from the first plain validation set
    evaluated beside it (normally ImageNet's own): Recht et al. report 11-14 points."""
    reference = next((r for r in results if r["kind"] == "val"), None)
    for result in results:
        if result["kind"] == "imagenet_v2" and reference is not None:
            result["reference"] = reference["name"]
            result["top1_drop"] = reference["top1"] - result["top1"]


def _list(values: np.ndarray) -> list:
    """JSON has no NaN: empty bins are null."""
    return [None if np.isnan(v) else float(v) for v in values]
