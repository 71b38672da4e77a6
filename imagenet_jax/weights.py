"""torchvision weights in and out: `load_torchvision(name, path)`, `save_torchvision(model, path)`.

The mapping is here, in code, for every torchvision architecture of the zoo (AlexNet, VGG
11-19 with and without BN, GoogLeNet, Inception-v3, ResNet 18-152, Wide ResNet, ResNeXt):

- names: a module path joined with dots is the torchvision key, except in ResNets, whose
  conv+BN pairs are one module here (`stem[0]` is `conv1`/`bn1`; `stages[i][j].convK` is
  `layer{i+1}.{j}.convK`/`.bnK`; `downsample.proj` is `downsample.0`/`.1`). Those modules
  keep their names (renaming them would orphan every checkpoint written so far); the
  translation lives in `_resnet_key`.
- leaves: `kernel` -> `weight`, BatchNorm `scale`/`bias`/`mean`/`var` -> `weight`/`bias`/
  `running_mean`/`running_var`; torchvision's `num_batches_tracked` is written as 0 and
  ignored on reading (nothing here counts batches).
- layouts: conv kernels HWIO here, OIHW there; Linear kernels are transposed; the first
  classifier Linear of AlexNet and VGG also reorders its inputs, since NHWC features
  flatten in (H, W, C) order and torchvision's NCHW ones in (C, H, W) order.

Files: `.safetensors` always (no code runs on reading). `.pth`/`.pt` state dicts only when
torch is installed, read with `torch.load(weights_only=True)`: never arbitrary unpickling.
Every tensor of a file is consumed exactly once and every variable of the model assigned;
anything else is an error naming the tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagenet_jax import models
from imagenet_jax.models import alexnet, googlenet, inception, resnet, vgg

# The registered models that are torchvision architectures, and the key of their last
# classifier weight (its rows are the classes).
TORCHVISION_MODELS = {
    "alexnet": "classifier.6.weight",
    **{f"vgg{depth}{bn}": "classifier.6.weight" for depth in (11, 13, 16, 19)
       for bn in ("", "_bn")},
    "googlenet": "fc.weight",
    "inception_v3": "fc.weight",
    **{name: "fc.weight" for name in ("resnet18", "resnet34", "resnet50", "resnet101",
                                      "resnet152", "wide_resnet50_2", "wide_resnet101_2",
                                      "resnext50_32x4d", "resnext101_32x8d")},
}
# Auxiliary heads' key prefixes: present in torchvision's GoogLeNet and Inception-v3 files.
AUX_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}


class WeightsError(ValueError):
    """A weights file that does not fit the model: the message names the tensor."""


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from `.safetensors`, or `.pth`/`.pt` through torch (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError:
            raise WeightsError(
                f"{path}: reading a .pth/.pt state dict needs torch (pip install "
                "'imagenet-jax[torch]'); or convert it to .safetensors where torch is "
                "installed") from None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
        return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}
    raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; expected "
                       ".safetensors, .pth or .pt")


def load_torchvision(name: str, path: str | os.PathLike, *, dtype=jnp.float32,
                     **options) -> nnx.Module:
    """Model `name` with torchvision's weights from `path`, in eval mode.

    `num_classes` is read from the file. GoogLeNet and Inception-v3 get `aux_logits` from
    whether the file holds auxiliary heads (pass `aux_logits=False` to drop them, as
    torchvision's own builders do) and `transform_input=True`, as torchvision sets it for
    its pretrained weights; any other `options` go to the model's constructor.
    """
    if name not in TORCHVISION_MODELS:
        raise WeightsError(f"{name!r} is not a torchvision architecture; those are: "
                           f"{', '.join(sorted(TORCHVISION_MODELS))}")
    tensors = read_tensors(path)
    classifier = TORCHVISION_MODELS[name]
    if classifier not in tensors:
        raise WeightsError(f"{path} has no {classifier!r}: not a torchvision {name} state dict")
    has_aux = any(k.startswith(AUX_PREFIXES.get(name, ())) for k in tensors)
    if name in AUX_PREFIXES:
        options.setdefault("aux_logits", has_aux)
        options.setdefault("transform_input", True)
        if has_aux and not options["aux_logits"]:
            tensors = {k: v for k, v in tensors.items()
                       if not k.startswith(AUX_PREFIXES[name])}
    num_classes = tensors[classifier].shape[0]
    abstract = nnx.eval_shape(lambda: models.create(
        name, num_classes=num_classes, dtype=dtype, rngs=nnx.Rngs(0), **options))
    graphdef, state = nnx.split(abstract)
    model = nnx.merge(graphdef, from_torchvision(abstract, state, tensors, path))
    model.eval()
    return model


def from_torchvision(model: nnx.Module, state: nnx.State, tensors: dict[str, np.ndarray],
                     source: Any = "the file") -> nnx.State:
    """`state` (of `model`, abstract or not) with every variable taken from `tensors`."""
    wanted = {key: (path, value) for path, value, key in _variables(model, state)}
    unknown = sorted(k for k in tensors if k not in wanted and
                     not k.endswith("num_batches_tracked"))
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} tensor(s) the model has no place for, "
                           f"e.g. {unknown[0]!r} {tuple(tensors[unknown[0]].shape)}")
    missing = sorted(k for k in wanted if k not in tensors)
    if missing:
        raise WeightsError(f"{source}: {len(missing)} tensor(s) the model needs are missing, "
                           f"e.g. {missing[0]!r} (for {'/'.join(map(str, wanted[missing[0]][0]))})")
    pure = nnx.to_pure_dict(state)
    for key, (path, value) in wanted.items():
        array = _layout(model, path, tensors[key], to_torch=False)
        if array.shape != tuple(value.shape):
            raise WeightsError(f"{source}: tensor {key!r} has shape "
                               f"{tuple(tensors[key].shape)}; the model needs "
                               f"{_layout_shape(model, path, value.shape)}")
        _set(pure, path, jnp.asarray(array, value.dtype))
    nnx.replace_by_pure_dict(state, pure)
    return state


def save_torchvision(model: nnx.Module, path: str | os.PathLike) -> None:
    """Writes `model`'s variables as a torchvision state dict (`.safetensors`), the inverse
    of `load_torchvision`; torchvision's `load_state_dict(strict=True)` takes it."""
    from safetensors.numpy import save_file

    state = nnx.state(model)
    tensors = {}
    for path_, value, key in _variables(model, state):
        tensors[key] = np.ascontiguousarray(
            _layout(model, path_, np.asarray(jax.device_get(value), np.float32), to_torch=True))
        if key.endswith("running_var"):
            tensors[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: weights are written as .safetensors")
    save_file(tensors, str(path))


def torchvision_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """The state dict a torchvision file for `model` holds: key -> shape (with each
    BatchNorm's `num_batches_tracked`)."""
    shapes = {}
    for path, value, key in _variables(model, nnx.state(model)):
        shapes[key] = _layout_shape(model, path, tuple(value.shape))
        if key.endswith("running_var"):
            shapes[key[:-len("running_var")] + "num_batches_tracked"] = ()
    return shapes


def _variables(model: nnx.Module, state: nnx.State):
    """(path, value, torchvision key) for every variable of `model`."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    for key_path, value in flat:
        path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)
        yield path, value, torchvision_key(model, path)


def torchvision_key(model: nnx.Module, path: tuple) -> str:
    """The torchvision state-dict key of the variable at `path` in `model`."""
    *modules, leaf = path
    if leaf not in _LEAF:
        raise WeightsError(f"{'/'.join(map(str, path))}: no torchvision counterpart")
    if isinstance(model, resnet.ResNet):
        return _resnet_key(tuple(modules), _LEAF[leaf], path)
    if not isinstance(model, alexnet.AlexNet | vgg.VGG | googlenet.GoogLeNet |
                      inception.InceptionV3):
        raise WeightsError(f"{type(model).__name__} is not a torchvision architecture")
    return ".".join(map(str, (*modules, _LEAF[leaf])))


def _resnet_key(modules: tuple, leaf: str, path: tuple) -> str:
    if modules[:2] == ("stem", 0) and len(modules) == 3:
        return f"{'conv1' if modules[2] == 'conv' else 'bn1'}.{leaf}"
    if modules == ("fc",):
        return f"fc.{leaf}"
    if modules[0] == "stages" and len(modules) >= 5:
        stage, block, unit = modules[1], modules[2], modules[3]
        prefix = f"layer{stage + 1}.{block}"
        if unit.startswith("conv") and len(modules) == 5:
            kind = "conv" if modules[4] == "conv" else "bn"
            return f"{prefix}.{kind}{unit[4:]}.{leaf}"
        if unit == "downsample" and modules[4] == "proj" and len(modules) == 6:
            return f"{prefix}.downsample.{0 if modules[5] == 'conv' else 1}.{leaf}"
    raise WeightsError(f"{'/'.join(map(str, path))}: not part of a torchvision ResNet (the "
                       "deep stem and ResNet-D shortcuts have no torchvision counterpart)")


def _flatten_order(model: nnx.Module, path: tuple) -> tuple[int, int] | None:
    """(h, w) of the pooled map for the Linear that flattens it (AlexNet's and VGG's first
    classifier Linear), else None."""
    if not (isinstance(model, alexnet.AlexNet | vgg.VGG) and path[0] == "classifier"
            and path[-1] == "kernel"):
        return None
    first = next(i for i, layer in enumerate(model.classifier) if isinstance(layer, nnx.Linear))
    if path[1] != first:
        return None
    return (6, 6) if isinstance(model, alexnet.AlexNet) else tuple(model.pool_size)


def _layout(model: nnx.Module, path: tuple, array: np.ndarray, *, to_torch: bool) -> np.ndarray:
    """A tensor in torchvision's layout (to_torch) or in ours."""
    if path[-1] != "kernel":
        return array
    if array.ndim == 4:  # HWIO here, OIHW there
        return array.transpose(3, 2, 0, 1) if to_torch else array.transpose(2, 3, 1, 0)
    pooled = _flatten_order(model, path)
    if pooled is None:
        return array.T
    h, w = pooled
    if to_torch:  # (h*w*c, out) -> (out, c*h*w)
        c = array.shape[0] // (h * w)
        return array.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(-1, c * h * w)
    if array.shape[1] % (h * w):
        return array.T  # a wrong shape: reported by the caller with the tensor's name
    c = array.shape[1] // (h * w)
    return array.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def _layout_shape(model: nnx.Module, path: tuple, shape: tuple) -> tuple:
    return tuple(_layout(model, path, np.zeros(shape, np.float32), to_torch=True).shape)


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def tensors_classes(model: nnx.Module) -> int:
    """The number of classes of a zoo model: its last classifier's outputs."""
    head = model.fc if hasattr(model, "fc") else model.classifier[-1]
    return int(head.kernel.shape[-1])


def imagenet_or_numbered(num_classes: int) -> tuple[str, ...]:
    """The classes of a weights file, which holds no names: ImageNet-1k's wnids, sorted
    (torchvision's order), for 1,000 outputs; class_0, class_1, ... otherwise."""
    if num_classes == 1000:
        from imagenet_jax.data import wordnet

        return tuple(sorted(w for w, s in wordnet.load().synsets.items() if s.is_class))
    return tuple(f"class_{i}" for i in range(num_classes))
