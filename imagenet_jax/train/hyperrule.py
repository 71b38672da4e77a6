"""BiT-HyperRule: a fine-tuning run's length, schedule, resolution and mixup from its dataset.

Kolesnikov et al. 2020, "Big Transfer (BiT): General Visual Representation Learning",
section 3.3, as its public release (google-research/big_transfer, bit_hyperrule.py)
implements it:

- length: 500 steps for fewer than 20,000 training images, 10,000 below 500,000, else
  20,000; a linear warmup over the first 100 / 500 / 500 steps, then the learning rate
  divided by 10 at steps 200, 300, 400 / 3,000, 6,000, 9,000 / 6,000, 12,000, 18,000;
- resolution: 128 px for images smaller than 96 x 96 pixels in area, else 480 (the
  release's crop; the paper says 384);
- mixup (alpha 0.1) from 20,000 images on, none below.

BiT fine-tunes at batch 512 with SGD, momentum 0.9, learning rate 0.003 and no weight
decay: configs/finetune.py sets those; this module only derives what depends on the data.
`apply` writes the choices into the config's own fields (num_epochs, warmup_epochs,
lr_schedule 'step' with lr_decay_epochs, image_size, mixup_alpha, and eval_every_epochs:
ten evaluations a run), so everything downstream, config.json included, sees an ordinary
config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np

SMALL, MEDIUM = 20_000, 500_000
SMALL_IMAGE_AREA = 96 * 96
_SAMPLED_IMAGES = 64  # whose sizes decide the resolution: evenly spaced over the train split


@dataclasses.dataclass(frozen=True)
class Choices:
    """What the rule picks for one dataset."""

    num_train_examples: int
    mean_image_area: float | None  # None: the source's image sizes are unknown
    warmup_steps: int
    decay_steps: tuple[int, ...]   # the learning rate is divided by 10 at each
    num_train_steps: int
    image_size: int | None         # None: config.image_size stays
    mixup_alpha: float

    def describe(self) -> str:
        area = ("image sizes unknown: image_size kept" if self.mean_image_area is None else
                f"mean image area {self.mean_image_area:.0f} px -> {self.image_size} px")
        return (f"BiT-HyperRule for {self.num_train_examples} training images: "
                f"{self.num_train_steps} steps, warmup {self.warmup_steps}, learning rate / 10 "
                f"at steps {', '.join(map(str, self.decay_steps))}; {area}; "
                f"mixup alpha {self.mixup_alpha:g}")


def choose(num_train_examples: int, mean_image_area: float | None) -> Choices:
    """The rule's choices for a dataset of `num_train_examples` training images whose mean
    area is `mean_image_area` pixels (None if unknown)."""
    if num_train_examples < SMALL:
        supports = (100, 200, 300, 400, 500)
    elif num_train_examples < MEDIUM:
        supports = (500, 3000, 6000, 9000, 10_000)
    else:
        supports = (500, 6000, 12_000, 18_000, 20_000)
    image_size = None
    if mean_image_area is not None:
        image_size = 128 if mean_image_area < SMALL_IMAGE_AREA else 480
    return Choices(num_train_examples=num_train_examples, mean_image_area=mean_image_area,
                   warmup_steps=supports[0], decay_steps=supports[1:-1],
                   num_train_steps=supports[-1], image_size=image_size,
                   mixup_alpha=0.0 if num_train_examples < SMALL else 0.1)


def mean_image_area(source) -> float | None:
    """The mean area of up to 64 training images, evenly spaced over the split, read from
    their headers (folder datasets); None for a source whose files are not images here."""
    files = getattr(source, "files", {}).get("train")
    if files is None or not len(files):
        return None
    from PIL import Image

    picks = np.linspace(0, len(files) - 1, min(_SAMPLED_IMAGES, len(files))).round().astype(int)
    areas = []
    for index in picks:
        try:
            with Image.open(Path(str(files[index]))) as image:
                areas.append(image.size[0] * image.size[1])
        except OSError:  # unreadable: skipped here as in training
            continue
    return float(np.mean(areas)) if areas else None


def apply(config: ml_collections.ConfigDict, choices: Choices, steps_per_epoch: int) -> None:
    """Writes `choices` into `config`'s fields, in epochs of `steps_per_epoch` steps."""
    epochs = lambda steps: steps / steps_per_epoch  # noqa: E731 - a unit conversion
    config.num_epochs = epochs(choices.num_train_steps)
    config.warmup_epochs = epochs(choices.warmup_steps)
    config.lr_schedule = "step"
    config.lr_decay_epochs = tuple(epochs(step) for step in choices.decay_steps)
    config.lr_decay_factor = 0.1
    config.mixup_alpha = choices.mixup_alpha
    config.eval_every_epochs = epochs(choices.num_train_steps / 10)
    if choices.image_size is not None:
        config.image_size = choices.image_size
