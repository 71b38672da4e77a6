"""The model registry: every architecture by its torchvision name.

`create(name, num_classes=..., dtype=..., rngs=...)` builds an NNX module. Every model
follows one contract, which the train and eval steps rely on:

- `__init__(self, *, num_classes, dtype, param_dtype, rngs, **options)`: `dtype` is the
  computation dtype, `param_dtype` the parameters'; `rngs` is used for initialisation
  only (layers keep no RNG streams, so the state holds nothing but arrays).
- `__call__(self, x, *, rngs=None)`: `x` is NHWC, normalised, in `dtype`. Dropout draws
  from `rngs` (a fresh `nnx.Rngs(dropout=key)` per step). It returns logits; in
  training (after `model.train()`), a model with auxiliary heads returns
  `(logits, (aux_logits, ...))` instead.
- `aux_loss_weights`: a class attribute, one weight per auxiliary head (empty if none).
- `model.train()` / `model.eval()` switch BatchNorm and dropout (NNX's `deterministic`
  and `use_running_average` attributes; a model's own `deterministic` attribute, if
  it has one, is switched with them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from imagenet_jax.models import resnet


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    factory: Callable[..., nnx.Module]
    resolution: int  # The native input size the architecture was designed for.


_REGISTRY: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(resnet.ResNet18, 224),
    "resnet34": ModelSpec(resnet.ResNet34, 224),
    "resnet50": ModelSpec(resnet.ResNet50, 224),
    "resnet101": ModelSpec(resnet.ResNet101, 224),
    "resnet152": ModelSpec(resnet.ResNet152, 224),
    "resnet200": ModelSpec(resnet.ResNet200, 224),
    "wide_resnet50_2": ModelSpec(resnet.WideResNet50_2, 224),
    "wide_resnet101_2": ModelSpec(resnet.WideResNet101_2, 224),
    "resnext50_32x4d": ModelSpec(resnet.ResNeXt50_32x4d, 224),
    "resnext101_32x8d": ModelSpec(resnet.ResNeXt101_32x8d, 224),
    "resnet_tiny": ModelSpec(resnet.ResNetTiny, 32),
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}") from None


def create(name: str, *, num_classes: int, dtype=jnp.float32, param_dtype=jnp.float32,
           rngs: nnx.Rngs, **options) -> nnx.Module:
    """Builds model `name`; `options` go to its constructor (e.g. zero_init_residual)."""
    return get_spec(name).factory(num_classes=num_classes, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs, **options)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
