"""Layers shared by the model families: BatchNorm with per-group batch statistics.

Large-batch recipes (Goyal et al. 2017: 32 examples; the MLPerf ResNet-50 references)
compute BatchNorm statistics over small groups of examples, not the whole global batch:
the per-group batch stays the size the recipe was tuned at however large the global
batch grows, and a group held by one device costs no collective in the forward pass.
`BatchNorm` here is `nnx.BatchNorm` (same variables and names: `scale`, `bias`, `mean`,
`var`, so checkpoints and the torchvision mappings are unchanged) with a `num_groups`
attribute:

- 1 (the default): nnx.BatchNorm's arithmetic: statistics over the whole (global) batch.
  Under `jax.jit` on a sharded batch, XLA all-reduces them across the devices.
- G > 1, in training: the batch is cut into G equal consecutive blocks and each block is
  normalised with its own mean and variance. The batch is laid out block by block over
  the devices (parallel/mesh.py), so when a device's examples are whole groups,
  normalising needs no communication at all; and the groups are the same on any number
  of devices. The running averages move towards the whole batch's mean and variance,
  computed from the group moments (the mean of the group variances plus the variance of
  the group means): what G = 1 would record. One all-reduce of 2 x C floats per layer,
  which nothing downstream in the step waits for, so XLA may overlap it with the rest.

Training with G > 1 (or an unbiased running variance) is computed here with public jax
ops in nnx.BatchNorm's order and dtypes (tests/test_private_apis.py holds that code, run
on one group, equal to nnx.BatchNorm in float32, bfloat16 and float16). One group, and
evaluation (`use_running_average`), are nnx.BatchNorm's own.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` whose training statistics cover `num_groups` blocks of the batch apart."""

    def __init__(self, num_features: int, *, num_groups: int = 1,
                 unbiased_running_var: bool = False, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_groups = num_groups
        # The running variance moves toward the batch variance times n / (n - 1) (n values
        # per feature), as torch's BatchNorm does; flax's uses the biased variance. The
        # normalisation itself is the same either way.
        self.unbiased_running_var = unbiased_running_var
        # Fixed (fine-tuning: config.freeze, batchnorm_frozen): normalises with the running
        # statistics in training too, and never updates them.
        self.frozen = False

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        if self.frozen:
            use_running_average = True
        running = self.use_running_average if use_running_average is None else use_running_average
        if running or (self.num_groups == 1 and not self.unbiased_running_var):
            # nnx.BatchNorm's own. Computing one group here instead is as exact but rounds
            # differently, and free-running training amplifies any rounding step by step
            # (BENCHMARKS.md, "BatchNorm's variance: one pass or two").
            return super().__call__(x, use_running_average, mask=mask)
        if mask is not None:  # nnx.BatchNorm's masked statistics, of the whole batch only
            if self.num_groups > 1 or self.unbiased_running_var:
                raise ValueError("BatchNorm with num_groups > 1 or unbiased_running_var does "
                                 "not take a mask")
            return super().__call__(x, use_running_average, mask=mask)
        return self._grouped(x)

    def _grouped(self, x: jax.Array) -> jax.Array:
        """Normalises each of `num_groups` blocks of the batch with its own statistics."""
        groups = self.num_groups
        if x.shape[0] % groups:
            raise ValueError(f"BatchNorm: a batch of {x.shape[0]} does not split into "
                             f"{groups} groups")
        feature_axis = self.axis % x.ndim
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
        # Axis 0 is the group; every other axis but the features is reduced.
        grouped = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        reduction_axes = tuple(a for a in range(1, grouped.ndim) if a != feature_axis + 1)
        mean, var = self._moments(grouped, reduction_axes)
        # The whole batch's moments from the groups' (equal sizes): the law of total variance.
        batch_mean = mean.mean(axis=0)
        batch_var = var.mean(axis=0) + jax.lax.square(mean - batch_mean).mean(axis=0)
        if self.unbiased_running_var:
            count = x.size // x.shape[feature_axis]
            batch_var = batch_var * (count / max(count - 1, 1))
        self._update_running_averages(batch_mean.reshape(-1), batch_var.reshape(-1))
        feature_shape = [1] * x.ndim
        feature_shape[feature_axis] = x.shape[feature_axis]
        y = self._normalize(grouped, mean, var, scale, bias, feature_shape)
        return y.reshape(x.shape)

    def _moments(self, x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """Mean and variance over `axes` (kept, as 1s), in float32 at least, as nnx.BatchNorm
        computes them: E[x^2] - E[x]^2 clamped at 0 when `use_fast_variance`."""
        dtype = x.dtype if self.dtype is None else self.dtype
        x = x.astype(jnp.promote_types(dtype, jnp.float32))
        mean = x.mean(axes, keepdims=True)
        if self.use_fast_variance:
            mean_of_squares = jax.lax.square(x).mean(axes, keepdims=True)
            var = jnp.maximum(0.0, mean_of_squares - jax.lax.square(mean))
        else:
            var = jax.lax.square(x - mean).mean(axes, keepdims=True)
        return mean, var

    def _normalize(self, x: jax.Array, mean: jax.Array, var: jax.Array,
                   scale: jax.Array | None, bias: jax.Array | None,
                   feature_shape: list[int]) -> jax.Array:
        """(x - mean) / sqrt(var + epsilon) * scale + bias in nnx.BatchNorm's order of
        operations; the result in `dtype`, or the type of x, scale and bias together."""
        y = x - mean
        multiplier = jax.lax.rsqrt(var + self.epsilon)
        if scale is not None:
            multiplier = multiplier * scale.reshape(feature_shape)
        y = y * multiplier
        if bias is not None:
            y = y + bias.reshape(feature_shape)
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
        return y.astype(dtype)

    def _update_running_averages(self, mean: jax.Array, var: jax.Array) -> None:
        momentum = self.momentum
        self.mean[...] = jax.lax.stop_gradient(momentum * self.mean[...] + (1 - momentum) * mean)
        self.var[...] = jax.lax.stop_gradient(momentum * self.var[...] + (1 - momentum) * var)


def batchnorm_groups(group_examples: int, global_batch_size: int) -> int:
    """How many groups of `group_examples` the batch makes: 0, or a batch no larger than
    a group, means one (global)."""
    if group_examples == 0 or global_batch_size <= group_examples:
        return 1
    if group_examples < 0 or global_batch_size % group_examples:
        raise ValueError(f"batchnorm group of {group_examples} examples does not divide the "
                         f"batch of {global_batch_size}")
    return global_batch_size // group_examples


def set_batchnorm_groups(model: nnx.Module, num_groups: int,
                         unbiased_running_var: bool = False) -> nnx.Module:
    """Sets `num_groups` (and `unbiased_running_var`) on every BatchNorm of `model` (in
    place) and returns it.

    A model still built on plain `nnx.BatchNorm` cannot group its statistics: with
    num_groups > 1 that is an error, not a silent fall-back to global statistics.
    """
    for path, module in nnx.iter_modules(model):
        if isinstance(module, BatchNorm):
            module.num_groups = num_groups
            module.unbiased_running_var = unbiased_running_var
        elif isinstance(module, nnx.BatchNorm) and (num_groups > 1 or unbiased_running_var):
            raise TypeError(f"{'/'.join(map(str, path))} is an nnx.BatchNorm; use "
                            "imagenet_jax.models.layers.BatchNorm to group its statistics")
    return model


def freeze_batchnorm(model: nnx.Module, is_frozen: Callable[[str], bool]) -> nnx.Module:
    """Fixes (in place) every BatchNorm of `model` for which `is_frozen(path)` holds, `path`
    its module path ('stages/0/0/conv1/bn'), and returns the model."""
    for path, module in nnx.iter_modules(model):
        name = "/".join(map(str, path))
        if isinstance(module, BatchNorm):
            module.frozen = is_frozen(name)
        elif isinstance(module, nnx.BatchNorm) and is_frozen(name):
            raise TypeError(f"{name} is an nnx.BatchNorm; use imagenet_jax.models.layers."
                            "BatchNorm to fix its statistics")
    return model
