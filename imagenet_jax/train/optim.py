"""Learning-rate schedules and the optimizer, built from a config and its derived values."""

from __future__ import annotations

import jax
import ml_collections
import optax

from imagenet_jax.config import Derived


def create_learning_rate_fn(config: ml_collections.ConfigDict, derived: Derived) -> optax.Schedule:
    """Linear warmup from 0 to the batch-scaled peak, then cosine, step or constant."""
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
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def kernel_mask(params) -> object:
    """True for conv and dense kernels: weight decay skips BatchNorm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum; L2 decay of the kernels added to the gradient
    before momentum, as PyTorch's SGD and the reference ResNet recipes do."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=kernel_mask),
        optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov),
    )
