"""Evaluation metrics on per-example predictions (numpy), each defined with its source.

Every function takes the arrays of `Predictions` (predictions.py): `top_classes` [n, k]
(the k most likely classes, best first; -1 where there is none), `labels` [n], and so on,
for the n examples that were evaluated (padding and unreadable images are already out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

ECE_BINS = 15


def correct_at_k(top_classes: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[n] bool: the label is among the k most likely classes."""
    return np.any(top_classes[:, :k] == labels[:, None], axis=1)


def mean(values: np.ndarray) -> float:
    """The mean in float64 (of accuracies' booleans, of NLLs), nan for no values."""
    return float(np.mean(values, dtype=np.float64)) if len(values) else float("nan")


def mean_nll(nll: np.ndarray) -> float:
    """Negative log-likelihood: the mean over examples of -log p(label | image), the
    softmax cross-entropy without label smoothing (the train loop's eval "loss")."""
    return mean(nll)


@dataclasses.dataclass(frozen=True)
class Reliability:
    """A reliability diagram's bins: equal-width confidence intervals (lo, hi]."""

    edges: np.ndarray       # [bins + 1]
    counts: np.ndarray      # [bins] examples whose top probability falls in the bin
    accuracy: np.ndarray    # [bins] their top-1 accuracy (nan for an empty bin)
    confidence: np.ndarray  # [bins] their mean top probability (nan for an empty bin)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               num_bins: int = ECE_BINS) -> tuple[float, Reliability]:
    """ECE = sum over bins B of |B|/n * |accuracy(B) - mean confidence(B)|, with `num_bins`
    equal-width bins of the top-class probability: Guo et al., "On Calibration of Modern
    Neural Networks" (ICML 2017), eq. 3 (Naeini et al. 2015), 15 bins as there.

    Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; the first also holds 0. A
    non-finite confidence (a NaN row of logits) makes the ECE nan and stays out of the bins.
    """
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    finite = np.isfinite(confidence)
    if not finite.all():
        ece, reliability = expected_calibration_error(confidence[finite], correct[finite],
                                                      num_bins)
        return float("nan"), reliability
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    hits = np.bincount(bins, weights=correct, minlength=num_bins)
    sure = np.bincount(bins, weights=confidence, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy, mean_confidence = hits / counts, sure / counts
    total = max(len(confidence), 1)
    ece = float(np.sum(np.abs(hits - sure)) / total)  # |B| * |acc - conf| = |hits - sure|
    return ece, Reliability(np.linspace(0.0, 1.0, num_bins + 1), counts, accuracy,
                            mean_confidence)


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray,
                       num_classes: int) -> dict[int, float]:
    """Class -> the accuracy over that class's examples, for every class with examples."""
    counts = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes)
    return {int(c): float(hits[c] / counts[c]) for c in np.flatnonzero(counts)}


def mistake_severity(top_classes: np.ndarray, labels: np.ndarray, heights: np.ndarray,
                     k: int = 5) -> dict:
    """How bad the mistakes are in a class hierarchy: Bertinetto et al., "Making Better
    Mistakes: Leveraging Class Hierarchies with Deep Networks" (CVPR 2020), Sec. 4.

    `heights[a, b]` is the height of the lowest common ancestor of classes a and b (0 when
    a == b; wordnet.Hierarchy.lca_height). Returns:
      mean: the mean height over the top-1 mistakes (nan without mistakes);
      histogram: {height: number of top-1 mistakes};
      hierarchical_distance_at_k: the mean over examples of the mean height between the
        label and each of the k most likely classes (correct ones count 0).
    A missing prediction (-1: a NaN row, or fewer than k classes allowed) has no place in
    the hierarchy and is left out of both.
    """
    predicted = top_classes[:, 0]
    wrong = (predicted != labels) & (predicted >= 0)
    mistake_heights = heights[predicted[wrong], labels[wrong]]
    values, counts = np.unique(mistake_heights, return_counts=True)
    top_k = top_classes[:, :k]
    present = top_k >= 0
    at_k = np.where(present, heights[np.where(present, top_k, 0), labels[:, None]], 0)
    rows = present.any(axis=1)
    per_row = at_k[rows].sum(axis=1) / present[rows].sum(axis=1)
    return {
        "mean": float(mistake_heights.mean()) if len(mistake_heights) else float("nan"),
        "histogram": {int(v): int(c) for v, c in zip(values, counts, strict=True)},
        f"hierarchical_distance_at_{k}": float(per_row.mean()) if len(per_row) else float("nan"),
    }


def real_correct(top_classes: np.ndarray, real_labels: Sequence[Sequence[int]],
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """ReaL accuracy's terms: Beyer et al., "Are we done with ImageNet?" (2020). A
    prediction is right when it is in the image's set of acceptable labels; images whose
    set is empty are not scored.

    Returns ([n] bool correct at k, [n] bool scored), `real_labels[i]` being example i's set.
    """
    scored = np.asarray([len(s) > 0 for s in real_labels], bool)
    correct = np.asarray([bool(set(top[:k].tolist()) & set(s))
                          for top, s in zip(top_classes, real_labels, strict=True)], bool)
    return correct & scored, scored
