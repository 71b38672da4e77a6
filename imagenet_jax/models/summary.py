"""Sizes of the registered models, for `imagenet-jax models`."""

from __future__ import annotations

from flax import nnx

from imagenet_jax import models


def describe(name: str, num_classes: int = 1000) -> dict:
    """Name, parameter count and native resolution, without allocating the weights."""
    model = nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0)))
    return {"name": name, "params": models.count_params(model),
            "resolution": models.get_spec(name).resolution}


def describe_all() -> list[dict]:
    return [describe(name) for name in models.names()]
