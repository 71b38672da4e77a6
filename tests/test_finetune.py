"""Fine-tuning: init_from a run or a weights file, heads kept, reset or subset, frozen
parameters, learning-rate multipliers, frozen BatchNorm, BiT-HyperRule, and bad input."""

import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chaos import final_params
from conftest import REPO, subprocess_env
from conftest import tiny_config as tiny_config_on_8
from flax import nnx
from safetensors.numpy import load_file, save_file
from seeded_weights import seeded_state_dict

from imagenet_jax import models, run_dir, weights
from imagenet_jax.checkpoint import Checkpointer
from imagenet_jax.console import Console
from imagenet_jax.data import demo
from imagenet_jax.errors import ConfigError
from imagenet_jax.models.layers import freeze_batchnorm
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.parallel.sharding import path_name
from imagenet_jax.train import assemble, hyperrule, init_from, loop
from imagenet_jax.train.optim import create_optimizer, with_learning_rate
from imagenet_jax.transfer import export_from_workdir

PROBE = "^(?!fc/)"  # everything but a ResNet's classifier


def tiny_config(dataset_root, **overrides):
    """The tiny recipe on one device: fine-tuning is the same on any (the fastest here)."""
    config = tiny_config_on_8(dataset_root, **overrides)
    config.mesh.data = 1
    return config


