"""Inception-v3 (Szegedy et al. 2015, "Rethinking the Inception Architecture") in Flax NNX.

torchvision's layout, module for module: the stem `Conv2d_1a_3x3`, `Conv2d_2a_3x3`,
`Conv2d_2b_3x3`, (max pool), `Conv2d_3b_1x1`, `Conv2d_4a_3x3`, (max pool); the blocks
`Mixed_5b..5d` (InceptionA), `Mixed_6a` (InceptionB), `Mixed_6b..6e` (InceptionC, factorised
7x7), `Mixed_7a` (InceptionD), `Mixed_7b..7c` (InceptionE); the auxiliary head `AuxLogits` on
Mixed_6e; global average pool, dropout 0.5 and `fc`. Every convolution is a `BasicConv2d`:
a conv without bias, BatchNorm (eps 0.001) and ReLU. 27,161,264 parameters at 1000 classes
with the auxiliary head, 23,834,568 without, as torchvision.

Layout: NHWC activations, HWIO kernels. A torchvision state_dict maps one to one:
`X.conv.weight` (OIHW) is `X/conv/kernel` after `transpose(2, 3, 1, 0)`; `X.bn.weight`,
`X.bn.bias`, `X.bn.running_mean`, `X.bn.running_var` are `X/bn/scale`, `bias`, `mean`, `var`
(`num_batches_tracked` has no counterpart); a Linear's `weight` is `kernel.T`, its `bias` is
`bias`. torchvision's pretrained weights expect `transform_input=True`.

Resolution: native 299x299. The net accepts 75x75 and up, except that the auxiliary head
(as in torchvision) needs a 17x17 Mixed_6e map, i.e. 299x299 or more, so training below 299
needs `aux_logits=False`.

Auxiliary loss: 0.4 times the auxiliary head's cross-entropy, torchvision's reference
recipe; the paper does not give a weight.

Initialisation: truncated normal, std 0.1 (0.01 for the auxiliary 5x5 conv, 0.001 for the
auxiliary `fc`), BatchNorm scale 1 and bias 0, Linear biases 0. torchvision truncates at
+-2 absolute (effectively an untruncated normal at these stds) and leaves Linear biases at
PyTorch's default; its loop also misses the auxiliary conv's 0.01, which is set on the
BasicConv2d wrapper rather than on its Conv2d. Here truncation is at +-2 std, as in the
original TensorFlow models.

This module also holds the pieces googlenet.py shares: `BasicConv2d` and PyTorch-style
pooling.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from imagenet_jax.models.layers import BatchNorm

# Rescales inputs normalised with the ImageNet mean/std to (x - 0.5) / 0.5 per channel, the
# normalisation Google's original weights (ported by torchvision) were trained with.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_to_unit_range(x: jax.Array) -> jax.Array:
    """Maps ImageNet-normalised NHWC images to the [-1, 1] range torchvision's ports expect."""
    scale = jnp.asarray([s / 0.5 for s in _IMAGENET_STD], x.dtype)
    shift = jnp.asarray([(m - 0.5) / 0.5 for m in _IMAGENET_MEAN], x.dtype)
    return x * scale + shift


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class BasicConv2d(nnx.Module):
    """Conv (no bias) + BatchNorm (eps 0.001, PyTorch momentum 0.1) + ReLU, symmetric padding."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | tuple[int, int],
                 *, stride: int = 1, padding: int | tuple[int, int] = 0, stddev: float = 0.1,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        pad_h, pad_w = _pair(padding)
        self.conv = nnx.Conv(
            in_features, out_features, _pair(kernel_size), strides=stride,
            padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
            kernel_init=nnx.initializers.truncated_normal(stddev), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(out_features, momentum=0.9, epsilon=1e-3, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


def _pool_padding(size: int, kernel: int, stride: int, padding: int,
                  ceil_mode: bool) -> tuple[int, int]:
    """(low, high) padding of one spatial axis that yields PyTorch's pooled size.

    Ceil mode keeps a last, partial window, as long as it starts inside the input or the
    low padding; the missing pixels become extra high padding.
    """
    span = size + 2 * padding - kernel
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
    else:
        out = span // stride + 1
    if out < 1:
        raise ValueError(f"a {kernel}x{kernel}/{stride} pool cannot take a {size}-pixel map: "
                         "the input image is too small for this network")
    extra = (out - 1) * stride + kernel - (size + 2 * padding)
    return padding, padding + max(extra, 0)


def max_pool2d(x: jax.Array, kernel_size: int, stride: int, padding: int = 0, *,
               ceil_mode: bool = False) -> jax.Array:
    """PyTorch's max_pool2d on NHWC: padding counts as -inf; `ceil_mode` as in PyTorch."""
    pads = tuple(_pool_padding(n, kernel_size, stride, padding, ceil_mode) for n in x.shape[1:3])
    return nnx.max_pool(x, (kernel_size, kernel_size), strides=(stride, stride), padding=pads)


def avg_pool2d(x: jax.Array, kernel_size: int, stride: int, padding: int = 0) -> jax.Array:
    """PyTorch's avg_pool2d on NHWC (floor mode; zero padding counts in the mean)."""
    pads = tuple(_pool_padding(n, kernel_size, stride, padding, False) for n in x.shape[1:3])
    return nnx.avg_pool(x, (kernel_size, kernel_size), strides=(stride, stride), padding=pads,
                        count_include_pad=True)


