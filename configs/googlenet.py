"""GoogLeNet (Inception v1, with BatchNorm as in torchvision) on ImageNet-1k.

Recipe:    Szegedy et al. (2014): SGD momentum 0.9, the learning rate decreased by 4%
           every 8 epochs, auxiliary classifiers weighted 0.3 in the training loss,
           dropout 0.4 (torchvision: 0.2). The paper gives no base learning rate or
           batch (asynchronous DistBelief training); here 0.1 per 256 images with 2
           warmup epochs, weight decay 1e-4, label smoothing 0.1. The exponential
           schedule is kept per epoch count, so 90 epochs end at 0.96^11 of the peak;
           --config.lr_schedule=cosine is a common modern alternative.
Command:   imagenet-jax train --config=configs/googlenet.py --workdir=runs/googlenet \
               --config.dataset=folder:/path/to/imagenet
Hardware:  one GPU host or more.
Expected:  top-1 about 0.698 (torchvision's reference weights; the paper reports 0.687
           top-1 single-crop for its single model). Not yet measured with imagenet_jax.
"""

from imagenet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "googlenet"
    config.model_options.aux_logits = True  # the two auxiliary classifiers, weighted 0.3
    config.dataset = "folder:~/data/imagenet"
    config.batch_size = 256
    config.eval_batch_size = 500
    config.num_epochs = 90.0
    config.learning_rate = 0.1
    config.nesterov = False
    config.lr_schedule = "exponential"
    config.lr_decay_every_epochs = 8.0
    config.lr_decay_factor = 0.96
    config.warmup_epochs = 2.0
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1
    return config
