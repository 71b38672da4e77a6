"""ResNet-50 from torchvision's ImageNet weights onto your own classes: BiT-HyperRule.

Recipe:    Kolesnikov et al. 2020, "Big Transfer (BiT)", section 3.3: SGD with momentum
           0.9, learning rate 0.003 at batch 512, no weight decay; the run's length (500,
           10,000 or 20,000 steps), warmup, learning-rate steps (/10 three times),
           resolution (128 or 480 px) and mixup (0.1 from 20,000 images) chosen from the
           dataset when the run starts and logged (train/hyperrule.py: the public
           release's numbers). The classifier is made anew for the folder's classes (kept
           for ImageNet's own, its rows taken for a subset of ImageNet's wnids:
           init_head='auto'); everything else starts from the weights.
           Differences from BiT: a random-resized crop of 75-100% of the area where BiT
           resizes to 512 and crops 480 at random (88%), and a centre crop of the whole
           short side in evaluation where BiT resizes to 480 x 480. The weights: torchvision's
           file, downloaded by you (.pth needs `pip install 'imagenet-jax[torch]'`, a
           .safetensors file does not: docs/weights.md).
Command:   imagenet-jax train --config=configs/finetune.py --workdir=runs/pets \
               --config.init_from=resnet50-11ad3fa6.pth --config.dataset=folder:/data/pets
Hardware:  1 GPU or more; the batch of 512 is global.
Expected:  not measured with imagenet_jax on a real dataset (none can be downloaded where it
           is developed), so no top-1 figure is promised for yours. The same machinery on
           generated data (configs/demo_transfer.py, `make demo-transfer`) reaches top-1
           0.7960 from the demo's weights against 0.2100 from scratch (README).
"""

from imagenet_jax.config import finetune_recipe


def get_config():
    return finetune_recipe()
