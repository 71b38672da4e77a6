"""AlexNet (single tower) on ImageNet-1k: the original recipe of Krizhevsky et al. (2012).

Recipe:    SGD momentum 0.9 (not Nesterov), lr 0.01 at batch 128 (0.02 per 256 here,
           scaled with the batch), divided by 10 every 30 epochs (the paper divides
           when the validation error plateaus, three times in about 90 epochs; the
           torchvision reference script uses this fixed form), 90 epochs, weight decay
           5e-4 (here on kernels only; the paper decays every weight), dropout 0.5,
           no label smoothing, no warmup. Sources: Krizhevsky, Sutskever & Hinton 2012;
           torchvision's references/classification.
           The original two-tower form with LRN: --config.model_options.original=True
           (if the model exposes it: see imagenet_jax/models/alexnet.py).
Command:   imagenet-jax train --config=configs/alexnet.py --workdir=runs/alexnet \
               --config.dataset=folder:/path/to/imagenet
Hardware:  one GPU or more; batch 128 as in the paper.
Expected:  top-1 about 0.565 (torchvision's reference weights; the paper reports 0.593
           top-1 with 10-crop testing). Not yet measured with imagenet_jax.
"""

from imagenet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "alexnet"
    config.dataset = "folder:~/data/imagenet"
    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_epochs = 90.0
    config.learning_rate = 0.02      # 0.01 at batch 128
    config.nesterov = False
    config.lr_schedule = "step"
    config.lr_decay_epochs = (30, 60)
    config.lr_decay_factor = 0.1
    config.warmup_epochs = 0.0
    config.weight_decay = 5e-4
    config.label_smoothing = 0.0
    return config
