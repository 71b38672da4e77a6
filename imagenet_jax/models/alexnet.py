"""AlexNet (Krizhevsky et al. 2012) in Flax NNX: torchvision's one tower or the paper's two towers.

Layout: NHWC activations, HWIO kernels. `features` and `classifier` are `nnx.List`s
laid out index for index like torchvision's `nn.Sequential`s, the parameter-free
layers (ReLU, max pool, dropout, LRN) included, so a torchvision state_dict maps one
to one:

- `features.{i}.weight` (OIHW) is `features[i].kernel` after `transpose(2, 3, 1, 0)`;
  grouped convolutions (`original=True`) map the same way, both frameworks putting
  group g's outputs in channels `[g * O/G, (g + 1) * O/G)`.
- `classifier.{i}.weight` is `classifier[i].kernel.T`; biases map as they are.
- torchvision flattens the pooled NCHW features in (C, H, W) order; here NHWC features
  flatten in (H, W, C) order. The first Linear's weight `w` (4096, 256 * 6 * 6) therefore
  becomes `w.reshape(4096, 256, 6, 6).transpose(2, 3, 1, 0).reshape(6 * 6 * 256, 4096)`,
  i.e. kernel row `(h * 6 + w) * 256 + c` is torchvision column `c * 36 + h * 6 + w`.

This module also holds the parameter-free layers and `adaptive_avg_pool`, which VGG
reuses (vgg.py imports from here, never the reverse).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# He-normal, fan-out, as torchvision initialises VGG convolutions.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nnx.initializers.normal(0.01)


def _bin_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights that average each PyTorch adaptive-pooling bin.

    Bin i covers [floor(i * in / out), ceil((i + 1) * in / out)); bins may overlap, and
    when in < out a pixel is repeated across bins.
    """
    weights = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil division
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """PyTorch's `adaptive_avg_pool2d` over NHWC `x`, for any input of at least 1x1.

    A rectangle's mean is the product of a row mean and a column mean, so the pooling is
    two small matrix products; the weights stay float32 so a bfloat16 input is not
    averaged with rounded 1/n factors.
    """
    height, width = x.shape[1:3]
    out_h, out_w = output_size
    if height < 1 or width < 1:
        raise ValueError(f"adaptive_avg_pool needs a feature map of at least 1x1, got "
                         f"{height}x{width}: the input image is too small for this model")
    if (height, width) == (out_h, out_w):
        return x
    rows = jnp.asarray(_bin_matrix(height, out_h))
    cols = jnp.asarray(_bin_matrix(width, out_w))
    y = jnp.einsum("nhwc,ih,jw->nijc", x.astype(jnp.float32), rows, cols)
    return y.astype(x.dtype)