def flat(tree) -> dict[str, np.ndarray]:
    return {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def transfer_dataset(tmp_path_factory):
    """The demo_transfer variant, small: ten classes none of which the tiny demo has."""
    root = tmp_path_factory.mktemp("transfer")
    demo.write_demo_dataset(root, {"train": 20, "val": 7}, variant=demo.TRANSFER)
    return root


@pytest.fixture(scope="module")
def source_run(tiny_dataset, tmp_path_factory):
    """A tiny run with an EMA (6 steps): the weights the tests start from."""
    workdir = tmp_path_factory.mktemp("source") / "run"
    loop.train_and_evaluate(tiny_config(tiny_dataset, num_epochs=0.5, ema_decay=0.5), workdir)
    return workdir


def started(config, tmp_path):
    """(the fresh state, the state init_from makes of it) for `config`, nothing trained."""
    source, derived = assemble.plan(config)
    fitted = loop.start_from(config, tmp_path / "new", derived, source.class_names,
                             Console.silent())
    run = assemble.build(config, derived, mesh_from_shape(derived.mesh_shape))
    return run.state, run.state if fitted is None else init_from.apply(fitted, run.state)


def test_other_classes_reset_the_head_and_take_the_backbone_bitwise(
        source_run, transfer_dataset, tmp_path):
    config = tiny_config(transfer_dataset, init_from=str(source_run))
    fresh, state = started(config, tmp_path)
    ema = flat(final_params(source_run)["ema"])  # the source kept an EMA: its weights
    params, fresh_params = flat(state.params), flat(fresh.params)
    assert {n for n in params if not np.array_equal(params[n], ema.get(f"params/{n}"))} == {
        "fc/kernel", "fc/bias"}
    for name in ("fc/kernel", "fc/bias"):  # reset: the new run's own initialisation
        np.testing.assert_array_equal(params[name], fresh_params[name])
    stats = flat(state.model_state)
    assert all(np.array_equal(v, ema[f"model_state/{n}"]) for n, v in stats.items())
    assert int(state.step) == 0
    assert flat(state.opt_state).keys() == flat(fresh.opt_state).keys()
    assert all(not np.any(v) for n, v in flat(state.opt_state).items() if "trace" in n)


def test_the_same_classes_keep_the_head_and_raw_takes_the_raw_weights(
        source_run, tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, init_from=f"{source_run}@latest:raw")
    _, state = started(config, tmp_path)
    raw = flat(final_params(source_run)["params"])
    assert all(np.array_equal(v, raw[n]) for n, v in flat(state.params).items())
    weights_ = init_from.read(config.init_from, config)
    assert "raw weights" in weights_.description


def test_a_run_with_its_own_checkpoint_resumes_from_it_whatever_init_from_says(
        source_run, tiny_dataset, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(source_run, workdir)
    config = tiny_config(tiny_dataset, num_epochs=0.5, ema_decay=0.5,
                         init_from=str(tmp_path / "no_such_run"))
    result = loop.train_and_evaluate(config, workdir)  # finished: nothing more to train
    assert result["step"] == 6


def test_torchvision_weights_onto_a_10_class_folder(tiny_dataset, tmp_path):
    """Seeded resnet18 weights (no torch): a 16-class file resets the head; a 1,000-class
    file's rows of the folder's classes (ImageNet's first ten wnids) start the new head."""
    for num_classes, head in ((16, "reset"), (1000, "keep_subset")):
        model = nnx.eval_shape(lambda n=num_classes: models.create(
            "resnet18", num_classes=n, rngs=nnx.Rngs(0)))
        file = tmp_path / f"resnet18_{num_classes}.safetensors"
        save_file(seeded_state_dict(weights.torchvision_shapes(model)), str(file))
        config = tiny_config(tiny_dataset, model="resnet18", image_size=32,
                             init_from=str(file))
        fresh, state = started(config, tmp_path / str(num_classes))
        loaded = flat(nnx.to_pure_dict(nnx.state(weights.load_torchvision("resnet18", file),
                                                 nnx.Param)))
        params, fresh_params = flat(state.params), flat(fresh.params)
        backbone = [n for n in params if not n.startswith("fc/")]
        assert backbone and all(np.array_equal(params[n], loaded[n]) for n in backbone)
        if head == "reset":
            np.testing.assert_array_equal(params["fc/kernel"], fresh_params["fc/kernel"])
            # export writes the new head: the state saved as the loop saves its first
            workdir = tmp_path / "exported"
            checkpointer = Checkpointer(run_dir.checkpoints(workdir))
            checkpointer.save(0, state, force=True)
            checkpointer.wait()
            checkpointer.close()
            run_dir.write_config(workdir, config, demo.WNIDS)
            export_from_workdir(workdir, tmp_path / "out.safetensors")
            exported = load_file(str(tmp_path / "out.safetensors"))["fc.weight"]
            np.testing.assert_array_equal(exported, params["fc/kernel"].T)
        else:
            rows = [weights.imagenet_or_numbered(1000).index(w) for w in demo.WNIDS]
            np.testing.assert_array_equal(params["fc/kernel"], loaded["fc/kernel"][:, rows])
            np.testing.assert_array_equal(params["fc/bias"], loaded["fc/bias"][rows])


@pytest.fixture(scope="module")
def probe_run(source_run, transfer_dataset, tmp_path_factory):
    """A linear probe of the source on the transfer classes (6 steps)."""
    workdir = tmp_path_factory.mktemp("probe") / "run"
    config = tiny_config(transfer_dataset, num_epochs=1.0, init_from=str(source_run),
                         freeze=PROBE)
    loop.train_and_evaluate(config, workdir)
    return workdir


def test_frozen_parameters_do_not_move_and_hold_no_optimizer_state(source_run, probe_run):
    trained = final_params(probe_run)
    source = flat(final_params(source_run)["ema"])
    params = flat(trained["params"])
    moved = {n for n, v in params.items() if not np.array_equal(v, source[f"params/{n}"])}
    assert moved == {"fc/kernel", "fc/bias"}
    assert all(np.array_equal(v, source[f"model_state/{n}"])  # frozen BN: statistics fixed
               for n, v in flat(trained["model_state"]).items())
    momentum = [n for n in flat(trained["opt_state"]) if "trace" in n]
    assert sorted(n.split("trace/")[1] for n in momentum) == ["fc/bias", "fc/kernel"]


def test_lr_multipliers_against_a_hand_computed_sgd_update():
    config = tiny_config("unused", optimizer="sgd", momentum=0.0, nesterov=False,
                         weight_decay=0.1, lr_multipliers=(("^fc/", 0.5), ("bias$", 2.0)))
    params = {"fc": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.ones(3)},
              "conv": {"kernel": jnp.full((3, 3), -1.0), "bias": jnp.full(3, 0.5)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    tx = create_optimizer(config)
    state = with_learning_rate(tx.init(params), jnp.float32(0.1))
    updates, _ = tx.update(grads, state, params)
    # -lr x factor x (grad + decay x kernel): first matching rule wins, biases not decayed.
    expected = {"fc": {"kernel": -0.1 * 0.5 * (0.25 + 0.1 * 2.0), "bias": -0.1 * 0.5 * 0.25},
                "conv": {"kernel": -0.1 * 1.0 * (0.25 + 0.1 * -1.0), "bias": -0.1 * 2.0 * 0.25}}
    for (name, got), want in zip(flat(updates).items(), jax.tree.leaves(
            jax.tree.map(lambda p, e: jnp.full_like(p, e), params, expected)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)


def test_batchnorm_frozen_normalises_with_the_running_statistics_in_training():
    model = models.create("resnet_tiny", num_classes=4, rngs=nnx.Rngs(0))
    # Running statistics away from the batch's, so that the two modes differ.
    stats = jax.tree.map(lambda v: v + 0.5, nnx.state(model, nnx.BatchStat))
    nnx.update(model, stats)
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    forward = nnx.jit(lambda m, x: m(x))
    model.eval()
    expected = forward(model, images)
    freeze_batchnorm(model, lambda path: True)
    model.train()
    np.testing.assert_array_equal(forward(model, images), expected)
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.BatchStat)), jax.tree.leaves(stats), strict=True))


