"""ResNet-152 on ImageNet-1k: the Goyal et al. (2017) recipe with a cosine schedule.

Recipe:    SGD, Nesterov momentum 0.9, lr 0.1 per 256 images scaled linearly with the
           batch, 5 warmup epochs then cosine to 0, 90 epochs, weight decay 1e-4 on
           kernels only, label smoothing 0.1, random-resized crop 224 + flip, eval
           centre crop 224 of 256, BatchNorm statistics over groups of 32 examples
           (Goyal et al.'s per-worker batch; `batchnorm_group_examples`). Sources: He et
           al. 2015, "Deep Residual Learning"; Goyal et al. 2017, "Accurate, Large
           Minibatch SGD"; the Flax ImageNet example.
           For the original step schedule: --config.lr_schedule=step (x0.1 at 30, 60, 80).
Command:   imagenet-jax train --config=configs/resnet152.py --workdir=runs/resnet152 \
               --config.dataset=folder:/path/to/imagenet
Hardware:  one accelerator host (8 GPUs or a TPU v3-8 or larger); the global batch
           is 1024 on any number of devices that divides it.
Expected:  top-1 about 0.783 (torchvision's reference weights; not yet measured with
           imagenet_jax).
"""

from imagenet_jax.config import resnet_recipe


def get_config():
    return resnet_recipe("resnet152")
