"""Inception-v3 on ImageNet-1k at 299x299: the recipe of Szegedy et al. (2015).

Recipe:    RMSProp with decay 0.9 and epsilon 1.0, lr 0.045 decayed by 0.94 every 2
           epochs, label smoothing 0.1, gradient clipping at global norm 2.0, the
           auxiliary head weighted 0.4 in the loss, batch 32 on each of 50 replicas in
           the paper. Here: global batch 256 at lr 0.045 x 256/256 (the linear scaling
           keeps 0.045 at batch 256), 100 epochs, weight decay 4e-5 (TF-slim's value).
           Sources: "Rethinking the Inception Architecture" (2015); TF-slim's
           train_image_classifier flags for inception_v3.
Command:   imagenet-jax train --config=configs/inception_v3.py --workdir=runs/inception_v3 \
               --config.dataset=folder:/path/to/imagenet
Hardware:  one GPU host or a TPU v3-8 or larger.
Expected:  top-1 about 0.773 (torchvision's reference weights; the paper reports 0.788
           single-crop at 299). Not yet measured with imagenet_jax.
"""

from imagenet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "inception_v3"
    config.model_options.aux_logits = True  # the auxiliary head after Mixed_6e, weighted 0.4
    config.dataset = "folder:~/data/imagenet"
    config.image_size = 299
    config.batch_size = 256
    config.eval_batch_size = 500
    config.num_epochs = 100.0
    config.optimizer = "rmsprop"
    config.learning_rate = 0.045
    config.momentum = 0.9
    config.rmsprop_decay = 0.9
    config.rmsprop_epsilon = 1.0
    config.grad_clip_norm = 2.0
    config.lr_schedule = "exponential"
    config.lr_decay_every_epochs = 2.0
    config.lr_decay_factor = 0.94
    config.warmup_epochs = 0.0
    config.weight_decay = 4e-5
    config.label_smoothing = 0.1
    return config