def test_a_fine_tuned_run_resumed_from_a_checkpoint_equals_an_uninterrupted_one(
        source_run, transfer_dataset, tmp_path):
    """Resumed from its step-3 checkpoint (init_from not applied again: the run's own
    checkpoint wins), a frozen, multiplied, frozen-BN fine-tune ends where the whole run did."""
    config = tiny_config(transfer_dataset, num_epochs=1.0, checkpoint_every_steps=3,
                         keep_checkpoints=3, init_from=str(source_run), freeze="^stem/",
                         lr_multipliers=(("^stages/", 0.1),), batchnorm_frozen=True)
    loop.train_and_evaluate(config, tmp_path / "whole")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(run_dir.path(tmp_path / "whole") / run_dir.CONFIG, resumed)
    shutil.copytree(run_dir.checkpoints(tmp_path / "whole") / "3",
                    run_dir.checkpoints(resumed) / "3")
    loop.train_and_evaluate(config, resumed)
    whole, again = final_params(tmp_path / "whole"), final_params(resumed)
    assert int(again["step"]) == int(whole["step"]) == 6
    assert flat(again).keys() == flat(whole).keys()
    assert all(np.array_equal(v, flat(whole)[n]) for n, v in flat(again).items())


def test_eval_and_predict_use_the_fine_tuned_classes(probe_run, transfer_dataset):
    from imagenet_jax.evaluation.run import evaluate_run
    from imagenet_jax.predict import predict_files

    assert run_dir.read_config(probe_run).class_names == demo.TRANSFER.wnids
    assert evaluate_run(probe_run, ())["sets"][0]["num_examples"] == 70
    image = next((transfer_dataset / "val" / demo.TRANSFER.wnids[3]).iterdir())
    predicted = predict_files(probe_run, [str(image)], top=3)["predictions"][0]
    assert len(predicted["classes"]) == 3
    assert {c["class"] for c in predicted["classes"]} <= set(demo.TRANSFER.wnids)


