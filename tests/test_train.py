"""The train and eval steps: device-count invariance, exact eval, schedules, decay mask."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from imagenet_jax.data import order, pipeline
from imagenet_jax.data.feeding import make_global_batch
from imagenet_jax.parallel import make_mesh
from imagenet_jax.train import loop, optim, recipe, steps


def _train(config, mesh, num_steps):
    source, derived = recipe.plan(config)
    run = recipe.build(config, derived, mesh)
    batches = pipeline.train_dataset(
        source, order.Sharding(config.batch_size), image_size=config.image_size,
        seed=config.seed, crop_scale=tuple(config.crop_scale)).as_numpy_iterator()
    state, losses = run.state, []
    for _ in range(num_steps):
        state, metrics = run.train_step(state, make_global_batch(next(batches), mesh))
        losses.append(float(metrics.loss.compute()))
    return jax.device_get(state), losses


def _max_relative_difference(a, b):
    diffs = jax.tree.map(lambda x, y: np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12), a, b)
    return max(jax.tree.leaves(diffs))


@pytest.mark.parametrize("group_examples, learning_rate", [(0, 0.4), (4, 0.05)],
                         ids=["batch_norm", "batch_norm_groups_of_4"])
def test_one_and_eight_devices_train_the_same(tiny_dataset, group_examples, learning_rate):
    """Also with BatchNorm over groups of 4 examples: one group per device on 8 devices,
    all 8 groups on one. At a learning rate of 0.05: at the tiny recipe's 0.4, statistics
    of 4 examples at 16 px make training chaotic, and float rounding alone fails the
    comparison (measured: after two steps on 1 and on 8 devices a BN bias differed by 6%,
    while one step from the same state differed by 3e-5 of its update)."""
    assert jax.device_count() == 8
    config = tiny_config(tiny_dataset, batch_size=32, batchnorm_group_examples=group_examples,
                         learning_rate=learning_rate)
    state_1, losses_1 = _train(config, make_mesh(jax.devices()[:1]), 3)
    state_8, losses_8 = _train(config, make_mesh(jax.devices()), 3)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    assert _max_relative_difference(state_8.params, state_1.params) <= 1e-5
    assert _max_relative_difference(state_8.model_state, state_1.model_state) <= 1e-5
    # The steps moved the parameters: the comparison is not between two initial states.
    initial, _ = _train(config, make_mesh(jax.devices()[:1]), 0)
    assert _max_relative_difference(state_1.params, initial.params) > 1e-3


def test_eval_is_exact_with_a_ragged_last_batch_on_8_devices(tiny_dataset):
    config = tiny_config(tiny_dataset, eval_batch_size=16)  # 70 = 4 * 16 + 6
    source, derived = recipe.plan(config)
    mesh = make_mesh()
    run = recipe.build(config, derived, mesh)
    state, _ = _train(config, mesh, 4)  # a model whose predictions are not all alike
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, run.state))
    result = loop.run_eval(run.eval_step, state, source=source, config=config, mesh=mesh)
    assert result["num_examples"] == 70

    # Reference: every validation image at once, one device, no padding.
    whole = order.Sharding(80)
    images = next(pipeline.eval_dataset(source, whole, image_size=16).as_numpy_iterator())
    model = nnx.merge(run.graphdef, jax.device_get(state.params),
                      jax.device_get(state.model_state))
    model.eval()
    logits = model(steps.normalize(images["image"][:70], np.float32))
    labels = source.labels["val"]
    expected_top1 = float(np.mean(np.argmax(logits, -1) == labels))
    expected_loss = float(np.mean(steps.cross_entropy(logits, labels, 0.0)))
    assert result["top1"] == pytest.approx(expected_top1, abs=1e-6)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_learning_rate_warmup_then_cosine(tiny_dataset):
    config = tiny_config(tiny_dataset, batch_size=64, learning_rate=0.1, warmup_epochs=1.0,
                         num_epochs=4.0)
    _, derived = recipe.plan(config)
    assert derived.steps_per_epoch == 6 and derived.num_train_steps == 24
    assert derived.peak_learning_rate == pytest.approx(0.1 * 64 / 256)
    lr = optim.create_learning_rate_fn(config, derived)
    peak = derived.peak_learning_rate
    assert float(lr(0)) == pytest.approx(peak / 6)  # warmup starts above 0
    assert float(lr(3)) == pytest.approx(peak / 6 + (peak - peak / 6) / 2)
    assert float(lr(6)) == pytest.approx(derived.peak_learning_rate)
    assert float(lr(24)) == pytest.approx(0.0, abs=1e-9)
    values = [float(lr(s)) for s in range(6, 25)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_step_schedule_divides_at_the_given_epochs(tiny_dataset):
    config = tiny_config(tiny_dataset, batch_size=64, learning_rate=0.1, warmup_epochs=0.0,
                         num_epochs=4.0, lr_schedule="step", lr_decay_epochs=(2, 3))
    _, derived = recipe.plan(config)
    lr = optim.create_learning_rate_fn(config, derived)
    peak = derived.peak_learning_rate
    assert [float(lr(s)) for s in (0, 11, 12, 18)] == pytest.approx(
        [peak, peak, peak * 0.1, peak * 0.01])


def test_weight_decay_only_on_kernels():
    params = {"conv": {"kernel": np.ones(2)}, "bn": {"scale": np.ones(2), "bias": np.ones(2)},
              "fc": {"kernel": np.ones(2), "bias": np.ones(2)}}
    mask = optim.kernel_mask(params)
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                    "fc": {"kernel": True, "bias": False}}


@pytest.mark.parametrize("num_classes", [3, 10])
def test_topk_correct_is_top_k_membership_ties_included(num_classes):
    rng = np.random.default_rng(0)
    # Few distinct values: most rows hold ties, and top_k breaks them by lower index.
    logits = rng.integers(0, 4, (500, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, 500)
    for k in (1, 2, 5):
        _, top = jax.lax.top_k(logits, min(k, num_classes))
        expected = np.any(np.asarray(top) == labels[:, None], axis=-1)
        np.testing.assert_array_equal(steps.topk_correct(logits, labels, k), expected)
    # A NaN anywhere in a row (top_k would rank it first or last by its sign bit) makes
    # the row wrong, never right.
    logits[0, labels[0]] = np.nan
    logits[1, (labels[1] + 1) % num_classes] = np.nan
    assert list(steps.topk_correct(logits, labels, 5)[:2]) == [0.0, 0.0]


def test_images_per_sec_leaves_the_evaluation_out():
    """10 steps of 1 s with a 100 s evaluation between steps 5 and 6: 10 steps' images
    over 10 s, not over the 110 s of the window (nor over the 5 s after the eval)."""
    now = [0.0]
    throughput = loop.Throughput(global_batch_size=32, start_step=0, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] += 1.0
        if step == 5:
            with throughput.paused():
                now[0] += 100.0
    assert throughput.images_per_sec(10) == 32 * 10 / 10.0
    now[0] += 2.0  # the next window starts where this one ended
    assert throughput.images_per_sec(12) == 32 * 2 / 2.0
