"""torchvision weights: every architecture's logits equal torchvision's on the same weights,
without torch. tests/fixtures/torchvision_logits.npz holds torchvision's float64 logits on
weights and images drawn by numpy from a seed (scripts/torchvision_reference.py, run with
torch); here the same weights are drawn from the names and shapes our mapping gives,
written as .safetensors, loaded through `load_torchvision` and run in float32."""

from pathlib import Path

import jax
import numpy as np
import pytest
import seeded_weights
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagenet_jax import models
from imagenet_jax.weights import (
    WeightsError,
    load_torchvision,
    save_torchvision,
    torchvision_shapes,
)

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_logits.npz"
# One of each mapping rule in the default run: AlexNet's flatten order (VGG's is the same
# code at 7x7), GoogLeNet's auxiliary heads and input transform (Inception-v3's are the
# same), ResNet's renames with basic, bottleneck and grouped blocks. The other 15, the
# same rules deeper or wider (up to 550 MB of VGG weights each), in `make test-slow`.
DEFAULT = ("alexnet", "googlenet", "resnet18", "resnet50", "resnext50_32x4d")
SLOW = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
        "inception_v3", "resnet34", "resnet101", "resnet152", "wide_resnet50_2",
        "wide_resnet101_2", "resnext101_32x8d")
AUX_OPTIONS = {"googlenet": {"aux_logits": True, "transform_input": True},
               "inception_v3": {"aux_logits": True, "transform_input": True}}


def seeded_file(name: str, directory: Path) -> Path:
    """The seeded torchvision state dict of `name`, as .safetensors."""
    abstract = nnx.eval_shape(lambda: models.create(
        name, num_classes=seeded_weights.NUM_CLASSES, rngs=nnx.Rngs(0),
        **AUX_OPTIONS.get(name, {})))
    path = directory / f"{name}.safetensors"
    save_file(seeded_weights.seeded_state_dict(torchvision_shapes(abstract)), str(path))
    return path


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def check_equal_to_torchvision(name: str, directory: Path) -> None:
    reference = np.load(FIXTURE)
    def images(train=False):
        return jax.numpy.asarray(seeded_weights.seeded_images(name, train).transpose(0, 2, 3, 1),
                                 jax.numpy.float32)

    path = seeded_file(name, directory)
    forward = nnx.jit(lambda model, images: model(images, rngs=nnx.Rngs(dropout=0)))
    model = load_torchvision(name, path)
    assert relative_error(np.asarray(forward(model, images()), np.float64),
                          reference[f"{name}/eval"]) < 1e-4
    if f"{name}/train" in reference:
        model = load_torchvision(name, path, **({"dropout": 0.0} if name == "googlenet" else {}))
        model.train()
        outputs = forward(model, images(train=True))
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        assert relative_error(np.asarray(logits, np.float64), reference[f"{name}/train"]) < 1e-4


@pytest.mark.parametrize("name", DEFAULT)
def test_logits_equal_torchvision(name, tmp_path):
    check_equal_to_torchvision(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_logits_equal_torchvision_deeper_and_wider(name, tmp_path):
    check_equal_to_torchvision(name, tmp_path)


def test_every_torchvision_architecture_has_a_reference():
    stored = {key.split("/")[0] for key in np.load(FIXTURE).files if "/" in key}
    assert stored == set(DEFAULT) | set(SLOW)


def test_save_then_load_is_the_identity_and_aux_heads_follow_the_file(tmp_path):
    path = seeded_file("googlenet", tmp_path)
    model = load_torchvision("googlenet", path)
    assert model.aux1 is not None  # the file has them
    again = tmp_path / "again.safetensors"
    save_torchvision(model, again)
    before, after = load_file(str(path)), load_file(str(again))
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    reloaded = load_torchvision("googlenet", again)
    leaves = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reloaded))
    assert all(np.array_equal(a, b) for a, b in zip(*leaves, strict=True))
    # Asked for without them, as torchvision's builder does: the file's heads are dropped.
    model = load_torchvision("googlenet", path, aux_logits=False)
    assert model.aux1 is None and not any("aux" in str(p) for p, _ in
                                          nnx.to_flat_state(nnx.state(model)))


def test_a_tensor_left_over_missing_or_misshapen_is_named(tmp_path):
    tensors = load_file(str(seeded_file("resnet18", tmp_path)))
    bad = tmp_path / "bad.safetensors"
    save_file({**tensors, "layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)},
              str(bad))
    with pytest.raises(WeightsError, match="'layer5.0.conv1.weight'"):
        load_torchvision("resnet18", bad)
    save_file({k: v for k, v in tensors.items() if k != "layer2.1.bn2.running_var"}, str(bad))
    with pytest.raises(WeightsError, match="missing, e.g. 'layer2.1.bn2.running_var'"):
        load_torchvision("resnet18", bad)
    save_file({**tensors, "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)},
              str(bad))
    with pytest.raises(WeightsError, match=r"'layer1.0.conv1.weight' has shape \(64, 64, 1, 1\)"
                                           r"; the model needs \(64, 64, 3, 3\)"):
        load_torchvision("resnet18", bad)
    with pytest.raises(WeightsError, match="not a torchvision architecture"):
        load_torchvision("resnet_tiny", bad)
    with pytest.raises(WeightsError, match="unknown weights format '.bin'"):
        (tmp_path / "w.bin").write_bytes(b"")
        load_torchvision("resnet18", tmp_path / "w.bin")


def test_import_writes_a_step_0_run_that_exports_the_same_file(tmp_path):
    from imagenet_jax.config import base_config
    from imagenet_jax.saved_run import load_config
    from imagenet_jax.transfer import export_from_workdir, import_to_workdir

    path = seeded_file("resnet18", tmp_path)
    config = base_config()
    config.image_size, config.batch_size, config.eval_batch_size = 32, 8, 8
    config.mesh.data = 1  # the weights are the same on any mesh
    workdir = tmp_path / "run"
    result = import_to_workdir("resnet18", path, workdir, config, open_dataset=False)
    assert result["num_classes"] == seeded_weights.NUM_CLASSES
    saved_config, saved = load_config(workdir)
    assert saved_config.model == "resnet18" and saved.class_names[0] == "class_0"
    assert saved.derived is None  # nothing was derived from a dataset: absent, not made up
    exported = tmp_path / "exported.safetensors"
    assert export_from_workdir(workdir, exported)["step"] == 0
    before, after = load_file(str(path)), load_file(str(exported))
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(Exception, match="already holds checkpoints"):
        import_to_workdir("resnet18", path, workdir, config, open_dataset=False)


def test_import_refuses_weights_of_another_class_count_than_the_dataset(tiny_dataset, tmp_path):
    from conftest import tiny_config

    from imagenet_jax.errors import ConfigError
    from imagenet_jax.transfer import import_to_workdir

    path = seeded_file("resnet18", tmp_path)  # 16 classes; the tiny dataset has 10
    config = tiny_config(tiny_dataset)
    with pytest.raises(ConfigError, match="the weights have 16 classes and dataset .* 10; "
                                          "to fine-tune onto other classes, train a new "
                                          "workdir with --config.init_from="):
        import_to_workdir("resnet18", path, tmp_path / "run", config)
    assert not (tmp_path / "run").exists()
