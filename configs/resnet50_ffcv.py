"""ResNet-50 in 16 to 88 epochs with progressive resizing, as FFCV trains it.

Recipe:    SGD with momentum 0.9, lr 1.7 at batch 1,024 (0.425 per 256) reached after 2
           epochs then decayed linearly to 0 (FFCV's triangular schedule: warmup, then
           'poly' of power 1), weight decay 1e-4 on kernels only (FFCV's wd on BatchNorm
           is off too), label smoothing 0.1; training resolution 160 px until 74% of the
           epochs, 192 px from 86%, rounded to FFCV's 32 px steps in between; evaluation
           at 224 (the train-test resolution discrepancy, Touvron et al. 2019, favours a
           higher test resolution). `num_epochs` is the field to set (16-88): the ramp
           follows it. Source: FFCV's ImageNet example (libffcv/ffcv-imagenet,
           rn50_*_epochs.yaml: min_res 160, max_res 192, ramp over epochs 65-76 of 88).
           FFCV also uses BlurPool and flip test-time augmentation and evaluates at 256;
           imagenet_jax has neither and evaluates at 224.
Command:   imagenet-jax train --config=configs/resnet50_ffcv.py --workdir=runs/ffcv40 \
               --config.num_epochs=40 --config.dataset=folder:/path/to/imagenet
Hardware:  8 GPUs (FFCV: 8 x A100), or a TPU v3-8 or larger.
Expected:  FFCV reports about 71% top-1 at 16 epochs to about 78% at 88 (their README).
           Not measured with imagenet_jax.
"""

from imagenet_jax.config import base_config

# FFCV's ramp for 88 epochs, scaled to any epoch count.
RAMP_START, RAMP_END = 65 / 88, 76 / 88


def get_config():
    config = base_config()
    config.model = "resnet50"
    config.dataset = "folder:~/data/imagenet"
    config.batch_size = 1024
    config.eval_batch_size = 1000
    config.num_epochs = 40.0
    config.optimizer = "sgd"
    config.nesterov = False
    config.learning_rate = 1.7 * 256 / 1024
    config.warmup_epochs = 2.0
    config.lr_schedule = "poly"
    config.lr_poly_power = 1.0
    config.lr_poly_end = 0.0
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1
    config.image_size = 192
    config.eval_image_size = 224
    epochs = config.get_ref("num_epochs")
    config.progressive_resize.start_size = 160
    config.progressive_resize.end_size = 192
    config.progressive_resize.start_epoch = epochs * RAMP_START
    config.progressive_resize.end_epoch = epochs * RAMP_END
    config.progressive_resize.step = 32
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    return config