class ReLU(nnx.Module):
    """A parameter-free ReLU, kept as a layer so list indices match torchvision's."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(x)


class MaxPool(nnx.Module):
    """Max pooling without padding, floor mode (torchvision's `MaxPool2d(window, stride)`)."""

    def __init__(self, window: int, stride: int):
        self.window = window
        self.stride = stride

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.max_pool(x, (self.window, self.window), strides=(self.stride, self.stride),
                            padding="VALID")


class LocalResponseNorm(nnx.Module):
    """Local response normalisation across channels, Krizhevsky et al.'s section 3.3.

    b_c = a_c / (k + alpha * sum_{|j - c| <= n // 2} a_j^2) ** beta, channels beyond the
    edges counting as zero. As in the paper, alpha is not divided by n; torch's
    `nn.LocalResponseNorm(size=n, alpha=n * alpha, beta, k)` computes the same thing.
    """

    def __init__(self, size: int = 5, *, alpha: float = 1e-4, beta: float = 0.75,
                 k: float = 2.0):
        self.size = size
        self.alpha = alpha
        self.beta = beta
        self.k = k

    def __call__(self, x: jax.Array) -> jax.Array:
        # In bfloat16, k + alpha * sum rounds to k for most activations: use float32.
        squares = jnp.square(x.astype(jnp.float32))
        half = self.size // 2
        padded = jnp.pad(squares, ((0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)))
        channels = x.shape[-1]
        window_sum = sum(padded[..., j:j + channels] for j in range(self.size))
        scale = (self.k + self.alpha * window_sum) ** -self.beta
        return (x.astype(jnp.float32) * scale).astype(x.dtype)


def apply_layers(layers: Iterable[nnx.Module], x: jax.Array,
                 rngs: nnx.Rngs | None) -> jax.Array:
    """Runs `layers` in order, handing `rngs` to the dropout layers only."""
    for layer in layers:
        x = layer(x, rngs=rngs) if isinstance(layer, nnx.Dropout) else layer(x)
    return x


class AlexNet(nnx.Module):
    """AlexNet over NHWC images.

    Default: torchvision's single-tower variant (64-192-384-256-256 filters, no LRN),
    61,100,840 parameters at 1000 classes.

    `original=True`: the two-GPU network of the paper: 96-256-384-384-256 filters, conv2,
    conv4 and conv5 split into two groups (each tower sees only its own GPU's maps), and
    local response normalisation after the first two ReLUs, before their max pools;
    60,965,224 parameters at 1000 classes. Conv1 keeps torchvision's padding of 2, which
    at 224 pixels gives the paper's 55x55 maps (the paper's 224 only works unpadded at 227).

    Both share the classifier (dropout before each 4096-wide Linear) and the adaptive
    average pool to 6x6, so any input of at least 63x63 pixels works; 224 gives 6x6
    features directly. Initialisation: He-normal (fan-out) convolutions, N(0, 0.01)
    Linears, zero biases.
    """

    aux_loss_weights: tuple[float, ...] = ()  # no auxiliary heads

    def __init__(self, *, num_classes: int = 1000, original: bool = False,
                 dropout_rate: float = 0.5, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        conv = partial(nnx.Conv, kernel_init=conv_init, **kw)
        if original:
            self.features = nnx.List([
                conv(3, 96, (11, 11), strides=4, padding=2), ReLU(), LocalResponseNorm(),
                MaxPool(3, 2),
                conv(96, 256, (5, 5), padding=2, feature_group_count=2), ReLU(),
                LocalResponseNorm(), MaxPool(3, 2),
                conv(256, 384, (3, 3), padding=1), ReLU(),
                conv(384, 384, (3, 3), padding=1, feature_group_count=2), ReLU(),
                conv(384, 256, (3, 3), padding=1, feature_group_count=2), ReLU(),
                MaxPool(3, 2),
            ])
        else:
            self.features = nnx.List([
                conv(3, 64, (11, 11), strides=4, padding=2), ReLU(), MaxPool(3, 2),
                conv(64, 192, (5, 5), padding=2), ReLU(), MaxPool(3, 2),
                conv(192, 384, (3, 3), padding=1), ReLU(),
                conv(384, 256, (3, 3), padding=1), ReLU(),
                conv(256, 256, (3, 3), padding=1), ReLU(),
                MaxPool(3, 2),
            ])
        self.pool_size = (6, 6)
        linear = partial(nnx.Linear, kernel_init=linear_init, **kw)
        self.classifier = classifier_head(linear, 256 * math.prod(self.pool_size), num_classes,
                                          dropout_rate, dropout_first=True)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return pooled_classifier(self, x, rngs)


def classifier_head(linear: Callable[[int, int], nnx.Linear], in_features: int,
                    num_classes: int, dropout_rate: float, *, dropout_first: bool) -> nnx.List:
    """torchvision's AlexNet and VGG classifier: two 4096-wide Linears with ReLU and
    dropout, then the output Linear. AlexNet drops out before each hidden Linear, VGG
    after each ReLU; the order fixes the indices of torchvision's `classifier.{i}` names."""
    def hidden(features: int) -> list[nnx.Module]:
        block = [linear(features, 4096), ReLU()]
        dropout = nnx.Dropout(dropout_rate)
        return [dropout, *block] if dropout_first else [*block, dropout]

    return nnx.List([*hidden(in_features), *hidden(4096), linear(4096, num_classes)])


def pooled_classifier(model: nnx.Module, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """The forward pass AlexNet and VGG share: features, adaptive average pooling to
    `model.pool_size`, flatten, classifier."""
    x = apply_layers(model.features, x, rngs)
    x = adaptive_avg_pool(x, model.pool_size)
    return apply_layers(model.classifier, x.reshape(x.shape[0], -1), rngs)


AlexNetOriginal = partial(AlexNet, original=True)
