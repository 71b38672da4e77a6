"""Sizes of the registered models: parameters and forward multiply-adds, for `imagenet-jax models`.

Multiply-adds are read off the XLA computation of the jitted forward pass (its
StableHLO, before XLA's CPU/GPU rewrites): every `convolution` and `dot_general`,
counted as output elements x products per element, zero padding included. That is
the convention of the published figures (fvcore, torchvision's model docs). XLA's
own `cost_analysis()` skips the products that land on padding and so reads lower
(ResNet-18 at 224: 1.687 G against 1.814 G).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
from flax import nnx

from imagenet_jax import models

_FUNC = re.compile(r"func\.func (?:public |private )?@([\w.$-]+)\(")
_CALL = re.compile(r"(?:func\.)?call @([\w.$-]+)\(")
_TENSOR = re.compile(r"tensor<([0-9x]+)x[a-z]+[0-9]*>")
_RHS_LABELS = re.compile(r"dim_numbers = \[[^\]]*\]x\[([^\]]*)\]")
_CONTRACTING = re.compile(r"contracting_dims = \[([0-9, ]*)\] x")


def describe(name: str, num_classes: int = 1000) -> dict:
    """Name, parameters, GMACs at the native resolution, and that resolution."""
    resolution = models.get_spec(name).resolution
    model = nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0)))
    return {"name": name, "params": models.count_params(model),
            "gmacs": round(forward_macs(model, resolution) / 1e9, 3), "resolution": resolution}


def describe_all() -> list[dict]:
    return [describe(name) for name in models.names()]


def forward_macs(model: nnx.Module, resolution: int) -> int:
    """Multiply-adds of one eval-mode forward pass of one image, from its StableHLO."""
    graphdef, state = nnx.split(model)

    def forward(state, images):
        module = nnx.merge(graphdef, state)
        module.eval()
        return module(images)

    images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    return stablehlo_macs(jax.jit(forward).lower(state, images).as_text())


def stablehlo_macs(module_text: str) -> int:
    """Sum of convolution and dot_general multiply-adds, following calls into functions."""
    own: dict[str, int] = {}
    calls: dict[str, Counter] = {}
    current = None
    for line in module_text.splitlines():
        if match := _FUNC.search(line):
            current = match.group(1)
            own[current], calls[current] = 0, Counter()
        elif current is not None:
            own[current] += _line_macs(line)
            calls[current].update(_CALL.findall(line))

    def total(function: str) -> int:
        return own[function] + sum(n * total(callee) for callee, n in calls[function].items())

    return total("main")


def _line_macs(line: str) -> int:
    if "stablehlo.convolution" in line:
        lhs, rhs, out = (_dims(t) for t in _TENSOR.findall(line.rsplit(" : ", 1)[1]))
        labels = [label.strip() for label in _RHS_LABELS.search(line).group(1).split(",")]
        # Each output element takes one product per kernel element of its group.
        return math.prod(out) * math.prod(rhs) // rhs[labels.index("o")]
    if "stablehlo.dot_general" in line:
        lhs, _, out = (_dims(t) for t in _TENSOR.findall(line.rsplit(" : ", 1)[1]))
        contracting = [int(d) for d in _CONTRACTING.search(line).group(1).split(",") if d.strip()]
        return math.prod(out) * math.prod(lhs[d] for d in contracting)
    return 0


def _dims(shape: str) -> list[int]:
    return [int(d) for d in shape.split("x")]
