"""The demo recipe shrunk to seconds, for tests: 16x16 images, ResNet-tiny, a few steps.

Point it at a dataset with --config.dataset=folder:/path (tests use a tiny demo folder).
"""

from imagenet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "resnet_tiny"
    config.image_size = 16
    config.batch_size = 32
    config.eval_batch_size = 16
    config.num_epochs = 2.0
    config.learning_rate = 0.4
    config.warmup_epochs = 0.5
    config.crop_scale = (0.35, 1.0)
    config.log_every_steps = 5
    config.checkpoint_every_steps = 5
    config.eval_every_epochs = 1.0
    return config
