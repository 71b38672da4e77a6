"""Writes tests/fixtures/torchvision_logits.npz: torchvision's float64 logits of every
zoo architecture on seeded weights and a seeded input, for tests/test_weights.py.

Run once by a developer, in a side environment with torch and torchvision (the suite
itself never needs torch): the weights and images are drawn by numpy from a seed
(tests/seeded_weights.py) from the state dict's names and shapes alone, so the test draws
the very same ones, loads them through imagenet_jax.weights and compares.

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch torchvision numpy
    /tmp/torchenv/bin/python scripts/torchvision_reference.py

Eval mode for every architecture; train mode (batch statistics) too for resnet50 and
googlenet, with dropout off. GoogLeNet and Inception-v3 are built with their auxiliary
heads and transform_input=True, as torchvision builds them for its pretrained weights.
"""

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import seeded_weights  # noqa: E402

# torchvision's C++ ops may not match a CPU build of torch; the models need none of them.
torch.library.register_fake = lambda *args, **kwargs: (lambda f: f)
from torchvision import models  # noqa: E402

ARCHITECTURES = (
    "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "googlenet", "inception_v3", "resnet18", "resnet34", "resnet50", "resnet101",
    "resnet152", "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
)
TRAIN_MODE = ("resnet50", "googlenet")


def build(name: str) -> torch.nn.Module:
    options = {"num_classes": seeded_weights.NUM_CLASSES}
    if name in ("googlenet", "inception_v3"):
        options.update(aux_logits=True, transform_input=True, init_weights=False)
    model = getattr(models, name)(**options)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {k: torch.from_numpy(v) for k, v in seeded_weights.seeded_state_dict(shapes).items()}
    model.load_state_dict(state, strict=True)
    return model.double()


def logits(model: torch.nn.Module, name: str, train: bool) -> np.ndarray:
    model.train(train)
    if train:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(seeded_weights.seeded_images(name, train)))
    out = out[0] if isinstance(out, tuple) else out  # (logits, aux...) in train mode
    return out.numpy()


def main() -> None:
    results = {}
    for name in ARCHITECTURES:
        model = build(name)
        results[f"{name}/eval"] = logits(model, name, train=False)
        if name in TRAIN_MODE:
            results[f"{name}/train"] = logits(build(name), name, train=True)
        print(name, results[f"{name}/eval"][0, :3], flush=True)
    out = REPO / "tests" / "fixtures" / "torchvision_logits.npz"
    np.savez_compressed(out, torch_version=np.asarray(torch.__version__), **results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
