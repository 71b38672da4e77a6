"""Fine-tuning, shown on generated data: the demo run's ResNet-tiny onto ten other classes.

Recipe:    the demo's weights (runs/demo: `imagenet-jax train` with no flags, about 5 min)
           onto 'demo_transfer', ten shapes the demo never saw (hexagons, arrows, crescents,
           ...), drawn over the same backgrounds and clutter, with 30 training images a class
           where the demo has 300. The head is made anew for the ten new classes (their names
           are not the demo's); the rest starts from the demo's final weights. The demo's
           recipe otherwise, at batch 64 for 40 epochs (160 steps), evaluated every 10.
           `make demo-transfer` trains it beside the same config from scratch
           (--config.init_from=) and a linear probe (--config.freeze='^(?!fc/)'), and prints
           the README's table.
Command:   imagenet-jax train --config=configs/demo_transfer.py --workdir=runs/demo_transfer
Hardware:  2 CPU cores, about a minute after the demo.
Expected:  top-1 0.7960 at the end, where the same steps from scratch reach 0.2100
           (README, "Fine-tuning"; measured as BENCHMARKS.md says).
"""

from imagenet_jax.config import base_config


def get_config():
    config = base_config()
    config.model = "resnet_tiny"     # the demo's recipe (configs/demo.py), but for:
    config.dataset = "demo_transfer"
    config.init_from = "runs/demo"   # the demo's default workdir: its latest checkpoint
    config.image_size = 32
    config.batch_size = 64
    config.eval_batch_size = 250
    config.num_epochs = 40.0         # 4 steps an epoch: 160 steps
    config.learning_rate = 0.2       # x 64 / 256 = 0.05 peak
    config.warmup_epochs = 2.0
    config.weight_decay = 5e-4
    config.label_smoothing = 0.1
    config.crop_scale = (0.35, 1.0)
    config.log_every_steps = 20
    config.eval_every_epochs = 10.0  # at 1/4, 1/2, 3/4 and all of the steps
    config.checkpoint_every_steps = 80
    config.portable_cpu_math = True  # as the demo: the same figures on any x86 CPU
    return config
