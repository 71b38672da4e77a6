"""ResNet (He et al. 2015) in Flax NNX: v1.5 by default; v1, ResNet-D, Wide and ResNeXt options.

Layout: NHWC activations, HWIO kernels. Each conv and its BatchNorm are one `ConvBN`
module, so the names differ from torchvision's: `stem[0].conv/.bn` is `conv1`/`bn1`,
`stages[i][j].convK.conv/.bn` is `layer{i+1}.{j}.convK`/`.bnK`, `downsample.proj.conv/.bn`
is `downsample.0`/`.1`, `fc` is `fc`. imagenet_jax/weights.py maps them in code (and
the layouts: an OIHW kernel is HWIO here after `transpose(2, 3, 1, 0)`, `fc.weight` is
`fc.kernel.T`); the names stay, so checkpoints written so far still restore.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from imagenet_jax.models.layers import BatchNorm

# He-normal, fan-out, as torchvision initialises ResNet convolutions.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBN(nnx.Module):
    """Convolution without bias followed by BatchNorm, torchvision's padding (k // 2)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
                 groups: int = 1, zero_init_scale: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        pad = kernel_size // 2
        self.conv = nnx.Conv(
            in_features, out_features, (kernel_size, kernel_size), strides=stride,
            padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
            kernel_init=conv_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(
            out_features, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
            scale_init=nnx.initializers.zeros if zero_init_scale else nnx.initializers.ones,
            rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class Downsample(nnx.Module):
    """The projection shortcut: a strided 1x1 conv (v1, v1.5) or avg-pool then 1x1 (ResNet-D)."""

    def __init__(self, in_features: int, out_features: int, stride: int, *, avg_pool: bool,
                 rngs: nnx.Rngs, **kw):
        self.pool_stride = stride if avg_pool else 1
        self.proj = ConvBN(in_features, out_features, 1, stride=1 if avg_pool else stride,
                           rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool_stride > 1:
            s = self.pool_stride
            x = nnx.avg_pool(x, (s, s), strides=(s, s), padding="VALID")
        return self.proj(x)


class BasicBlock(nnx.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_features: int, planes: int, stride: int, *, groups: int = 1,
                 base_width: int = 64, stride_on_1x1: bool = False, avg_down: bool = False,
                 zero_init_residual: bool = False, rngs: nnx.Rngs, **kw):
        del groups, base_width, stride_on_1x1  # Bottleneck-only options.
        self.conv1 = ConvBN(in_features, planes, 3, stride=stride, rngs=rngs, **kw)
        self.conv2 = ConvBN(planes, planes, 3, zero_init_scale=zero_init_residual, rngs=rngs, **kw)
        self.downsample = (
            Downsample(in_features, planes, stride, avg_pool=avg_down, rngs=rngs, **kw)
            if stride != 1 or in_features != planes else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = nnx.relu(self.conv1(x))
        return nnx.relu(self.conv2(y) + shortcut)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand (ResNet-50 and deeper).

    v1.5 strides the 3x3 conv; v1 (`stride_on_1x1`) strides the first 1x1.
    """

    expansion = 4

    def __init__(self, in_features: int, planes: int, stride: int, *, groups: int = 1,
                 base_width: int = 64, stride_on_1x1: bool = False, avg_down: bool = False,
                 zero_init_residual: bool = False, rngs: nnx.Rngs, **kw):
        width = int(planes * base_width / 64) * groups
        out_features = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_on_1x1 else (1, stride)
        self.conv1 = ConvBN(in_features, width, 1, stride=stride_1x1, rngs=rngs, **kw)
        self.conv2 = ConvBN(width, width, 3, stride=stride_3x3, groups=groups, rngs=rngs, **kw)
        self.conv3 = ConvBN(width, out_features, 1, zero_init_scale=zero_init_residual,
                            rngs=rngs, **kw)
        self.downsample = (
            Downsample(in_features, out_features, stride, avg_pool=avg_down, rngs=rngs, **kw)
            if stride != 1 or in_features != out_features else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = nnx.relu(self.conv1(x))
        y = nnx.relu(self.conv2(y))
        return nnx.relu(self.conv3(y) + shortcut)


class ResNet(nnx.Module):
    """A ResNet classifier over NHWC images.

    Args:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: `BasicBlock` or `Bottleneck`.
      num_classes: size of the final linear layer.
      width: channels of the stem and of the first stage's `planes`.
      stem: "imagenet" (7x7/2 conv + 3x3/2 max pool), "deep" (three 3x3 convs, ResNet-D)
        or "small" (one 3x3/1 conv, no pool: for low-resolution images).
      groups, base_width: ResNeXt cardinality and width per group; Wide ResNet doubles
        `base_width`.
    """

    aux_loss_weights: tuple[float, ...] = ()  # no auxiliary heads

    def __init__(self, stage_sizes: Sequence[int], block: type[BasicBlock] | type[Bottleneck], *,
                 num_classes: int = 1000, width: int = 64, stem: str = "imagenet",
                 groups: int = 1, base_width: int = 64, stride_on_1x1: bool = False,
                 avg_down: bool = False, zero_init_residual: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if stem == "imagenet":
            self.stem = nnx.List([ConvBN(3, width, 7, stride=2, **kw)])
        elif stem == "deep":
            self.stem = nnx.List([ConvBN(3, width // 2, 3, stride=2, **kw),
                                  ConvBN(width // 2, width // 2, 3, **kw),
                                  ConvBN(width // 2, width, 3, **kw)])
        elif stem == "small":
            self.stem = nnx.List([ConvBN(3, width, 3, **kw)])
        else:
            raise ValueError(f"unknown stem {stem!r}: expected 'imagenet', 'deep' or 'small'")
        self.max_pool = stem != "small"
        block_kw = dict(groups=groups, base_width=base_width, stride_on_1x1=stride_on_1x1,
                        avg_down=avg_down, zero_init_residual=zero_init_residual, **kw)
        in_features = width
        stages = []
        for i, num_blocks in enumerate(stage_sizes):
            planes = width * 2**i
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_features, planes, stride, **block_kw))
                in_features = planes * block.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.fc = nnx.Linear(in_features, num_classes, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        del rngs  # no dropout
        for layer in self.stem:
            x = nnx.relu(layer(x))
        if self.max_pool:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)


ResNet18 = partial(ResNet, (2, 2, 2, 2), BasicBlock)
ResNet34 = partial(ResNet, (3, 4, 6, 3), BasicBlock)
ResNet50 = partial(ResNet, (3, 4, 6, 3), Bottleneck)
ResNet101 = partial(ResNet, (3, 4, 23, 3), Bottleneck)
ResNet152 = partial(ResNet, (3, 8, 36, 3), Bottleneck)
ResNet200 = partial(ResNet, (3, 24, 36, 3), Bottleneck)
WideResNet50_2 = partial(ResNet50, base_width=128)
WideResNet101_2 = partial(ResNet101, base_width=128)
ResNeXt50_32x4d = partial(ResNet50, groups=32, base_width=4)
ResNeXt101_32x8d = partial(ResNet101, groups=32, base_width=8)
# The demo model: four one-block stages of 16..128 channels and a stride-1 stem, for
# images of 32-64 pixels on a laptop CPU.
ResNetTiny = partial(ResNet, (1, 1, 1, 1), BasicBlock, width=16, stem="small")
