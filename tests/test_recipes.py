"""The large-batch recipes against their formulas: LARS, LAMB and AdamW updates with the
BatchNorm/bias exclusions, the poly schedule, EMA, mixup and CutMix, progressive sizes."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from imagenet_jax.config import base_config, derive, train_image_sizes, validate
from imagenet_jax.console import Console
from imagenet_jax.errors import ConfigError
from imagenet_jax.run_dir import read_records
from imagenet_jax.train import loop, mixing
from imagenet_jax.train.optim import create_learning_rate_fn, create_optimizer, with_learning_rate
from imagenet_jax.train.state import Ema

RNG = np.random.default_rng(0)
PARAMS = {"conv": {"kernel": RNG.normal(size=(3, 3, 2, 4)).astype(np.float32)},
          "bn": {"scale": RNG.normal(size=4).astype(np.float32),
                 "bias": RNG.normal(size=4).astype(np.float32)},
          "fc": {"kernel": RNG.normal(size=(4, 5)).astype(np.float32) * 0.1,
                 "bias": RNG.normal(size=5).astype(np.float32)}}
GRADS = jax.tree.map(lambda p: RNG.normal(size=p.shape).astype(np.float32), PARAMS)
KERNELS = [("conv", "kernel"), ("fc", "kernel")]
OTHERS = [("bn", "scale"), ("bn", "bias"), ("fc", "bias")]


def _first_update(learning_rate=0.5, **fields):
    config = base_config()
    config.update(weight_decay=0.01, **fields)
    tx = create_optimizer(config)
    state = with_learning_rate(tx.init(PARAMS), learning_rate)
    updates, _ = tx.update(GRADS, state, PARAMS)
    return jax.tree.map(np.asarray, updates)


def _norm(x):
    return float(np.sqrt(np.sum(np.square(x, dtype=np.float64))))


def test_lars_scales_kernels_by_their_trust_ratio_and_leaves_bn_and_biases_alone():
    lr, eta, wd = 0.5, 0.001, 0.01
    updates = _first_update(lr, optimizer="lars", lars_trust_coefficient=eta, nesterov=False)
    for layer, name in KERNELS:
        w, g = PARAMS[layer][name], GRADS[layer][name]
        decayed = g + wd * w
        expected = -lr * eta * _norm(w) / _norm(decayed) * decayed
        np.testing.assert_allclose(updates[layer][name], expected, rtol=1e-5)
    for layer, name in OTHERS:  # no decay, no trust ratio: plain momentum SGD's first step
        np.testing.assert_allclose(updates[layer][name], -lr * GRADS[layer][name], rtol=1e-6)


def _adam_direction(g, eps=1e-6):
    # The first Adam step with bias correction: m / (sqrt(v) + eps) with m = g, v = g^2.
    return g / (np.abs(g) + eps)


def test_lamb_trust_ratio_on_kernels_only():
    lr, wd = 0.01, 0.01
    updates = _first_update(lr, optimizer="lamb")
    for layer, name in KERNELS:
        w = PARAMS[layer][name]
        step = _adam_direction(GRADS[layer][name]) + wd * w
        np.testing.assert_allclose(updates[layer][name], -lr * _norm(w) / _norm(step) * step,
                                   rtol=1e-4)
    for layer, name in OTHERS:
        np.testing.assert_allclose(updates[layer][name],
                                   -lr * _adam_direction(GRADS[layer][name]), rtol=1e-4)


def test_adamw_decays_kernels_decoupled_and_nothing_else():
    lr, wd = 0.01, 0.01
    updates = _first_update(lr, optimizer="adamw", adam_epsilon=1e-6)
    for layer, name in KERNELS:
        expected = -lr * (_adam_direction(GRADS[layer][name]) + wd * PARAMS[layer][name])
        np.testing.assert_allclose(updates[layer][name], expected, rtol=1e-4)
    for layer, name in OTHERS:
        np.testing.assert_allclose(updates[layer][name],
                                   -lr * _adam_direction(GRADS[layer][name]), rtol=1e-4)


def test_poly_schedule_is_mlperfs():
    config = base_config()
    config.update(lr_schedule="poly", lr_poly_power=2.0, lr_poly_end=1e-4, learning_rate=0.1,
                  batch_size=512, warmup_epochs=2.0, num_epochs=12.0)
    derived = derive(config, num_classes=10, num_train_examples=5120, num_eval_examples=10,
                     num_devices=1, num_processes=1)
    schedule = create_learning_rate_fn(config, derived)  # 10 steps an epoch, 20 of warmup
    peak, end = 0.2, 1e-4
    assert float(schedule(20)) == pytest.approx(peak)
    assert float(schedule(70)) == pytest.approx((peak - end) * 0.5 ** 2 + end, rel=1e-5)
    assert float(schedule(120)) == pytest.approx(end)


def test_ema_after_n_steps():
    decay, start, target = 0.9, {"w": jnp.zeros(3)}, {"w": jnp.ones(3) * 2.0}
    ema = Ema(params=start, model_state={"mean": jnp.ones(2)})
    for _ in range(5):
        ema = ema.update(target, {"mean": jnp.zeros(2)}, decay)
    np.testing.assert_allclose(ema.params["w"], 2.0 * (1 - decay ** 5), rtol=1e-6)
    np.testing.assert_allclose(ema.model_state["mean"], decay ** 5, rtol=1e-6)


def _images(batch=6, size=8):
    return jax.random.uniform(jax.random.key(1), (batch, size, size, 3))


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixed_targets_sum_to_one_and_name_the_dominant_label(mixup_alpha, cutmix_alpha):
    labels = jnp.arange(6)
    for seed in range(8):
        mixed = mixing.mix(jax.random.key(seed), _images(), labels, mixup_alpha=mixup_alpha,
                           cutmix_alpha=cutmix_alpha)
        one_hot = jax.nn.one_hot(labels, 10) * 0.9 + 0.01  # smoothed: rows sum to one
        targets = mixing.mixed_targets(one_hot, mixed)
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
        weight = float(mixed.weight)
        assert 0 <= weight <= 1
        rows = np.arange(6)  # each row's own label and its partner's (never the same here)
        np.testing.assert_allclose(targets[rows, labels], weight * 0.9 + 0.01, rtol=1e-5)
        np.testing.assert_allclose(targets[rows, labels[::-1]], (1 - weight) * 0.9 + 0.01,
                                   rtol=1e-5)
        np.testing.assert_array_equal(mixed.partner_labels, labels[::-1])
        dominant = np.asarray(mixed.dominant_labels(labels))
        np.testing.assert_array_equal(dominant, labels if weight >= 0.5 else labels[::-1])


def test_mixup_blends_each_image_with_its_mirror():
    images = _images()
    mixed = mixing.mix(jax.random.key(3), images, jnp.arange(6), mixup_alpha=0.4, cutmix_alpha=0)
    w = float(mixed.weight)
    assert 0 < w < 1
    np.testing.assert_allclose(mixed.images, w * images + (1 - w) * images[::-1], rtol=1e-6)


def test_cutmix_box_area_is_the_partners_share():
    images = _images(size=32)
    fractions = []
    for seed in range(12):
        mixed = mixing.mix(jax.random.key(seed), images, jnp.arange(6), mixup_alpha=0,
                           cutmix_alpha=1.0)
        from_partner = np.all(np.asarray(mixed.images) == np.asarray(images[::-1]), axis=-1)
        from_self = np.all(np.asarray(mixed.images) == np.asarray(images), axis=-1)
        assert np.all(from_partner ^ from_self), "each pixel is one image's or the other's"
        # One box for the batch, the same in every image.
        assert np.all(from_partner == from_partner[0])
        fractions.append(from_partner[0].mean())
        assert from_partner[0].mean() == pytest.approx(1 - float(mixed.weight), abs=1e-6)
    assert 0 < np.mean(fractions) < 1 and len(set(fractions)) > 3


def test_progressive_sizes_follow_ffcvs_ramp():
    config = base_config()
    config.progressive_resize.update(start_size=160, end_size=192, start_epoch=2.0,
                                     end_epoch=6.0, step=8)
    sizes = train_image_sizes(config, 8)
    # 160 until epoch 2, then 168, 176, 184, 192 (the ramp, on multiples of 8), then 192.
    assert sizes == (160, 160, 160, 168, 176, 184, 192, 192)


@pytest.mark.parametrize("field,value,message", [
    ("optimizer", "lbfgs", "valid: sgd, rmsprop, lars, lamb, adamw"),
    ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
    ("mixup_alpha", -0.1, "mixup_alpha must be >= 0"),
    ("randaugment", "2", "expected 'N,M'"),
    ("randaugment", "2,31", "expected 'N,M'"),
    ("target_top1", 76.0, r"target_top1 must be in \[0, 1\]"),
    ("batchnorm_group_examples", 5, "divide batch_size=256"),
    ("progressive_resize", {"start_size": 192, "end_size": 160}, "start_size <= end_size"),
])
def test_bad_recipe_fields_fail_before_anything_runs(field, value, message):
    config = base_config()
    if isinstance(value, dict):
        config[field].update(value)
    else:
        config[field] = value
    with pytest.raises(ConfigError, match=message):
        validate(config, model_names=["resnet50"], num_devices=8)



def test_a_run_stops_at_its_target_top1_and_says_so_when_rerun(tiny_dataset, tmp_path):
    """Every model scores some val example at the first eval (7 of each class), so a tiny
    target is reached there: step 6 of 12, with its checkpoint and a 'target' record."""
    config = tiny_config(tiny_dataset, num_epochs=1.0, eval_every_epochs=0.5,
                         checkpoint_every_steps=100, target_top1=1e-6)
    config.mesh.data = 1
    result = loop.train_and_evaluate(config, tmp_path)
    assert result["step"] == 6 and result["top1"] >= 1e-6
    target = [r for r in read_records(tmp_path) if r["split"] == "target"]
    assert len(target) == 1 and target[0]["steps"] == 6 and target[0]["epochs"] == 0.5
    assert target[0]["time"] > 0 and target[0]["top1"] == result["top1"]
    assert (tmp_path / "checkpoints" / "6").is_dir()
    records = read_records(tmp_path)
    printed = io.StringIO()
    again = loop.train_and_evaluate(config, tmp_path, console=Console(printed, live=False))
    assert again["step"] == 6 and read_records(tmp_path) == records  # nothing trained
    assert printed.getvalue() == (f"The run in {tmp_path} already finished (step 6, target "
                                  "top-1 reached).\n")
    config.target_top1 = 1.0  # a higher target carries the run on from its checkpoint
    assert loop.train_and_evaluate(config, tmp_path)["step"] == 12
