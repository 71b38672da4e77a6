"""Mixed precision: the state stays float32, the arithmetic is bfloat16 or float16, the
losses agree; float16 scales the loss dynamically.

One tiny config is trained for three steps in float32, bfloat16 and float16, from the
same seed on the same three batches. The first step starts from identical float32
parameters, so its loss differs only by the precision of the arithmetic.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from imagenet_jax.data import order, pipeline
from imagenet_jax.data.feeding import make_global_batch
from imagenet_jax.parallel import mesh_from_shape
from imagenet_jax.train import assemble
from imagenet_jax.train.loss_scale import GROWTH_PERIOD, INITIAL_SCALE, LossScale

NUM_STEPS = 3
# bfloat16 keeps 8 significant bits (7 stored), so one rounding moves a value by up to
# 2**-8 ~ 0.4% relative: two to three significant decimal digits. Every layer rounds its
# output once, and the errors of the ~10 layers of ResNet-tiny partly cancel in the
# float32 mean over 32 examples: when this test was written the losses differed by
# 3e-4 to 1.5e-3 relative over the three steps. 2e-2 is five bfloat16 rounding steps:
# room for the runs to drift apart over three different updates, and still well under
# the 7-9% the loss moves from one step to the next here, so a step that computed
# something else would show.
LOSS_RTOL = 2e-2
# float32 alone (another summation order, another device count) keeps these losses within
# 1e-5 relative (test_train's 1-vs-8-device tolerance); a bfloat16 run moves further.
FLOAT32_NOISE_RTOL = 1e-5


def _config(dataset_root, dtype):
    config = tiny_config(dataset_root, dtype=dtype, image_size=16, batch_size=32)
    config.mesh.data = 1  # one device: the precision is under test, not the sharding
    return config


def _first_batches(config, num_batches):
    source, _ = assemble.plan(config)
    spec = pipeline.TrainSpec(config.image_size, config.seed, tuple(config.crop_scale))
    batches = pipeline.train_dataset(
        source, order.BatchSlice(config.batch_size), spec).as_numpy_iterator()
    return [next(batches) for _ in range(num_batches)]


def _train(config, batches, initial_scale=None):
    """(per-step losses, final state on the host, the step's StableHLO text, metrics)."""
    _, derived = assemble.plan(config)
    mesh = mesh_from_shape(derived.mesh_shape)
    run = assemble.build(config, derived, mesh)
    global_batches = [make_global_batch(batch, mesh) for batch in batches]
    hlo = run.train_step.lower(run.state, global_batches[0]).as_text()
    state, losses, all_metrics = run.state, [], []
    if initial_scale is not None:
        state = state.replace(loss_scale=state.loss_scale.replace(
            scale=jnp.asarray(initial_scale, jnp.float32)))
    for batch in global_batches:
        state, metrics = run.train_step(state, batch)
        losses.append(float(metrics.loss.compute()))
        all_metrics.append(jax.device_get(metrics.compute()))
    return np.asarray(losses), jax.device_get(state), hlo, all_metrics


@pytest.fixture(scope="module")
def runs(tiny_dataset):
    """Each dtype, trained on the same batches: {dtype: (losses, state, hlo, metrics)}."""
    batches = _first_batches(_config(tiny_dataset, "float32"), NUM_STEPS)
    return {dtype: _train(_config(tiny_dataset, dtype), batches)
            for dtype in ("float32", "bfloat16", "float16")}


def _floating_dtypes(tree):
    leaves = jax.tree.leaves(tree)
    return {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)}


def _convolution_result_types(hlo):
    """The element type of every convolution's result in StableHLO text, e.g. ['bf16', ...]."""
    return re.findall(r"stablehlo\.convolution.*-> tensor<[0-9x]+x(\w+)>", hlo)


def test_bfloat16_keeps_parameters_optimizer_and_batchnorm_state_in_float32(runs):
    _, state, _, _ = runs["bfloat16"]
    assert _floating_dtypes(state.params) == {jnp.dtype(jnp.float32)}
    assert _floating_dtypes(state.opt_state) == {jnp.dtype(jnp.float32)}  # momentum
    assert _floating_dtypes(state.model_state) == {jnp.dtype(jnp.float32)}  # BN mean/var


def test_bfloat16_step_computes_in_bfloat16(runs):
    bf16_convolutions = _convolution_result_types(runs["bfloat16"][2])
    f32_convolutions = _convolution_result_types(runs["float32"][2])
    # Forward and backward convolutions: every one in the dtype of the run.
    assert bf16_convolutions and set(bf16_convolutions) == {"bf16"}
    assert f32_convolutions and set(f32_convolutions) == {"f32"}
    relative = np.abs(runs["bfloat16"][0] - runs["float32"][0]) / np.abs(runs["float32"][0])
    assert relative.max() > FLOAT32_NOISE_RTOL, relative


