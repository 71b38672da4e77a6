"""Every config in configs/ builds, trains one step and evaluates one batch on CPU."""

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, subprocess_env

from imagenet_jax import models
from imagenet_jax.config import RESNET_ARCHS, base_config, resnet_recipe
from imagenet_jax.data import loader, order, pipeline
from imagenet_jax.data.feeding import make_global_batch
from imagenet_jax.errors import ConfigError
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.train import assemble
from imagenet_jax.train.steps import ClassMap

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.py"))
# configs/resnet.py:ARCH needs its ARCH: it trains below once per architecture.
PARAMETERISED_CONFIGS = {"resnet": RESNET_ARCHS}
# Compiling a train step of these takes 20-70 s each on 2 CPU cores; the same code runs in
# the default suite through resnet18 (BasicBlock, and the ResNet recipe every ARCH shares),
# whose Bottleneck twins resnet50 and resnext50_32x4d have their logits matched to
# torchvision's there (test_weights), and inception_v3's graph is built and lowered there by
# test_models (parameters, GMACs).
SLOW_CONFIGS = {"resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                "resnext50_32x4d", "inception_v3",
                # 45 s: its aux heads' step; GoogLeNet's train-mode logits (aux heads
                # included) are matched to torchvision's in the default run (test_weights).
                "googlenet"}
# Configs whose architecture is resnet50 differ from configs/resnet.py:resnet50 in their
# recipe (LARS, LAMB, EMA, RandAugment, mixup, progressive sizes): they train ResNet-tiny,
# so the test pays for the recipe, not for compiling ResNet-50 three more times.
RECIPE_CONFIGS = {"resnet50_mlperf", "resnet50_ffcv", "resnet50_rsb_a3", "finetune",
                  "linear_probe"}
CONFIG_PARAMS = [
    pytest.param(path, arg, id=arg or path.stem,
                 marks=[pytest.mark.slow] if (arg or path.stem) in SLOW_CONFIGS else [])
    for path in CONFIGS for arg in PARAMETERISED_CONFIGS.get(path.stem, ("",))]


def load_config(path: Path, *args: str):
    """`path`'s get_config(*args), as --config=PATH[:ARG] gives it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def run_train(*args: str) -> subprocess.CompletedProcess:
    """`imagenet-jax train ARGS` on 8 fake CPU devices, as tests/test_cli.py runs it."""
    return subprocess.run([sys.executable, "-m", "imagenet_jax", "train", *args], cwd=REPO,
                          env=subprocess_env(8), capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("imagenet-jax: error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    return errors[0]


# A docstring section: "Name:" at the start of a line, its text after it and on the indented
# lines that follow.
SECTION = re.compile(r"^(\w+):\s+(.*)$")
# A line of the "Command:" section: one imagenet-jax command, perhaps with a remark after it
# in brackets ("imagenet-jax train   (this config is the default)").
COMMAND = re.compile(r"^imagenet-jax (?P<args>[^(]*?)\s*(\(.*\))?$")
HARDWARE = re.compile(r"\b(GPUs?|TPUs?|CPUs?)\b")
# A top-1 accuracy: a fraction (0.761) or a percentage (78.1%).
ACCURACY = re.compile(r"\b(0\.\d+)\b|\b(\d{1,2}(\.\d+)?)%")


def docstring_sections(text: str) -> dict[str, list[str]]:
    """A docstring's sections, each as its lines, stripped."""
    sections, current = {}, None
    for line in text.splitlines():
        if match := SECTION.match(line):
            current = match[1]
            sections[current] = [match[2].strip()]
        elif current and line.startswith(" "):
            sections[current].append(line.strip())
        else:
            current = None
    return sections


def assert_runs_this_config(path: Path, line: str) -> None:
    """`line` is an imagenet-jax command whose subcommand takes each of its flags, and that
    runs the config `path` (named by --config, or the CLI's default), which loads with its
    --config.FIELD=VALUE overrides as the CLI loads them (config_flags, locked)."""
    from absl import flags
    from ml_collections import config_flags

    from imagenet_jax.cli import COMMANDS, DEFAULT_CONFIG

    match = COMMAND.match(line)
    assert match, f"{path.name}: {line!r} is not an imagenet-jax command"
    command, *args = shlex.split(match["args"])
    assert command in COMMANDS, f"{path.name}: {line!r}: no command {command!r}"
    for arg in args:
        name = arg.removeprefix("--").split("=", 1)[0]
        assert arg.startswith("--") and COMMANDS[command].takes(name), (
            f"{path.name}: {line!r}: {command} takes no {arg!r}")
    named = [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    config_file = named[0] if named else str(DEFAULT_CONFIG.relative_to(REPO))
    assert REPO / config_file.partition(":")[0] == path, (
        f"{path.name}: {line!r} runs {config_file}, not this file")
    config_args = ["imagenet-jax", f"--config={config_file}",
                   *(arg for arg in args if arg.startswith("--config."))]
    parsed = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=parsed, lock_config=True,
                                    sys_argv=config_args)
    try:
        parsed(config_args)  # each --config.FIELD=VALUE: a field of the config, a valid value
    except (flags.Error, AttributeError, KeyError) as e:
        raise AssertionError(f"{path.name}: {line!r}: the CLI refuses it: {e!r}") from e


