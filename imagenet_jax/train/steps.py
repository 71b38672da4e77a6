"""The pure train and eval steps, and their jitted, sharded, donated forms.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch, class_map)
-> per-example predictions` are plain functions of arrays. Batches hold uint8 images:
they cross to the device at a quarter of float32's bytes and are normalised here.
"""

# No `from __future__ import annotations`: CLU reads the metric classes from the annotations.
import functools
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import Mesh

from imagenet_jax.parallel import batch_sharding, compiler_options, replicated
from imagenet_jax.parallel.sharding import gather_params_first, is_sharded
from imagenet_jax.train import mixing
from imagenet_jax.train.optim import with_learning_rate
from imagenet_jax.train.state import TrainState, shardings_of
from imagenet_jax.train.step_metrics import Sum, TrainMetrics

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@flax.struct.dataclass
class ClassMap:
    """Which of the model's classes an evaluation set scores, and its labels among them.

    `allowed` [C] bool: classes a prediction may take (a 200-class subset such as
    ImageNet-R restricts the logits to its classes, as its paper does); `label_to_class`
    [>= C] int32: the set's label i is the model's class label_to_class[i], -1 for a class
    the model lacks (padded to C, so the sets of a model share one compiled step).
    """

    allowed: jnp.ndarray
    label_to_class: jnp.ndarray

    @classmethod
    def identity(cls, num_classes: int) -> "ClassMap":
        """A set labelled with the model's own classes: every class allowed."""
        return cls(allowed=np.ones(num_classes, bool),
                   label_to_class=np.arange(num_classes, dtype=np.int32))


TOP_K = 5  # the eval step's most likely classes per example (top-5 accuracy and more)


