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
- BatchNorm layers are `layers.BatchNorm` (nnx.BatchNorm's variables and names), so that
  `layers.set_batchnorm_groups` can split their training statistics by device group.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from imagenet_jax.models import alexnet, googlenet, inception, resnet, vgg


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    factory: Callable[..., nnx.Module]
    resolution: int      # the input size the architecture was designed for
    min_resolution: int  # the smallest input whose last feature map is at least 1x1


_REGISTRY: dict[str, ModelSpec] = {
    "alexnet": ModelSpec(alexnet.AlexNet, 224, 63),
    "alexnet_original": ModelSpec(alexnet.AlexNetOriginal, 224, 63),
    "vgg11": ModelSpec(vgg.VGG11, 224, 32),
    "vgg11_bn": ModelSpec(vgg.VGG11_BN, 224, 32),
    "vgg13": ModelSpec(vgg.VGG13, 224, 32),
    "vgg13_bn": ModelSpec(vgg.VGG13_BN, 224, 32),
    "vgg16": ModelSpec(vgg.VGG16, 224, 32),
    "vgg16_bn": ModelSpec(vgg.VGG16_BN, 224, 32),
    "vgg19": ModelSpec(vgg.VGG19, 224, 32),
    "vgg19_bn": ModelSpec(vgg.VGG19_BN, 224, 32),
    "googlenet": ModelSpec(googlenet.GoogLeNet, 224, 15),
    # 75 px in eval or without the aux head; training with it needs 299 (as torchvision).
    "inception_v3": ModelSpec(inception.InceptionV3, 299, 75),
    "resnet18": ModelSpec(resnet.ResNet18, 224, 32),
    "resnet34": ModelSpec(resnet.ResNet34, 224, 32),
    "resnet50": ModelSpec(resnet.ResNet50, 224, 32),
    "resnet101": ModelSpec(resnet.ResNet101, 224, 32),
    "resnet152": ModelSpec(resnet.ResNet152, 224, 32),
    "resnet200": ModelSpec(resnet.ResNet200, 224, 32),
    "wide_resnet50_2": ModelSpec(resnet.WideResNet50_2, 224, 32),
    "wide_resnet101_2": ModelSpec(resnet.WideResNet101_2, 224, 32),
    "resnext50_32x4d": ModelSpec(resnet.ResNeXt50_32x4d, 224, 32),
    "resnext101_32x8d": ModelSpec(resnet.ResNeXt101_32x8d, 224, 32),
    "resnet_tiny": ModelSpec(resnet.ResNetTiny, 32, 8),
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
    """Builds model `name`; `options` go to its constructor (e.g. zero_init_residual).

    Raises ValueError naming an option the model does not take, with those it does.
    """
    factory = get_spec(name).factory
    valid = options_of(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"model {name!r} takes no option {unknown[0]!r}; its options: "
                         f"{', '.join(valid) or 'none'}")
    return factory(num_classes=num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   **options)


def options_of(name: str) -> list[str]:
    """The constructor options of model `name` (beyond num_classes, dtypes and rngs)."""
    factory = get_spec(name).factory
    bound = set(getattr(factory, "keywords", {}))  # fixed by a partial (e.g. base_width)
    target = getattr(factory, "func", factory)
    while isinstance(target, functools.partial):  # partials of partials
        bound |= set(target.keywords)
        target = target.func
    init = target.__init__ if isinstance(target, type) else target  # (NNX's metaclass hides it)
    parameters = inspect.signature(init).parameters.values()
    return [p.name for p in parameters if p.kind == p.KEYWORD_ONLY and p.name not in bound
            and p.name not in ("num_classes", "dtype", "param_dtype", "rngs")]


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
