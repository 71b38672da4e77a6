"""Learning-rate schedules and the optimizer, built from a config and its derived values."""

from __future__ import annotations

import jax
import ml_collections
import optax

from imagenet_jax.config import Derived


def create_learning_rate_fn(config: ml_collections.ConfigDict, derived: Derived) -> optax.Schedule:
    """Linear warmup to the batch-scaled peak, then cosine, step, exponential or constant.

    Warmup starts at peak / warmup_steps, not 0, so that the first step is not wasted.
    """
    peak = derived.peak_learning_rate
    warmup = derived.warmup_steps
    decay_steps = max(1, derived.num_train_steps - warmup)
    if config.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    elif config.lr_schedule == "step":
        boundaries = {
            round(epoch * derived.steps_per_epoch) - warmup: config.lr_decay_factor
            for epoch in config.lr_decay_epochs
        }
        after = optax.piecewise_constant_schedule(peak, boundaries)
    elif config.lr_schedule == "exponential":
        after = optax.exponential_decay(
            peak, transition_steps=round(config.lr_decay_every_epochs * derived.steps_per_epoch),
            decay_rate=config.lr_decay_factor, staircase=True)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    warmup_fn = optax.linear_schedule(peak / warmup, peak, warmup)
    return optax.join_schedules([warmup_fn, after], [warmup])


def kernel_mask(params) -> object:
    """True for conv and dense kernels: weight decay skips BatchNorm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum or RMSProp, after optional global-norm clipping.

    L2 decay of the kernels is added to the gradient before the optimizer's own
    statistics, as PyTorch's optimizers and the reference recipes do.

    The learning rate is a hyperparameter held in the optimizer state, which the train
    step sets to `learning_rate_fn(state.step)` before each update (`with_learning_rate`).
    A schedule counted inside the optimizer would drift from the step: a skipped step
    (non-finite, or a float16 overflow) rolls the optimizer state back, its count too,
    while the step advances; so the rate applied at step s is the schedule's at s.
    """
    def chain(learning_rate):
        if config.optimizer == "sgd":
            update = optax.sgd(learning_rate, momentum=config.momentum,
                               nesterov=config.nesterov)
        else:  # TensorFlow's RMSProp (squares start at 1, epsilon inside the root): Inception-v3
            update = optax.rmsprop(learning_rate, decay=config.rmsprop_decay,
                                   eps=config.rmsprop_epsilon, initial_scale=1.0,
                                   momentum=config.momentum)
        clip = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
        return optax.chain(
            *clip,
            optax.add_decayed_weights(config.weight_decay, mask=kernel_mask),
            update,
        )

    return optax.inject_hyperparams(chain)(learning_rate=0.0)


def with_learning_rate(opt_state: optax.OptState, learning_rate: jax.Array) -> optax.OptState:
    """`opt_state` of `create_optimizer` with the rate its next update applies."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": learning_rate})
