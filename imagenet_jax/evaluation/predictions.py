"""Per-example predictions over an evaluation set, gathered from the eval step.

The eval step (train/steps.py) returns a few small arrays per example, replicated on
every process; they are fetched once at the end of the set (the device never waits on
the host in between), the padding and unreadable rows dropped, and the rest put in the
order of the examples in their split: the same arrays on any device or process count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import numpy as np

from imagenet_jax.evaluation import scores
from imagenet_jax.train.steps import ClassMap


@dataclasses.dataclass(frozen=True)
class Predictions:
    """The evaluated examples of one set, ordered by their index in the split."""

    index: np.ndarray        # [n] int32: the example's position in its split
    label: np.ndarray        # [n] int32: its label among the model's classes
    top_classes: np.ndarray  # [n, k] int32: the k most likely classes, best first; -1 none
    top_probabilities: np.ndarray  # [n, k] float32: their probabilities (0 for none)
    nll: np.ndarray          # [n] float32: -log p(label | image)
    confidence: np.ndarray   # [n] float32: the top class's probability

    def __len__(self) -> int:
        return len(self.index)

    def correct(self, k: int = 1) -> np.ndarray:
        return scores.correct_at_k(self.top_classes, self.label, k)

    def summary(self) -> dict[str, float | int]:
        """What the train loop logs at each evaluation: loss (the NLL), top-1, top-5."""
        return {"loss": scores.mean_nll(self.nll), "top1": scores.mean(self.correct(1)),
                "top5": scores.mean(self.correct(5)), "num_examples": len(self)}


def collect_predictions(eval_step: Callable, state, batches: Iterable[dict],
            class_map: ClassMap) -> Predictions:
    """Runs `eval_step(state, batch, class_map)` over `batches` and gathers the results."""
    outputs = [eval_step(state, batch, class_map) for batch in batches]
    if not outputs:
        raise ValueError("the evaluation set yielded no batches")
    host = jax.device_get(outputs)
    merged = {key: np.concatenate([out[key] for out in host]) for key in host[0]}
    keep = merged.pop("mask").astype(bool)
    order = np.argsort(merged["index"][keep], kind="stable")
    return Predictions(**{key: value[keep][order] for key, value in merged.items()})
