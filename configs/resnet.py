"""The ResNet family on ImageNet-1k, the architecture chosen by argument: configs/resnet.py:ARCH
with ARCH one of resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d,
wide_resnet50_2.

Recipe:    the Goyal et al. (2017) recipe with a cosine schedule: SGD, Nesterov momentum
           0.9, lr 0.1 per 256 images scaled linearly with the batch, 5 warmup epochs then
           cosine to 0, 90 epochs, weight decay 1e-4 on kernels only, label smoothing 0.1,
           random-resized crop 224 + flip, eval centre crop 224 of 256, BatchNorm
           statistics over groups of 32 examples (Goyal et al.'s per-worker batch;
           `batchnorm_group_examples`). Sources: He et al. 2015, "Deep Residual
           Learning"; Goyal et al. 2017, "Accurate, Large Minibatch SGD"; the Flax
           ImageNet example. For the original step schedule: --config.lr_schedule=step
           (x0.1 at 30, 60, 80).
Command:   imagenet-jax train --config=configs/resnet.py:resnet50 --workdir=runs/resnet50 \
               --config.dataset=folder:/path/to/imagenet
Hardware:  one accelerator host (8 GPUs or a TPU v3-8 or larger); the global batch
           is 1024 on any number of devices that divides it.
Expected:  top-1 about (torchvision's reference weights; not yet measured with
           imagenet_jax): resnet18 0.698, resnet34 0.733, resnet50 0.761 (the Flax example
           reports 0.765), resnet101 0.774, resnet152 0.783, resnext50_32x4d 0.776,
           wide_resnet50_2 0.785.
"""

import ml_collections

from imagenet_jax.config import resnet_recipe


def get_config(arch: str = "") -> ml_collections.ConfigDict:
    return resnet_recipe(arch)
