"""What a train step measures: CLU metric collections, computed on the devices.

A step returns `TrainMetrics` of its examples; the loop merges them over a log interval
(`TrainMetricsBuffer`, which also stops or counts non-finite steps) and hands the
computed values to the writers (`imagenet_jax.metric_writers`). Nothing here imports
TensorFlow, so `bench train` runs without it.
"""

# No `from __future__ import annotations`: CLU reads the metric classes from the annotations.
import functools

import flax
import jax
import jax.numpy as jnp
from absl import logging
from clu import metrics as clu_metrics

from imagenet_jax.errors import NonFiniteError


@flax.struct.dataclass
class Sum(clu_metrics.Metric):
    """The sum of the values over steps (CLU has averages, not sums)."""

    total: jnp.ndarray

    @classmethod
    def empty(cls) -> "Sum":
        return cls(total=jnp.array(0, jnp.int32))

    @classmethod
    def from_model_output(cls, values: jnp.ndarray, **_) -> "Sum":
        return cls(total=jnp.sum(values))

    def merge(self, other: "Sum") -> "Sum":
        return type(self)(total=self.total + other.total)

    def compute(self) -> jnp.ndarray:
        return self.total


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Averages over the steps' examples; a skipped (non-finite) step counts in none."""

    loss: clu_metrics.Average.from_output("loss")
    top1: clu_metrics.Average.from_output("top1")
    top5: clu_metrics.Average.from_output("top5")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    learning_rate: clu_metrics.LastValue.from_output("learning_rate")
    nonfinite_steps: Sum.from_output("nonfinite_steps")
    skipped_examples: Sum.from_output("skipped_examples")  # unreadable images, masked out
    loss_scale_overflows: Sum.from_output("loss_scale_overflows")  # float16 only
    loss_scale: clu_metrics.LastValue.from_output("loss_scale")


class TrainMetricsBuffer:
    """Train metrics of recent steps, left on the device until a sync point.

    `check()` fetches only the non-finite flags; `drain()` also merges the metrics for
    logging. With `on_nonfinite="stop"` the first bad step raises NonFiniteError; with
    "skip" the step already left the state unchanged (see steps.train_step) and is
    counted.
    """

    def __init__(self, on_nonfinite: str, last_checkpoint_fn):
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self._last_checkpoint_fn = last_checkpoint_fn
        self._pending: list = []
        self._checked = 0

    def add(self, step: int, metrics) -> None:
        self._pending.append((step, metrics))

    def check(self) -> None:
        unchecked = self._pending[self._checked:]
        flags = jax.device_get([m.nonfinite_steps.total for _, m in unchecked])
        for (step, _), flag in zip(unchecked, flags, strict=True):
            if flag > 0:
                if self.on_nonfinite == "stop":
                    raise NonFiniteError(step, self._last_checkpoint_fn())
                self.skipped_steps += 1
                logging.warning("Skipped step %d: non-finite loss or gradient norm.", step)
        self._checked = len(self._pending)

    def drain(self) -> dict:
        self.check()
        collections = jax.device_get([m for _, m in self._pending])
        self._pending, self._checked = [], 0
        merged = functools.reduce(lambda a, b: a.merge(b), collections)
        result = {k: float(v) for k, v in merged.compute().items()}
        result["skipped_steps_total"] = self.skipped_steps
        return result
