"""The pure train and eval steps, and their jitted, sharded, donated forms.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics`
are plain functions of arrays. Batches hold uint8 images: they cross to the
device at a quarter of float32's bytes and are normalised here, on the device.
"""

# No `from __future__ import annotations`: CLU reads the metric classes from the annotations.
import functools
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import Mesh

from imagenet_jax.parallel import batch_sharding, replicated
from imagenet_jax.train.state import TrainState, state_shardings

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


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


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    top1: clu_metrics.Average.from_output("top1")
    top5: clu_metrics.Average.from_output("top5")
    num_examples: clu_metrics.Average.from_output("num_examples")  # .count is the exact tally


def normalize(images: jax.Array, dtype: jnp.dtype) -> jax.Array:
    mean = jnp.asarray(MEAN_RGB, jnp.float32)
    std = jnp.asarray(STDDEV_RGB, jnp.float32)
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with smoothed one-hot targets."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
               label_smoothing: float, dtype: jnp.dtype) -> tuple[TrainState, TrainMetrics]:
    """One SGD update on a global batch. BatchNorm statistics span the whole batch."""
    images = normalize(batch["image"], dtype)
    labels = batch["label"]

    # A key per step, not a carried stream: resuming at step s redraws the same dropout masks.
    dropout_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state.model_state)
        model.train()
        outputs = model(images, rngs=nnx.Rngs(dropout=dropout_key))
        # Models with auxiliary heads return (logits, aux_logits) in training; the aux
        # losses enter the objective with the model's weights, never the metrics.
        logits, aux_logits = outputs if isinstance(outputs, tuple) else (outputs, ())
        loss = cross_entropy(logits, labels, label_smoothing)
        objective = loss.mean()
        for weight, aux in zip(model.aux_loss_weights, aux_logits, strict=True):
            objective += weight * cross_entropy(aux, labels, label_smoothing).mean()
        new_model_state = nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()
        return objective, (loss, logits, new_model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (objective, (loss, logits, model_state)), grads = grad_fn(state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step leaves the state as it was: NaNs never reach a checkpoint. The
    # loop then stops the run or counts the skip (config.on_nonfinite).
    finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
    keep_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    # A skipped step counts in no average; the learning rate and the skip count are the
    # step's own, outside the mask.
    average = functools.partial(clu_metrics.Average.from_model_output,
                                mask=jnp.broadcast_to(finite, labels.shape))
    metrics = TrainMetrics.empty().replace(
        loss=average(loss),
        top1=average(topk_correct(logits, labels, 1)),
        top5=average(topk_correct(logits, labels, 5)),
        grad_norm=average(jnp.broadcast_to(grad_norm, labels.shape)),
        learning_rate=clu_metrics.LastValue.from_model_output(learning_rate_fn(state.step)),
        nonfinite_steps=Sum.from_model_output((~finite).astype(jnp.int32)),
    )
    new_state = state.replace(
        step=state.step + 1,
        params=keep_finite(params, state.params),
        model_state=keep_finite(model_state, state.model_state),
        opt_state=keep_finite(opt_state, state.opt_state),
    )
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
              dtype: jnp.dtype) -> EvalMetrics:
    """Sums over the real examples of a padded batch: padding rows have mask False."""
    model = nnx.merge(graphdef, state.params, state.model_state)
    model.eval()
    logits = model(normalize(batch["image"], dtype))
    labels, mask = batch["label"], batch["mask"]
    return EvalMetrics.single_from_model_output(
        loss=cross_entropy(logits, labels, 0.0),
        top1=topk_correct(logits, labels, 1),
        top5=topk_correct(logits, labels, 5),
        num_examples=jnp.ones_like(labels, jnp.float32),
        mask=mask,
    )


def jit_train_step(mesh: Mesh, abstract_state: TrainState, **step_kwargs) -> Callable:
    """`train_step` compiled for `mesh`: state replicated and donated, batch split on data."""
    shardings = state_shardings(abstract_state, mesh)
    return jax.jit(
        functools.partial(train_step, **step_kwargs),
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_step(mesh: Mesh, abstract_state: TrainState, **step_kwargs) -> Callable:
    return jax.jit(
        functools.partial(eval_step, **step_kwargs),
        in_shardings=(state_shardings(abstract_state, mesh), batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
