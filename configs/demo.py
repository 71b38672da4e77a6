"""The demo: ResNet-tiny on the generated 10-class demo dataset (ImageNet's layout), 32x32.

Command:   imagenet-jax train            (this config is the default; or `make demo`)
           imagenet-jax train --config=configs/demo.py --workdir=runs/demo
Hardware:  2 CPU cores.
Expected:  val top-1 >= 0.90 in under 5 minutes wall, data generation and compilation
           included (see README for the measured figure).
"""

from imagenet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "resnet_tiny"
    config.dataset = "demo"
    config.image_size = 32
    config.batch_size = 128
    config.eval_batch_size = 256
    config.num_epochs = 24.0
    config.learning_rate = 0.2       # x batch_size / 256 = 0.1 peak
    config.warmup_epochs = 1.0
    config.weight_decay = 5e-4
    config.label_smoothing = 0.1
    config.crop_scale = (0.35, 1.0)  # the shape must stay in the crop
    # With --config.optimizer=lars: lr x eta = 0.1 x 0.1 = 0.01, MLPerf's relative step
    # (10.5 x 0.001); LARS's usual 0.001 would move this recipe's weights 100x too slowly.
    config.lars_trust_coefficient = 0.1
    config.log_every_steps = 20
    config.eval_every_epochs = 4.0
    config.checkpoint_every_steps = 100
    # The README's figures on any 2-core x86-64 machine, AMD or Intel (a slower step).
    config.portable_cpu_math = True
    return config