def test_bfloat16_losses_agree_with_float32_at_every_step(runs):
    f32_losses, bf16_losses = runs["float32"][0], runs["bfloat16"][0]
    assert np.all(np.isfinite(bf16_losses)), bf16_losses
    np.testing.assert_allclose(bf16_losses, f32_losses, rtol=LOSS_RTOL)


def test_float16_trains_like_float32_with_a_loss_scale(runs):
    f32_losses, f16_losses = runs["float32"][0], runs["float16"][0]
    np.testing.assert_allclose(f16_losses, f32_losses, rtol=LOSS_RTOL)
    _, state, hlo, metrics = runs["float16"]
    assert set(_convolution_result_types(hlo)) == {"f16"}
    assert _floating_dtypes(state.params) == {jnp.dtype(jnp.float32)}
    assert float(state.loss_scale.scale) == INITIAL_SCALE  # no overflow: unchanged
    assert int(state.loss_scale.good_steps) == NUM_STEPS
    assert [m["loss_scale_overflows"] for m in metrics] == [0] * NUM_STEPS
    assert float(runs["float32"][1].loss_scale.scale) == 1.0  # float32 never scales


def test_float16_overflow_skips_the_step_and_halves_the_scale(tiny_dataset):
    """From an absurd scale, gradients overflow float16: each step changes nothing but the
    scale, which halves; none counts as a non-finite step (that would stop the run)."""
    config = _config(tiny_dataset, "float16")
    batches = _first_batches(config, 2)
    initial = jax.device_get(assemble.build(config, assemble.plan(config)[1],
                                        mesh_from_shape({"data": 1})).state)
    _, state, _, metrics = _train(config, batches, initial_scale=2.0**60)
    assert float(state.loss_scale.scale) == 2.0**58
    assert [m["loss_scale_overflows"] for m in metrics] == [1, 1]
    assert [m["nonfinite_steps"] for m in metrics] == [0, 0]
    for new, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial.params),
                        strict=True):
        np.testing.assert_array_equal(new, old)


def test_loss_scale_grows_after_a_period_of_finite_steps():
    scale = LossScale(scale=jnp.float32(8.0), good_steps=jnp.int32(GROWTH_PERIOD - 1))
    grown = scale.adjust(jnp.bool_(True))
    assert (float(grown.scale), int(grown.good_steps)) == (16.0, 0)
    shrunk = scale.adjust(jnp.bool_(False))
    assert (float(shrunk.scale), int(shrunk.good_steps)) == (4.0, 0)
    floor = LossScale(scale=jnp.float32(1.0), good_steps=jnp.int32(0))
    assert not bool(floor.is_overflow(jnp.bool_(True), jnp.bool_(False)))  # at scale 1: real
    assert bool(scale.is_overflow(jnp.bool_(True), jnp.bool_(False)))
    assert not bool(scale.is_overflow(jnp.bool_(False), jnp.bool_(False)))  # a NaN loss
    assert float(floor.adjust(jnp.bool_(False)).scale) == 1.0


def test_the_rate_applied_after_a_skipped_step_is_the_schedules_at_that_step(tiny_dataset):
    """A skipped step rolls the optimizer state back while the step advances: the update
    that follows must still apply learning_rate_fn(step), not the rate of a count that
    lags behind (the warmup changes the rate at every step here)."""
    config = _config(tiny_dataset, "float16")
    batches = _first_batches(config, 3)
    _, derived = assemble.plan(config)
    mesh = mesh_from_shape(derived.mesh_shape)
    run = assemble.build(config, derived, mesh)
    batches = [make_global_batch(batch, mesh) for batch in batches]
    state = run.state.replace(loss_scale=run.state.loss_scale.replace(
        scale=jnp.asarray(2.0**60, jnp.float32)))
    state, metrics = run.train_step(state, batches[0])  # overflows: skipped
    assert int(metrics.loss_scale_overflows.total) == 1 and int(state.step) == 1
    state = state.replace(loss_scale=state.loss_scale.replace(
        scale=jnp.asarray(INITIAL_SCALE, jnp.float32)))
    for step, batch in ((1, batches[1]), (2, batches[2])):
        state, metrics = run.train_step(state, batch)
        assert int(metrics.loss_scale_overflows.total) == 0
        applied = float(state.opt_state.hyperparams["learning_rate"])
        # (Computed inside the jitted step: equal to the eager schedule to float32 rounding.)
        assert applied == pytest.approx(float(run.learning_rate_fn(step)), rel=1e-6)
        assert applied != pytest.approx(float(run.learning_rate_fn(step - 1)), rel=1e-3)
        assert float(metrics.learning_rate.value) == applied  # what is logged is what applied