def normalize(images: jax.Array, dtype: jnp.dtype) -> jax.Array:
    mean = jnp.asarray(MEAN_RGB, jnp.float32)
    std = jnp.asarray(STDDEV_RGB, jnp.float32)
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def flip_left_right(images: jax.Array, flip: jax.Array) -> jax.Array:
    """Mirrors the images whose `flip` is True: the host decides, the device does it."""
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits: `lax.top_k`'s answer for rows
    without NaN (+0 and -0 compare equal here); a row holding a NaN is never correct.

    The label's rank is the number of logits ahead of it (greater, or equal at a lower
    index: top_k's order), so this is a compare and a sum over the classes of each row.
    Unlike top_k (a sort), it needs no all-gather of batch-sharded logits.
    """
    label_logits = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    classes = jnp.arange(logits.shape[-1])
    ahead = (logits > label_logits) | ((logits == label_logits) & (classes < labels[:, None]))
    rank = jnp.sum(ahead, axis=-1)
    return ((rank < k) & ~jnp.any(jnp.isnan(logits), axis=-1)).astype(jnp.float32)


def one_hot_targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    """[B, C] float32 one-hot targets, smoothed."""
    targets = jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[B] softmax cross-entropy in float32 against [B, C] (soft) targets."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, learning_rate_fn: optax.Schedule,
               label_smoothing: float, dtype: jnp.dtype, ema_decay: float = 0.0,
               mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, frozen=None
               ) -> tuple[TrainState, TrainMetrics]:
    """One optimizer update on a global batch. BatchNorm statistics span the whole batch
    (or its groups: models/layers.py).

    The loss is the mean over the batch's real examples (`mask`): an unreadable image
    the pipeline skipped weighs nothing, and the mean is over the global batch on any
    number of devices. In float16 the gradients come from the loss times
    `state.loss_scale` (see loss_scale.py); an overflow skips the step and halves it.
    With mixup or CutMix (mixing.py) the targets are soft and train top-1 counts the
    label with the larger share; `ema_decay` > 0 moves `state.ema` after the update.
    `frozen` (a tree of bools like the parameters; config.freeze) marks parameters that
    neither receive gradients nor change, bit for bit.
    """
    scaling = jnp.dtype(dtype) == jnp.float16
    scale = state.loss_scale.scale
    images = normalize(flip_left_right(batch["image"], batch["flip"]), dtype)
    labels, mask = batch["label"], batch["mask"]
    num_real = jnp.maximum(jnp.sum(mask), 1)

    def masked_mean(values):
        return jnp.sum(jnp.where(mask, values, 0.0)) / num_real

    # A key per step, not a carried stream: resuming at step s redraws the same dropout masks.
    dropout_key = jax.random.fold_in(state.rng, state.step)
    mixed = None
    if mixup_alpha or cutmix_alpha:
        # A stream of its own (split, not fold_in: nnx.Rngs folds counts into dropout_key).
        mixing_key = jax.random.fold_in(jax.random.split(state.rng)[1], state.step)
        mixed = mixing.mix(mixing_key, images, labels, mixup_alpha=mixup_alpha,
                           cutmix_alpha=cutmix_alpha)
        images = mixed.images

    def loss_against_targets(logits):
        targets = one_hot_targets(labels, logits.shape[-1], label_smoothing)
        if mixed is not None:
            targets = mixing.mixed_targets(targets, mixed)
        return cross_entropy(logits, targets)

    def loss_fn(params):
        if frozen is not None:  # no gradient is computed for them at all
            params = jax.tree.map(lambda p, fixed: jax.lax.stop_gradient(p) if fixed else p,
                                  params, frozen)
        model = nnx.merge(graphdef, params, state.model_state)
        model.train()
        outputs = model(images, rngs=nnx.Rngs(dropout=dropout_key))
        # Models with auxiliary heads return (logits, aux_logits) in training; the aux
        # losses enter the objective with the model's weights, never the metrics.
        logits, aux_logits = outputs if isinstance(outputs, tuple) else (outputs, ())
        loss = loss_against_targets(logits)
        objective = masked_mean(loss)
        for weight, aux in zip(model.aux_loss_weights, aux_logits, strict=True):
            objective += weight * masked_mean(loss_against_targets(aux))
        new_model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        scaled = objective * scale if scaling else objective
        return scaled, (objective, loss, logits, new_model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (objective, loss, logits, model_state)), grads = grad_fn(state.params)
    if scaling:
        grads = jax.tree.map(lambda g: g / scale, grads)
    grad_norm = optax.tree.norm(grads)
    learning_rate = learning_rate_fn(state.step)
    updates, opt_state = tx.update(grads, with_learning_rate(state.opt_state, learning_rate),
                                   state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema.update(params, model_state, ema_decay) if state.ema is not None else None
    if frozen is not None:  # as they were (p + 0 would turn -0.0 into +0.0)
        params = _keep_frozen(params, state.params, frozen)
        if ema is not None:
            ema = ema.replace(params=_keep_frozen(ema.params, state.ema.params, frozen))
    finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
    # In float16 a non-finite gradient is first an overflow of the scale: not an alarm.
    overflow = (state.loss_scale.is_overflow(jnp.isfinite(objective), jnp.isfinite(grad_norm))
                if scaling else jnp.zeros((), bool))
    updated = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state, ema=ema,
                            loss_scale=state.loss_scale.adjust(finite) if scaling
                            else state.loss_scale)
    scored_labels = labels if mixed is None else mixed.dominant_labels(labels)
    metrics = _step_metrics(loss, logits, scored_labels, mask, finite=finite, overflow=overflow,
                            grad_norm=grad_norm, learning_rate=learning_rate, loss_scale=scale)
    return _keep_if_finite(updated, state, finite), metrics


def _keep_frozen(new: dict, old: dict, frozen: dict) -> dict:
    return jax.tree.map(lambda n, o, fixed: o if fixed else n, new, old, frozen)


def _keep_if_finite(updated: TrainState, state: TrainState, finite: jax.Array) -> TrainState:
    """`updated` after a finite step; after a non-finite one, `state`'s weights, model
    state, optimizer state and EMA: NaNs never reach a checkpoint. The step count and the
    loss scale move on either way. The loop then stops the run or counts the skip
    (config.on_nonfinite)."""
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    return updated.replace(params=keep(updated.params, state.params),
                           model_state=keep(updated.model_state, state.model_state),
                           opt_state=keep(updated.opt_state, state.opt_state),
                           ema=keep(updated.ema, state.ema))


def _step_metrics(loss: jax.Array, logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                  finite: jax.Array, overflow: jax.Array, grad_norm: jax.Array,
                  learning_rate: jax.Array, loss_scale: jax.Array) -> TrainMetrics:
    """The step's TrainMetrics. A skipped step (non-finite) counts in no average; the
    learning rate and the skip counts are the step's own, outside the mask."""
    average = functools.partial(clu_metrics.Average.from_model_output, mask=mask & finite)
    return TrainMetrics.empty().replace(
        loss=average(loss),
        top1=average(topk_correct(logits, labels, 1)),
        top5=average(topk_correct(logits, labels, 5)),
        grad_norm=clu_metrics.Average.from_model_output(
            jnp.broadcast_to(grad_norm, labels.shape), mask=jnp.broadcast_to(finite, labels.shape)),
        learning_rate=clu_metrics.LastValue.from_model_output(learning_rate),
        nonfinite_steps=Sum.from_model_output((~finite & ~overflow).astype(jnp.int32)),
        skipped_examples=Sum.from_model_output((~mask).astype(jnp.int32)),
        loss_scale_overflows=Sum.from_model_output(overflow.astype(jnp.int32)),
        loss_scale=clu_metrics.LastValue.from_model_output(loss_scale),
    )


