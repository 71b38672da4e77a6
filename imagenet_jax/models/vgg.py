"""VGG (Simonyan & Zisserman 2014) in Flax NNX: configurations A, B, D, E, with or without BN.

Layout: NHWC activations, HWIO kernels. `features` and `classifier` are `nnx.List`s
laid out index for index like torchvision's `nn.Sequential`s (ReLU, max-pool and
dropout layers included), so a torchvision `vgg*` / `vgg*_bn` state_dict maps one to one:

- `features.{i}.weight` (OIHW) is `features[i].kernel` after `transpose(2, 3, 1, 0)`;
  for BN variants `features.{i}.weight/bias/running_mean/running_var` are
  `features[i].scale/bias/mean/var`.
- `classifier.{i}.weight` is `classifier[i].kernel.T`; biases map as they are.
- torchvision flattens the pooled NCHW features in (C, H, W) order; here NHWC features
  flatten in (H, W, C) order. The first Linear's weight `w` (4096, 512 * 7 * 7) therefore
  becomes `w.reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0).reshape(7 * 7 * 512, 4096)`,
  i.e. kernel row `(h * 7 + w) * 512 + c` is torchvision column `c * 49 + h * 7 + w`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from imagenet_jax.models.alexnet import MaxPool, ReLU, classifier_head, pooled_classifier
from imagenet_jax.models.layers import BatchNorm

# Output channels of each 3x3 conv; "M" is a 2x2/2 max pool. Table 1 of the paper.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"),
}

# He-normal, fan-out, and N(0, 0.01) Linears: torchvision's VGG initialisation.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nnx.initializers.normal(0.01)


def make_features(config: Sequence[int | str], *, batch_norm: bool, dtype, param_dtype,
                  rngs: nnx.Rngs) -> tuple[list[nnx.Module], int]:
    """The convolutional trunk as torchvision lays it out, and its output channels.

    Each conv keeps its bias even before BatchNorm, as torchvision's `vgg*_bn` do.
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    layers: list[nnx.Module] = []
    in_features = 3
    for item in config:
        if item == "M":
            layers.append(MaxPool(2, 2))
            continue
        layers.append(nnx.Conv(in_features, item, (3, 3), padding=1, kernel_init=conv_init,
                               **kw))
        if batch_norm:
            layers.append(BatchNorm(item, momentum=0.9, epsilon=1e-5, **kw))
        layers.append(ReLU())
        in_features = item
    return layers, in_features


class VGG(nnx.Module):
    """A VGG classifier over NHWC images.

    Args:
      config: "A" (VGG-11), "B" (VGG-13), "D" (VGG-16) or "E" (VGG-19), or a custom
        sequence of conv widths and "M" pools.
      batch_norm: BatchNorm after every conv (torchvision's `vgg*_bn`).
      num_classes: size of the final linear layer.

    Features are average-pooled adaptively to 7x7 (at 224 pixels they already are), so any
    input of at least 32x32 pixels works: the five 2x2 pools then leave one pixel.
    """

    aux_loss_weights: tuple[float, ...] = ()  # no auxiliary heads

    def __init__(self, config: str | Sequence[int | str], *, batch_norm: bool = False,
                 num_classes: int = 1000, dropout_rate: float = 0.5, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(config, str):
            if config not in CONFIGS:
                raise ValueError(f"unknown VGG config {config!r}: expected one of "
                                 f"{', '.join(CONFIGS)}")
            config = CONFIGS[config]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        layers, channels = make_features(config, batch_norm=batch_norm, **kw)
        self.features = nnx.List(layers)
        self.pool_size = (7, 7)
        linear = partial(nnx.Linear, kernel_init=linear_init, **kw)
        self.classifier = classifier_head(linear, channels * math.prod(self.pool_size),
                                          num_classes, dropout_rate, dropout_first=False)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return pooled_classifier(self, x, rngs)


VGG11 = partial(VGG, "A")
VGG11_BN = partial(VGG, "A", batch_norm=True)
VGG13 = partial(VGG, "B")
VGG13_BN = partial(VGG, "B", batch_norm=True)
VGG16 = partial(VGG, "D")
VGG16_BN = partial(VGG, "D", batch_norm=True)
VGG19 = partial(VGG, "E")
VGG19_BN = partial(VGG, "E", batch_norm=True)
