"""A linear probe: only the classifier of a ResNet-50 trains, on features fixed at the
source's (torchvision's ImageNet weights, or a run's: init_from).

Recipe:    the backbone frozen (`freeze='^(?!fc/)'`: no gradient, update, weight decay or
           optimizer state for it, and its BatchNorm layers normalise with their running
           statistics, which stay as they were), a new head for the folder's classes, SGD
           with momentum 0.9, learning rate 0.1 at batch 512, no weight decay, BiT-
           HyperRule's length and steps (configs/finetune.py) at its resolution. A probe
           measures how separable the classes are in the source's features (Kornblith et
           al. 2019 fit the same linear classifier with L-BFGS).
Command:   imagenet-jax train --config=configs/linear_probe.py --workdir=runs/pets_probe \
               --config.init_from=resnet50-11ad3fa6.pth --config.dataset=folder:/data/pets
Hardware:  1 GPU; a step costs about a forward pass (no backward through the backbone).
Expected:  not measured on a real dataset here, so no top-1 figure is promised for yours.
           On generated data (`make demo-transfer`), a probe of the demo's ResNet-tiny
           reaches top-1 0.7460, fine-tuning it 0.7960, from scratch 0.2100 (README).
"""

from imagenet_jax.config import finetune_recipe


def get_config():
    config = finetune_recipe()
    config.freeze = "^(?!fc/)"        # all but the classifier
    config.learning_rate = 0.1 * 256 / 512   # 0.1 at batch 512
    return config