class InceptionA(nnx.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 (`pool_features`)."""

    def __init__(self, in_features: int, pool_features: int, *, rngs: nnx.Rngs, **kw):
        conv = partial(BasicConv2d, rngs=rngs, **kw)
        self.branch1x1 = conv(in_features, 64, 1)
        self.branch5x5_1 = conv(in_features, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_features, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_features, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(avg_pool2d(x, 3, 1, 1))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs, **kw):
        conv = partial(BasicConv2d, rngs=rngs, **kw)
        self.branch3x3 = conv(in_features, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_features, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = max_pool2d(x, 3, 2)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with 7x7 convs factorised into 1x7 and 7x1 (`channels_7x7` wide)."""

    def __init__(self, in_features: int, channels_7x7: int, *, rngs: nnx.Rngs, **kw):
        conv = partial(BasicConv2d, rngs=rngs, **kw)
        c7 = channels_7x7
        self.branch1x1 = conv(in_features, 192, 1)
        self.branch7x7_1 = conv(in_features, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_features, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_features, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(avg_pool2d(x, 3, 1, 1))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs, **kw):
        conv = partial(BasicConv2d, rngs=rngs, **kw)
        self.branch3x3_1 = conv(in_features, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_features, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                      self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = max_pool2d(x, 3, 2)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block whose 3x3 branches fan out into parallel 1x3 and 3x1 convs."""

    def __init__(self, in_features: int, *, rngs: nnx.Rngs, **kw):
        conv = partial(BasicConv2d, rngs=rngs, **kw)
        self.branch1x1 = conv(in_features, 320, 1)
        self.branch3x3_1 = conv(in_features, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_features, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_features, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = self.branch1x1(x)
        y = self.branch3x3_1(x)
        branch3x3 = [self.branch3x3_2a(y), self.branch3x3_2b(y)]
        y = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = [self.branch3x3dbl_3a(y), self.branch3x3dbl_3b(y)]
        branch_pool = self.branch_pool(avg_pool2d(x, 3, 1, 1))
        return jnp.concatenate([branch1x1, *branch3x3, *branch3x3dbl, branch_pool], axis=-1)


class InceptionAux(nnx.Module):
    """Auxiliary classifier on the 17x17 Mixed_6e map: avg pool 5x5/3, 1x1 (128), 5x5 (768),
    global average pool, `fc`."""

    # The 5x5/3 pool and the unpadded 5x5 conv need a 17x17 map (a 299x299 input).
    MIN_SIZE = 17

    def __init__(self, in_features: int, num_classes: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv0 = BasicConv2d(in_features, 128, 1, **kw)
        self.conv1 = BasicConv2d(128, 768, 5, stddev=0.01, **kw)
        self.fc = nnx.Linear(768, num_classes,
                             kernel_init=nnx.initializers.truncated_normal(0.001), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if min(x.shape[1:3]) < self.MIN_SIZE:
            raise ValueError(
                f"the auxiliary head needs a {self.MIN_SIZE}x{self.MIN_SIZE} Mixed_6e map, got "
                f"{x.shape[1]}x{x.shape[2]}: train at 299x299 or more, or use aux_logits=False")
        x = self.conv1(self.conv0(avg_pool2d(x, 5, 3)))
        return self.fc(jnp.mean(x, axis=(1, 2)))


class InceptionV3(nnx.Module):
    """Inception-v3 over NHWC images, torchvision's layout and names.

    Args:
      num_classes: size of `fc` (and of the auxiliary head's `fc`).
      aux_logits: build `AuxLogits`; in training the model then returns
        `(logits, (aux_logits,))`.
      transform_input: rescale ImageNet-normalised inputs to (x - 0.5) / 0.5, for
        torchvision's pretrained weights.
      dropout: dropout rate before `fc`.
    """

    aux_loss_weights: tuple[float, ...] = (0.4,)

    def __init__(self, *, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, dropout: float = 0.5, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.transform_input = transform_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, pool_features=32, **kw)
        self.Mixed_5c = InceptionA(256, pool_features=64, **kw)
        self.Mixed_5d = InceptionA(288, pool_features=64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, **kw)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, **kw)
        self.AuxLogits = InceptionAux(768, num_classes, **kw) if aux_logits else None
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, **kw)
        self.Mixed_7c = InceptionE(2048, **kw)
        self.dropout = nnx.Dropout(dropout)
        self.fc = nnx.Linear(2048, num_classes,
                             kernel_init=nnx.initializers.truncated_normal(0.1), **kw)
        if not aux_logits:
            self.aux_loss_weights = ()
        self.deterministic = False  # flipped by model.train() / model.eval()

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None
                 ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        if self.transform_input:
            x = imagenet_to_unit_range(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool2d(x, 3, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool2d(x, 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        with_aux = self.AuxLogits is not None and not self.deterministic
        aux = self.AuxLogits(x) if with_aux else None
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        x = self.dropout(jnp.mean(x, axis=(1, 2)), rngs=rngs)
        logits = self.fc(x)
        return (logits, (aux,)) if with_aux else logits