def top_classes(logits: jax.Array, k: int) -> jax.Array:
    """[B, k] int32: the k largest logits' classes, best first, ties to the lower class
    (lax.top_k's order); -1 past the classes that can be chosen (-inf logits) and on
    rows holding a NaN, which are never right. k argmaxes rather than a sort: each is a
    reduction over the classes of a row, split over batch-sharded logits as they are.
    """
    picked = []
    remaining = logits
    classes = jnp.arange(logits.shape[-1])
    for _ in range(min(k, logits.shape[-1])):
        best = jnp.argmax(remaining, axis=-1).astype(jnp.int32)
        chosen = classes == best[:, None]
        best_logit = jnp.max(jnp.where(chosen, remaining, -jnp.inf), axis=-1)
        picked.append(jnp.where(best_logit > -jnp.inf, best, -1))
        remaining = jnp.where(chosen, -jnp.inf, remaining)
    top = jnp.stack(picked, axis=-1)
    return jnp.where(jnp.any(jnp.isnan(logits), axis=-1, keepdims=True), -1, top)


def eval_step(state: TrainState, batch: dict, class_map: ClassMap, *, graphdef: nnx.GraphDef,
              dtype: jnp.dtype) -> dict[str, jax.Array]:
    """Per-example predictions on a padded batch; padding rows have mask False.

    Returns {'top_classes' [B, 5], 'top_probabilities' [B, 5], 'nll' [B] (-log p(label)),
    'confidence' [B] (the top probability), 'label' [B] (among the model's classes),
    'index' [B] (the example's position in its split), 'mask' [B]}: small arrays, from
    which the host computes every metric exactly (evaluation/scores.py), whatever the
    device and process count.
    """
    model = nnx.merge(graphdef, state.params, state.model_state)
    model.eval()
    logits = model(normalize(batch["image"], dtype))
    return {**score_logits(logits, batch["label"], class_map),
            "index": batch["index"], "mask": batch["mask"]}


def score_logits(logits: jax.Array, labels: jax.Array, class_map: ClassMap) -> dict:
    """What evaluation keeps of each example's logits: its top classes, -log p(label) and
    top probability (softmax over the allowed classes), its label among the model's."""
    logits = jnp.where(class_map.allowed, logits.astype(jnp.float32), -jnp.inf)
    labels = class_map.label_to_class[labels]
    log_probs = jax.nn.log_softmax(logits)
    top = top_classes(logits, TOP_K)
    return {
        "top_classes": top,
        "top_probabilities": jnp.where(
            top >= 0, jnp.exp(jnp.take_along_axis(log_probs, jnp.maximum(top, 0), axis=-1)), 0.0),
        "nll": -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0],
        "confidence": jnp.exp(jnp.max(log_probs, axis=-1)),
        "label": labels,
    }


def jit_train_step(mesh: Mesh, abstract_state: TrainState, *, portable_cpu_math: bool = False,
                   **step_kwargs) -> Callable:
    """`train_step` compiled for `mesh`: state donated, batch split over the batch axes.

    The state keeps the layout `abstract_state` has (its arrays' or shape structs'
    shardings, from `create_train_state`): replicated, or fsdp-sharded by the rules.
    """
    shardings = shardings_of(abstract_state)
    return _jit_step(train_step, mesh, shardings, step_kwargs, portable_cpu_math,
                     in_shardings=(shardings, batch_sharding(mesh)),
                     out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def jit_eval_step(mesh: Mesh, abstract_state: TrainState, *, portable_cpu_math: bool = False,
                  **step_kwargs) -> Callable:
    """`eval_step` compiled for `mesh`, the state where `abstract_state` keeps it."""
    shardings = shardings_of(abstract_state)
    return _jit_step(eval_step, mesh, shardings, step_kwargs, portable_cpu_math,
                     in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)),
                     out_shardings=replicated(mesh))


def _jit_step(step: Callable, mesh: Mesh, shardings: TrainState, step_kwargs: dict,
              portable_cpu_math: bool, **jit_kwargs) -> Callable:
    """`step` with its keyword arguments bound, jitted; under fsdp its parameters are
    gathered whole first (parallel/sharding.py)."""
    bound = functools.partial(step, **step_kwargs)
    if is_sharded(shardings.params):
        bound = gather_params_first(bound, mesh, name=step.__name__)
    return jax.jit(bound, compiler_options=compiler_options(mesh, portable_cpu_math),
                   **jit_kwargs)
