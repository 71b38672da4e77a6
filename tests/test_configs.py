"""Every config in configs/ builds, trains one step and evaluates one batch on CPU."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from imagenet_jax import models
from imagenet_jax.config import base_config
from imagenet_jax.data import input as data_input
from imagenet_jax.data import pipeline
from imagenet_jax.data.feeding import make_global_batch
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.train import recipe
from imagenet_jax.train.steps import ClassMap

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))
# Compiling a train step of these takes 20-70 s each on 2 CPU cores; the same code runs in
# the default suite through resnet18 (BasicBlock) and resnet50 (Bottleneck, groups=1), and
# inception_v3's graph is built and lowered there by test_models (parameters, GMACs).
SLOW_CONFIGS = {"resnet34", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d",
                "inception_v3",
                # 45 s: its aux heads' step; GoogLeNet's train-mode logits (aux heads
                # included) are matched to torchvision's in the default run (test_weights).
                "googlenet"}
# Configs of an architecture another config builds here (resnet50.py) differ in their recipe
# (LARS, LAMB, EMA, RandAugment, mixup, progressive sizes): they train ResNet-tiny, so the
# test pays for the recipe, not for compiling ResNet-50 three more times.
RECIPE_CONFIGS = {"resnet50_mlperf", "resnet50_ffcv", "resnet50_rsb_a3"}
CONFIG_PARAMS = [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW_CONFIGS
                              else []) for p in CONFIGS]


def load_config(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_every_config_documents_its_run():
    assert len(CONFIGS) >= 15
    for path in CONFIGS:
        text = path.read_text()
        for heading in ("Command:", "Hardware:", "Expected:"):
            assert heading in text, f"{path.name} lacks {heading!r} in its docstring"


@pytest.mark.parametrize("path", CONFIG_PARAMS)
def test_config_trains_one_step_and_evaluates(path, tiny_dataset):
    config = load_config(path)
    assert set(config) == set(base_config()), "configs override fields, never add them"
    config.dataset = f"folder:{tiny_dataset}"
    if path.stem in RECIPE_CONFIGS:
        config.model = "resnet_tiny"
    config.image_size = max(models.get_spec(config.model).min_resolution, 32)
    config.eval_image_size = 0
    if config.progressive_resize.start_size:
        config.progressive_resize.update(start_size=config.image_size,
                                         end_size=config.image_size + 16, step=8)
    config.batch_size = config.eval_batch_size = 4
    config.mesh.data = 1  # one device: the cheapest place to build the big models
    if config.model == "inception_v3":
        config.model_options.aux_logits = False  # its aux head needs 299 px (googlenet's runs)
    source, derived = recipe.plan(config)
    mesh = mesh_from_shape(derived.mesh_shape)
    run = recipe.build(config, derived, mesh)
    initial = jax.device_get(run.state.params)

    sharding = pipeline.Sharding(4)
    spec = data_input.train_spec(config)  # the config's crops, sizes and RandAugment
    train_data = pipeline.train_dataset(source, sharding, **dataclasses.asdict(spec))
    train_batch = next(train_data.as_numpy_iterator())
    state, metrics = run.train_step(run.state, make_global_batch(train_batch, mesh))
    assert np.isfinite(float(metrics.loss.compute()))
    assert int(state.step) == 1
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), initial, state.params)
    assert any(jax.tree.leaves(moved))

    eval_batch = next(pipeline.eval_dataset(source, sharding, image_size=config.image_size)
                      .as_numpy_iterator())
    result = run.eval_step(state, make_global_batch(eval_batch, mesh),
                           ClassMap.identity(derived.num_classes))
    assert int(np.sum(result["mask"])) == 4
    assert np.all(np.isfinite(result["nll"])) and np.all(result["top_classes"] >= 0)
