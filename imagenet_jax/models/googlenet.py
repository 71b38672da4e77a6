"""GoogLeNet (Inception-v1, Szegedy et al. 2014, "Going Deeper with Convolutions") in Flax NNX.

torchvision's batch-normalised variant, module for module: `conv1` (7x7/2), `maxpool1`,
`conv2` (1x1), `conv3` (3x3), `maxpool2`, `inception3a..3b`, `maxpool3`, `inception4a..4e`,
`maxpool4`, `inception5a..5b`, global average pool, dropout 0.2 and `fc`; with
`aux_logits`, the auxiliary heads `aux1` (on inception4a) and `aux2` (on inception4d).
Every convolution is a `BasicConv2d`: a conv without bias, BatchNorm (eps 0.001) and ReLU
(the paper has no BatchNorm). Each Inception block's "5x5" branch (`branch3`) is a 3x3 conv,
as in torchvision (a slip there that its pretrained weights depend on), not the paper's 5x5.
Max pools round their output size up (PyTorch's ceil_mode=True), the missing pixels counting
as -inf. 6,624,904 parameters at 1000 classes, 13,004,888 with the auxiliary heads, as
torchvision.

Layout: NHWC activations, HWIO kernels. A torchvision state_dict maps one to one:
`X.conv.weight` (OIHW) is `X/conv/kernel` after `transpose(2, 3, 1, 0)`; `X.bn.weight`,
`X.bn.bias`, `X.bn.running_mean`, `X.bn.running_var` are `X/bn/scale`, `bias`, `mean`, `var`
(`num_batches_tracked` has no counterpart); the branches keep torchvision's Sequential
indices (`inception3a.branch2.1.conv.weight` is `inception3a/branch2/1/conv/kernel`; index 0
of `branch4` is its parameterless max pool); a Linear's `weight` is `kernel.T`, its `bias` is
`bias`. The auxiliary heads flatten in torchvision's (C, H, W) order so that `fc1.weight`
maps the same way. torchvision's pretrained weights expect `transform_input=True`.

Resolution: native 224x224; accepted from 15x15 up, as in torchvision.

Auxiliary losses: 0.3 times each auxiliary head's cross-entropy, as in the paper.

Initialisation: truncated normal with std 0.01 for every conv and Linear kernel, BatchNorm
scale 1 and bias 0, Linear biases 0. torchvision truncates at +-2 absolute (effectively an
untruncated normal at this std) and leaves Linear biases at PyTorch's default; here
truncation is at +-2 std.

`BasicConv2d` and the PyTorch-style pooling are shared with inception.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagenet_jax.models.inception import BasicConv2d, imagenet_to_unit_range, max_pool2d

INIT_STDDEV = 0.01


class MaxPool2d(nnx.Module):
    """A parameterless max pool, as a module so that it can take its place in a branch's
    layer list (and keep torchvision's Sequential indices)."""

    def __init__(self, kernel_size: int, stride: int, padding: int = 0, *,
                 ceil_mode: bool = False):
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.ceil_mode = ceil_mode

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool2d(x, self.kernel_size, self.stride, self.padding,
                          ceil_mode=self.ceil_mode)


def _adaptive_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging matrix of PyTorch's adaptive pooling: output cell i averages
    inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1 (windows may overlap)."""
    weights = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -(-(i + 1) * in_size // out_size)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool2d(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """PyTorch's adaptive_avg_pool2d on NHWC, for any input size (smaller ones repeat)."""
    rows = jnp.asarray(_adaptive_weights(x.shape[1], output_size[0]), x.dtype)
    cols = jnp.asarray(_adaptive_weights(x.shape[2], output_size[1]), x.dtype)
    return jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols)