def assert_documents_its_run(path: Path, docstring: str) -> None:
    """The docstring holds the command that runs this config (the CLI accepts each of its
    flags), the hardware it runs on and the top-1 accuracy to expect."""
    sections = docstring_sections(docstring)
    for heading in ("Command", "Hardware", "Expected"):
        assert sections.get(heading), f"{path.name} lacks {heading + ':'!r} in its docstring"
    for line in sections["Command"]:
        assert_runs_this_config(path, line)
    hardware = " ".join(sections["Hardware"])
    assert HARDWARE.search(hardware), f"{path.name}: Hardware: names no GPU, TPU or CPU"
    expected = " ".join(sections["Expected"])
    assert "top-1" in expected and ACCURACY.search(expected), (
        f"{path.name}: Expected: states no top-1 accuracy (0.761 or 76.1%): {expected!r}")
    if path.stem in PARAMETERISED_CONFIGS:
        for arch in RESNET_ARCHS:  # each architecture the argument chooses: its own figure
            assert re.search(rf"\b{arch} 0\.\d+", expected), f"{path.name}: no top-1 for {arch}"


def test_every_config_documents_its_run(monkeypatch):
    assert {"demo", "alexnet", "vgg16", "googlenet", "inception_v3", "resnet"} <= {
        path.stem for path in CONFIGS}  # a config for each family of the zoo
    monkeypatch.chdir(REPO)  # the documented commands run from the repository's root
    for path in CONFIGS:
        assert_documents_its_run(path, ast.get_docstring(ast.parse(path.read_text())) or "")


def test_the_resnet_config_builds_each_architecture_with_one_recipe():
    configs = {arch: load_config(CONFIG_DIR / "resnet.py", arch).to_dict() for arch in RESNET_ARCHS}
    for arch, config in configs.items():
        assert config["model"] == arch and arch in models.names()
        # Only the architecture differs: the recipe is the same for every ARCH.
        assert {**config, "model": ""} == {**configs["resnet50"], "model": ""}, arch
    assert configs["resnet50"]["batch_size"] == 1024 and configs["resnet50"]["num_epochs"] == 90


def test_resnet_recipe_names_the_valid_architectures():
    for bad in ("resnet19", ""):
        with pytest.raises(ConfigError, match="valid: resnet18, resnet34, resnet50, resnet101"):
            resnet_recipe(bad)


def test_parameterised_config_through_the_cli(tmp_path):
    # The config loads (ARCH reached get_config), then validation refuses the batch: proof
    # enough that --config=FILE:ARCH parses, without building a model.
    good = run_train("--config=configs/resnet.py:resnet18", "--config.batch_size=12",
                     f"--workdir={tmp_path / 'good'}")
    assert "batch_size=12 is not divisible by the number of devices (8)" in one_error_line(good)
    bad = run_train("--config=configs/resnet.py:resnet19", f"--workdir={tmp_path / 'bad'}")
    assert one_error_line(bad) == (
        "imagenet-jax: error: config: unknown ResNet architecture 'resnet19'; valid: "
        f"{', '.join(RESNET_ARCHS)} (e.g. --config=configs/resnet.py:resnet101)")
    assert not (tmp_path / "good").exists() and not (tmp_path / "bad").exists()


def test_default_workdir_keeps_the_config_argument():
    from imagenet_jax.commands import default_workdir

    assert default_workdir("configs/alexnet.py") == "runs/alexnet"
    assert default_workdir("configs/resnet.py:resnet101") == "runs/resnet_resnet101"


@pytest.mark.parametrize("path,arg", CONFIG_PARAMS)
def test_config_trains_one_step_and_evaluates(path, arg, tiny_dataset):
    config = load_config(path, *([arg] if arg else []))
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
    # BiT-HyperRule would pick 480 px for these images (its choices: test_finetune).
    config.bit_hyperrule = False
    config.mesh.data = 1  # one device: the cheapest place to build the big models
    if config.model == "inception_v3":
        config.model_options.aux_logits = False  # its aux head needs 299 px (googlenet's runs)
    source, derived = assemble.plan(config)
    mesh = mesh_from_shape(derived.mesh_shape)
    run = assemble.build(config, derived, mesh)
    initial = jax.device_get(run.state.params)

    batch_slice = order.BatchSlice(4)
    spec = loader.train_spec(config)  # the config's crops, sizes and RandAugment
    train_data = pipeline.train_dataset(source, batch_slice, spec)
    train_batch = next(train_data.as_numpy_iterator())
    state, metrics = run.train_step(run.state, make_global_batch(train_batch, mesh))
    assert np.isfinite(float(metrics.loss.compute()))
    assert int(state.step) == 1
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), initial, state.params)
    assert any(jax.tree.leaves(moved))

    eval_batch = next(pipeline.eval_dataset(source, batch_slice, image_size=config.image_size)
                      .as_numpy_iterator())
    result = run.eval_step(state, make_global_batch(eval_batch, mesh),
                           ClassMap.identity(derived.num_classes))
    assert int(np.sum(result["mask"])) == 4
    assert np.all(np.isfinite(result["nll"])) and np.all(result["top_classes"] >= 0)
