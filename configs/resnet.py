"""The ResNet family on ImageNet-1k, the architecture chosen by argument: configs/resnet.py:ARCH.

Recipe:    the Goyal et al. (2017) recipe with a cosine schedule, as configs/resnet50.py
           tells it, for ARCH one of resnet18, resnet34, resnet50, resnet101, resnet152,
           resnext50_32x4d, wide_resnet50_2. configs/ARCH.py gives the same config.
Command:   imagenet-jax train --config=configs/resnet.py:resnet101 \
               --workdir=runs/resnet101 --config.dataset=folder:/path/to/imagenet
Hardware:  one accelerator host (8 GPUs or a TPU v3-8 or larger); the global batch
           is 1024 on any number of devices that divides it.
Expected:  top-1 about (torchvision's reference weights; not yet measured with
           imagenet_jax): resnet18 0.698, resnet34 0.733, resnet50 0.761, resnet101
           0.774, resnet152 0.783, resnext50_32x4d 0.776, wide_resnet50_2 0.785.
"""

import ml_collections

from imagenet_jax.config import resnet_recipe


def get_config(arch: str = "") -> ml_collections.ConfigDict:
    return resnet_recipe(arch)
