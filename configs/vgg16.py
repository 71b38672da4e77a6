"""VGG-16 on ImageNet-1k: the recipe of Simonyan & Zisserman (2015).

Recipe:    SGD momentum 0.9, batch 256, lr 0.01 divided by 10 when the validation
           accuracy stopped improving (three times; here at epochs 30 and 60), 74
           epochs in the paper (90 here, as torchvision's reference), weight decay 5e-4,
           dropout 0.5 in the first two fully connected layers. torchvision trained its
           reference weights with lr 0.01 and this step schedule.
           Variants: --config.model=vgg11|vgg13|vgg19 and the *_bn forms (BatchNorm).
Command:   imagenet-jax train --config=configs/vgg16.py --workdir=runs/vgg16 \
               --config.dataset=folder:/path/to/imagenet
Hardware:  one GPU host or more.
Expected:  top-1 about 0.716 (vgg16_bn: 0.734; torchvision's reference weights). Not yet
           measured with imagenet_jax.
"""

from imagenet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "vgg16"
    config.dataset = "folder:~/data/imagenet"
    config.batch_size = 256
    config.eval_batch_size = 500
    config.num_epochs = 90.0
    config.learning_rate = 0.01
    config.nesterov = False
    config.lr_schedule = "step"
    config.lr_decay_epochs = (30, 60)
    config.warmup_epochs = 0.0
    config.weight_decay = 5e-4
    config.label_smoothing = 0.0
    return config
