"""What a train step measures: CLU metric collections, computed on the devices.

A step returns `TrainMetrics` of its examples; the loop merges them over a log interval
(`guards.TrainMetricsBuffer`) and hands the computed values to the writers
(`imagenet_jax.metrics`). Nothing here imports TensorFlow, so `bench train` runs
without it.
"""

# No `from __future__ import annotations`: CLU reads the metric classes from the annotations.
import flax
import jax.numpy as jnp
from clu import metrics as clu_metrics


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
