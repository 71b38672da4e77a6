"""Learning-rate schedules and the optimizer, built from a config and its derived values."""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from imagenet_jax.config import Derived
from imagenet_jax.parallel.sharding import path_name


def create_learning_rate_fn(config: ml_collections.ConfigDict, derived: Derived) -> optax.Schedule:
    """Linear warmup to the batch-scaled peak, then cosine, step, exponential, polynomial
    (MLPerf's: (peak - end) (1 - t)^power + end) or constant.

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
    elif config.lr_schedule == "poly":
        after = optax.polynomial_schedule(peak, config.lr_poly_end, config.lr_poly_power,
                                          decay_steps)
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
    """`config.optimizer` after optional global-norm clipping, its weight decay on kernels only.

    sgd and rmsprop add L2 decay to the gradient before their statistics, as PyTorch's
    optimizers and the reference recipes do. lars (You et al. 2017, MLPerf's ResNet-50)
    and lamb (You et al. 2019) add it to the update and scale each kernel's update by its
    trust ratio, ||w|| / ||update||; BatchNorm parameters and biases get neither the decay
    nor a trust ratio, as both papers' and MLPerf's implementations exclude them. adamw
    decays decoupled from the gradient statistics (Loshchilov & Hutter 2019).

    The learning rate is a hyperparameter held in the optimizer state, which the train
    step sets to `learning_rate_fn(state.step)` before each update (`with_learning_rate`).
    A schedule counted inside the optimizer would drift from the step: a skipped step
    (non-finite, or a float16 overflow) rolls the optimizer state back, its count too,
    while the step advances; so the rate applied at step s is the schedule's at s.
    """
    def chain(learning_rate):
        clip = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
        links = [*clip, *update_rule(config, learning_rate)]
        if config.freeze:
            # The frozen parameters' updates pass through unchanged (the step gives them zero
            # gradients and keeps them as they were): no state, no decay, no clipping share.
            links = [optax.masked(optax.chain(*links), trained_mask(config.freeze))]
        if config.lr_multipliers:
            links.append(scale_by_path(tuple(config.lr_multipliers)))
        return optax.chain(*links)

    return optax.inject_hyperparams(chain)(learning_rate=0.0)


def frozen_mask(pattern: str, params) -> object:
    """True for the parameters `pattern` (config.freeze) finds in their '/'-joined path;
    all False for ''."""
    regex = re.compile(pattern) if pattern else None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(regex and regex.search(path_name(path))), params)


def trained_mask(pattern: str) -> Callable:
    """The optimizer's mask of the parameters that train: those `pattern` does not find."""
    return lambda params: jax.tree.map(lambda frozen: not frozen, frozen_mask(pattern, params))


def path_multiplier(name: str, multipliers: tuple) -> float:
    """The learning-rate factor of parameter `name`: the first matching rule's, else 1."""
    return next((float(factor) for pattern, factor in multipliers if re.search(pattern, name)),
                1.0)


def scale_by_path(multipliers: tuple) -> optax.GradientTransformation:
    """Multiplies each parameter's update by its `path_multiplier`: after the whole update
    (momentum, adaptive scaling, weight decay, trust ratio), so each matched group steps as
    with its own learning rate. Holds no state."""
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u if (f := path_multiplier(path_name(path), multipliers)) == 1.0
            else u * jnp.asarray(f, u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def update_rule(config: ml_collections.ConfigDict, learning_rate
                ) -> tuple[optax.GradientTransformation, ...]:
    """The optimizer's update, weight decay included, as `create_optimizer` describes: the
    links of a flat chain (sgd's and rmsprop's as since the first checkpoints, whose
    optimizer state has this structure)."""
    decay = config.weight_decay
    if config.optimizer == "lars":
        return (optax.lars(learning_rate, weight_decay=decay, weight_decay_mask=kernel_mask,
                          trust_coefficient=config.lars_trust_coefficient,
                          trust_ratio_mask=kernel_mask, momentum=config.momentum,
                          nesterov=config.nesterov),)
    if config.optimizer == "lamb":
        # optax.lamb would scale BatchNorm and bias updates by a trust ratio too.
        return (optax.scale_by_adam(config.adam_b1, config.adam_b2, config.adam_epsilon),
                optax.add_decayed_weights(decay, mask=kernel_mask),
                optax.masked(optax.scale_by_trust_ratio(), kernel_mask),
                optax.scale_by_learning_rate(learning_rate))
    if config.optimizer == "adamw":
        return (optax.adamw(learning_rate, b1=config.adam_b1, b2=config.adam_b2,
                            eps=config.adam_epsilon, weight_decay=decay, mask=kernel_mask),)
    if config.optimizer == "sgd":
        update = optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov)
    else:  # TensorFlow's RMSProp (squares start at 1, epsilon inside the root): Inception-v3
        update = optax.rmsprop(learning_rate, decay=config.rmsprop_decay,
                               eps=config.rmsprop_epsilon, initial_scale=1.0,
                               momentum=config.momentum)
    return optax.add_decayed_weights(decay, mask=kernel_mask), update


def with_learning_rate(opt_state: optax.OptState, learning_rate: jax.Array) -> optax.OptState:
    """`opt_state` of `create_optimizer` with the rate its next update applies."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": learning_rate})