def _sequential(layers: nnx.List, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class Inception(nnx.Module):
    """Four parallel branches, concatenated on channels: 1x1 | 1x1-3x3 | 1x1-"5x5" (a 3x3
    conv, as in torchvision) | max pool 3x3/1-1x1."""

    def __init__(self, in_features: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(stddev=INIT_STDDEV, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.branch1 = BasicConv2d(in_features, ch1x1, 1, **kw)
        self.branch2 = nnx.List([BasicConv2d(in_features, ch3x3red, 1, **kw),
                                 BasicConv2d(ch3x3red, ch3x3, 3, padding=1, **kw)])
        self.branch3 = nnx.List([BasicConv2d(in_features, ch5x5red, 1, **kw),
                                 BasicConv2d(ch5x5red, ch5x5, 3, padding=1, **kw)])
        self.branch4 = nnx.List([MaxPool2d(3, 1, 1, ceil_mode=True),
                                 BasicConv2d(in_features, pool_proj, 1, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([self.branch1(x), _sequential(self.branch2, x),
                                _sequential(self.branch3, x), _sequential(self.branch4, x)],
                               axis=-1)


class InceptionAux(nnx.Module):
    """Auxiliary classifier: adaptive avg pool to 4x4, 1x1 conv (128), fc 2048 -> 1024, ReLU,
    dropout, fc -> classes."""

    def __init__(self, in_features: int, num_classes: int, *, dropout: float = 0.7,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.truncated_normal(INIT_STDDEV)
        self.conv = BasicConv2d(in_features, 128, 1, stddev=INIT_STDDEV, **kw)
        self.fc1 = nnx.Linear(2048, 1024, kernel_init=init, **kw)
        self.fc2 = nnx.Linear(1024, num_classes, kernel_init=init, **kw)
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.conv(adaptive_avg_pool2d(x, (4, 4)))
        # (C, H, W) order, torchvision's flatten of NCHW, so fc1 loads without permuting.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = self.dropout(nnx.relu(self.fc1(x)), rngs=rngs)
        return self.fc2(x)


class GoogLeNet(nnx.Module):
    """GoogLeNet (Inception-v1, batch-normalised) over NHWC images, torchvision's layout.

    Args:
      num_classes: size of `fc` (and of the auxiliary heads' `fc2`).
      aux_logits: build `aux1` and `aux2`; in training the model then returns
        `(logits, (aux1_logits, aux2_logits))`.
      transform_input: rescale ImageNet-normalised inputs to (x - 0.5) / 0.5, for
        torchvision's pretrained weights.
      dropout, dropout_aux: dropout rates before `fc` and in the auxiliary heads.
    """

    aux_loss_weights: tuple[float, ...] = (0.3, 0.3)

    def __init__(self, *, num_classes: int = 1000, aux_logits: bool = False,
                 transform_input: bool = False, dropout: float = 0.2, dropout_aux: float = 0.7,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(3, 64, 7, stride=2, padding=3, stddev=INIT_STDDEV, **kw)
        self.maxpool1 = MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, 1, stddev=INIT_STDDEV, **kw)
        self.conv3 = BasicConv2d(64, 192, 3, padding=1, stddev=INIT_STDDEV, **kw)
        self.maxpool2 = MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32, **kw)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64, **kw)
        self.maxpool3 = MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64, **kw)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64, **kw)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64, **kw)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64, **kw)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128, **kw)
        self.maxpool4 = MaxPool2d(2, 2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128, **kw)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128, **kw)
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, dropout=dropout_aux, **kw)
            self.aux2 = InceptionAux(528, num_classes, dropout=dropout_aux, **kw)
        else:
            self.aux1 = self.aux2 = None
            self.aux_loss_weights = ()
        self.dropout = nnx.Dropout(dropout)
        self.fc = nnx.Linear(1024, num_classes,
                             kernel_init=nnx.initializers.truncated_normal(INIT_STDDEV), **kw)
        self.deterministic = False  # flipped by model.train() / model.eval()

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None
                 ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
        if self.transform_input:
            x = imagenet_to_unit_range(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        with_aux = self.aux1 is not None and not self.deterministic
        aux1 = self.aux1(x, rngs=rngs) if with_aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x, rngs=rngs) if with_aux else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.dropout(jnp.mean(x, axis=(1, 2)), rngs=rngs)
        logits = self.fc(x)
        return (logits, (aux1, aux2)) if with_aux else logits
