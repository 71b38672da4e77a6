"""Weights drawn by numpy from a seed, the same with or without torch: the torchvision
equality test draws them here and scripts/torchvision_reference.py draws them in torch's
side of the comparison, each from the tensor names and shapes alone."""

import re
import zlib

import numpy as np

SEED = 2026
NUM_CLASSES = 16
BATCH = 2
# Train mode (batch statistics): more images and pixels, so that each channel's statistics
# cover enough values to be compared in float32 (GoogLeNet's last maps are 3x3 at 96 px).
TRAIN_BATCH, TRAIN_RESOLUTION = 8, 96
# Input sizes: small for speed, above each architecture's smallest input.
RESOLUTION = {"alexnet": 64, "googlenet": 64, "inception_v3": 80}
DEFAULT_RESOLUTION = 64


def resolution(name: str) -> int:
    return RESOLUTION.get(name, 32 if name.startswith("vgg") else DEFAULT_RESOLUTION)


def seeded_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A state dict for `shapes` (torchvision names): He-scaled kernels, small biases, and
    BatchNorm statistics and affine parameters away from the identity."""
    tensors = {}
    for key, shape in sorted(shapes.items()):
        rng = np.random.default_rng([SEED, zlib.crc32(key.encode())])
        base = key.rsplit(".", 1)[0]
        is_bn = f"{base}.running_var" in shapes
        if key.endswith("num_batches_tracked"):
            value = np.zeros(shape, np.int64)
        elif key.endswith("running_mean"):
            value = rng.normal(0.0, 0.1, shape)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif is_bn and key.endswith("weight") and _ends_a_residual_branch(key, shapes):
            # Small, as a trained ResNet's last BN of a branch tends to be: the residual
            # stream of 50-152 blocks stays at a sane scale.
            value = rng.uniform(0.05, 0.2, shape)
        elif is_bn and key.endswith("weight"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bias"):
            value = rng.normal(0.0, 0.1 if is_bn else 0.01, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            gain = 2.0 if len(shape) == 4 else 1.0
            value = rng.normal(0.0, np.sqrt(gain / fan_in), shape)
        tensors[key] = value if value.dtype == np.int64 else value.astype(np.float32)
    return tensors


def _ends_a_residual_branch(key: str, shapes: dict) -> bool:
    """A ResNet block's last BatchNorm: layerI.J.bnK with no bnK+1 after it."""
    match = re.fullmatch(r"(layer\d+\.\d+)\.bn(\d)\.weight", key)
    return bool(match) and f"{match[1]}.bn{int(match[2]) + 1}.weight" not in shapes


def seeded_images(name: str, train: bool = False) -> np.ndarray:
    """[BATCH, 3, R, R] float64 images (NCHW, as torch takes them), normalised-like; for
    train mode, [TRAIN_BATCH, 3, TRAIN_RESOLUTION, TRAIN_RESOLUTION]."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode()), 2 if train else 1])
    batch, size = (TRAIN_BATCH, TRAIN_RESOLUTION) if train else (BATCH, resolution(name))
    return rng.normal(0.0, 1.0, (batch, 3, size, size))