@pytest.mark.parametrize("overrides,message", [
    ({"init_from": "/no/such/run"}, "/no/such/run does not exist"),
    ({"init_from": "NOT_WEIGHTS"}, "is not a weights file"),
    ({"init_from": "SOURCE@99"}, "has no checkpoint of step 99; its steps: "),
    ({"freeze": "^fx/"}, "freeze: '^fx/' matches no parameter of resnet_tiny"),
    ({"lr_multipliers": (("^head/", 0.1),)}, "lr_multipliers: '^head/' matches no parameter"),
    ({"freeze": "."}, "matches every parameter of resnet_tiny: nothing would train"),
    ({"init_from": "SOURCE", "init_head": "keep_subset"},
     "init_head=keep_subset: 10 of this dataset's 10 classes are not among the source's"),
    ({"init_from": "SOURCE", "model": "resnet18", "image_size": 32},
     "(a resnet_tiny) does not fit resnet18: stages/0/0/conv1/bn/bias is [16] there and [64] "
     "here"),
])
def test_bad_fine_tuning_input_is_one_error_and_leaves_no_workdir(
        overrides, message, source_run, transfer_dataset, tmp_path, monkeypatch):
    def build(*args):
        raise AssertionError("a model was built for a run that bad input refuses")

    monkeypatch.setattr(assemble, "build", build)  # refused before the minutes of building
    not_weights = tmp_path / "notes.safetensors"
    not_weights.write_text("these are notes, not tensors")
    values = {"NOT_WEIGHTS": str(not_weights), "SOURCE": str(source_run)}
    for name, value in values.items():  # (SOURCE@99: the source run's step 99)
        overrides = {k: v.replace(name, value) if isinstance(v, str) else v
                     for k, v in overrides.items()}
    config = tiny_config(transfer_dataset, **overrides)
    with pytest.raises(ConfigError) as error:
        loop.train_and_evaluate(config, tmp_path / "run")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_mismatched_architecture_exits_2_with_one_line_before_writing(
        source_run, tiny_dataset, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "imagenet_jax", "train", "--config=tests/tiny_config.py",
         f"--config.dataset=folder:{tiny_dataset}",
         "--config.model=resnet18", "--config.image_size=32",
         f"--config.init_from={source_run}", f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=180)
    errors = [line for line in result.stderr.splitlines() if line.startswith("imagenet-jax: error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "does not fit resnet18: stages/0/0/conv1/bn/bias is [16] there" in errors[0]
    assert not (tmp_path / "run").exists()


def test_hyperrule_choices_follow_the_dataset():
    small = hyperrule.choose(1_000, 64 * 64)
    assert (small.num_train_steps, small.warmup_steps, small.decay_steps) == (500, 100,
                                                                             (200, 300, 400))
    assert (small.image_size, small.mixup_alpha) == (128, 0.0)
    medium = hyperrule.choose(20_000, 200 * 200)
    assert (medium.num_train_steps, medium.image_size, medium.mixup_alpha) == (10_000, 480, 0.1)
    assert hyperrule.choose(500_000, None).num_train_steps == 20_000
    assert hyperrule.choose(10, None).image_size is None


def test_hyperrule_sets_the_run_from_the_folder(tiny_dataset):
    config = tiny_config(tiny_dataset, bit_hyperrule=True, learning_rate=0.0015)
    _, derived = assemble.plan(config)
    # 400 images of 72-128 px a side: under 20,000 images, over 96 x 96 pixels.
    assert (derived.num_train_steps, derived.warmup_steps, derived.eval_every_steps) == (
        500, 100, 50)
    assert (config.image_size, config.mixup_alpha, config.lr_schedule) == (480, 0.0, "step")
    peak = 0.0015 * 32 / 256
    rates = [float(loop.assemble.create_learning_rate_fn(config, derived)(step))
             for step in (150, 250, 350, 450)]
    np.testing.assert_allclose(rates, [peak, peak / 10, peak / 100, peak / 1000], rtol=1e-5)
