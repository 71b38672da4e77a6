"""The train and eval steps: device-count invariance, exact eval, schedules, decay mask."""

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

from imagenet_jax.data import order, pipeline
from imagenet_jax.data.feeding import make_global_batch
from imagenet_jax.parallel import compiler_options, mesh_from_shape
from imagenet_jax.train import assemble, loop, optim, steps


def _train(config, mesh, num_steps):
    source, derived = assemble.plan(config)
    run = assemble.build(config, derived, mesh)
    spec = pipeline.TrainSpec(config.image_size, config.seed, tuple(config.crop_scale))
    batches = pipeline.train_dataset(
        source, order.BatchSlice(config.batch_size), spec).as_numpy_iterator()
    state, losses = run.state, []
    for _ in range(num_steps):
        state, metrics = run.train_step(state, make_global_batch(next(batches), mesh))
        losses.append(float(metrics.loss.compute()))
    return jax.device_get(state), losses


def _max_relative_difference(a, b):
    """The largest difference of two trees, each tensor's relative to its own size."""
    diffs = jax.tree.map(lambda x, y: np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12), a, b)
    return max(float(d) for d in jax.tree.leaves(diffs))


@pytest.mark.parametrize("group_examples", [0, 4], ids=["batch_norm", "batch_norm_groups_of_4"])
def test_one_and_eight_devices_train_the_same(tiny_dataset, group_examples):
    """Also with BatchNorm over groups of 4 examples: one group per device on 8 devices,
    all 8 groups on one.

    Each step is run on 8 devices from the 1-device run's state before it, and the whole
    state after it (parameters, BatchNorm statistics, optimizer state) must agree to 1e-5
    of each tensor's size (measured here: <= 1.1e-6 in all three steps), and so must the
    step's loss. The states of two free runs are not compared: at 16 px a few parameters
    are sums of terms that nearly cancel (the biases of the BatchNorms that feed the
    residual sums, 1e-4 after two steps of warm-up), so the rounding of one step's
    reductions, which differs with the device count, comes back as a relative difference
    of 2% in them two steps later (measured on an EPYC at lr 0.05; 1.9% on a Xeon at the
    recipe's lr 0.4), and with groups of 4 in the third step's loss (1.4e-4). That
    amplification is the training's, not the sharding's: BatchNorm's two-pass variance
    changes none of these figures.
    """
    assert jax.device_count() == 8
    config = tiny_config(tiny_dataset, batch_size=32, batchnorm_group_examples=group_examples)
    source, derived = assemble.plan(config)
    # The meshes the CLI builds: the config's (data 8, fsdp 1) and one of a single device.
    one, eight = mesh_from_shape({"data": 1, "fsdp": 1}), mesh_from_shape(derived.mesh_shape)
    assert eight.devices.size == 8
    run_1, run_8 = assemble.build(config, derived, one), assemble.build(config, derived, eight)
    shardings_8 = jax.tree.map(lambda x: x.sharding, run_8.state)
    spec = pipeline.TrainSpec(config.image_size, config.seed, tuple(config.crop_scale))
    batches = pipeline.train_dataset(
        source, order.BatchSlice(config.batch_size), spec).as_numpy_iterator()
    state = run_1.state
    for _ in range(3):
        batch = next(batches)
        before = jax.device_get(state)
        state, metrics_1 = run_1.train_step(state, make_global_batch(batch, one))
        after_1 = jax.device_get(state)
        after_8, metrics_8 = run_8.train_step(jax.device_put(before, shardings_8),
                                              make_global_batch(batch, eight))
        after_8 = jax.device_get(after_8)
        np.testing.assert_allclose(float(metrics_8.loss.compute()),
                                   float(metrics_1.loss.compute()), rtol=1e-5)
        for part in ("params", "model_state", "opt_state"):
            assert _max_relative_difference(getattr(after_8, part),
                                            getattr(after_1, part)) <= 1e-5, part
        # The step moved the parameters: the comparison is not of two unchanged states.
        assert _max_relative_difference(after_1.params, before.params) > 1e-3


def test_portable_cpu_math_computes_rsqrt_alike_on_every_cpu():
    """With config.portable_cpu_math the steps are compiled with `compiler_options`: on
    CPUs BatchNorm's rsqrt is IEEE's 1/sqrt (two correctly rounded float32 operations),
    which every x86 CPU computes alike. XLA's default refines a hardware estimate,
    differently on AMD and Intel; the demo's final accuracy differed between the two
    (0.988 and 0.976)."""
    mesh = mesh_from_shape({"data": 1, "fsdp": 1})
    assert compiler_options(mesh, portable_cpu_math=False) is None
    x = np.geomspace(1e-6, 1e6, 65536, dtype=np.float32)
    got = jax.jit(jax.lax.rsqrt, compiler_options=compiler_options(mesh, True))(x)
    np.testing.assert_array_equal(np.asarray(got), np.float32(1) / np.sqrt(x))


class _EveryInitializer(nnx.Module):
    """A layer of each initialiser the model zoo uses: a ResNet's or VGG's convolution
    (variance scaling, normal), AlexNet's and VGG's classifier (normal), GoogLeNet's and
    Inception's (truncated normal), NNX's default (LeCun's, truncated), and a BatchNorm."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(8, 16, (3, 3), rngs=rngs, kernel_init=nnx.initializers.
                             variance_scaling(2.0, "fan_out", "normal"))
        self.normal = nnx.Linear(64, 10, kernel_init=nnx.initializers.normal(0.01), rngs=rngs)
        self.truncated = nnx.Linear(64, 10, kernel_init=nnx.initializers.truncated_normal(0.1),
                                    rngs=rngs)
        self.lecun = nnx.Linear(64, 10, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)


def test_the_initialiser_compiled_once_at_level_1_gives_the_bits_of_level_2(monkeypatch):
    """The state's initialiser runs once, so on CPUs it is compiled at LLVM's level 1 (half
    the compile time): its values must be those level 2 gives, bit for bit, or a run's
    first weights would depend on a compile-time setting."""
    from imagenet_jax.train import state as train_state

    mesh = mesh_from_shape({"data": 1, "fsdp": 1})
    assert compiler_options(mesh, False, runs_once=True) == {"xla_backend_optimization_level": 1}
    made = {}
    for level in (1, 2):
        if level == 2:
            monkeypatch.setattr(train_state, "compiler_options", lambda *args, **kw: None)
        _, state = train_state.create_train_state(_EveryInitializer, optax.sgd(0.1), mesh,
                                                  seed=3)
        made[level] = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(made[1]), jax.tree.leaves(made[2]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(jax.tree.leaves(made[1].params)) == 10


def test_portable_cpu_math_reaches_every_compiled_step(tiny_dataset, monkeypatch):
    from imagenet_jax.train import state as train_state

    asked = []

    def recording(mesh, portable_cpu_math, runs_once=False):
        asked.append((portable_cpu_math, runs_once))
        return compiler_options(mesh, portable_cpu_math, runs_once=runs_once)

    monkeypatch.setattr(steps, "compiler_options", recording)
    monkeypatch.setattr(train_state, "compiler_options", recording)
    for portable in (True, False):
        asked.clear()
        config = tiny_config(tiny_dataset, portable_cpu_math=portable)
        assemble.build(config, assemble.plan(config)[1], mesh_from_shape({"data": 1, "fsdp": 1}))
        # The initial state (compiled for running once), the train step, the eval step.
        assert asked == [(portable, True), (portable, False), (portable, False)]


def test_eval_is_exact_with_a_ragged_last_batch_on_8_devices(tiny_dataset):
    config = tiny_config(tiny_dataset, eval_batch_size=16)  # 70 = 4 * 16 + 6
    source, derived = assemble.plan(config)
    mesh = mesh_from_shape(derived.mesh_shape)
    run = assemble.build(config, derived, mesh)
    state, _ = _train(config, mesh, 4)  # a model whose predictions are not all alike
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, run.state))
    result = loop.run_eval(run.eval_step, state, source=source, config=config, mesh=mesh)
    assert result["num_examples"] == 70

    # Reference: every validation image at once, one device, no padding.
    whole = order.BatchSlice(80)
    images = next(pipeline.eval_dataset(source, whole, image_size=16).as_numpy_iterator())
    model = nnx.merge(run.graphdef, jax.device_get(state.params),
                      jax.device_get(state.model_state))
    model.eval()
    logits = model(steps.normalize(images["image"][:70], np.float32))
    labels = source.labels["val"]
    expected_top1 = float(np.mean(np.argmax(logits, -1) == labels))
    targets = steps.one_hot_targets(labels, logits.shape[-1], 0.0)
    expected_loss = float(np.mean(steps.cross_entropy(logits, targets)))
    assert result["top1"] == pytest.approx(expected_top1, abs=1e-6)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_learning_rate_warmup_then_cosine(tiny_dataset):
    config = tiny_config(tiny_dataset, batch_size=64, learning_rate=0.1, warmup_epochs=1.0,
                         num_epochs=4.0)
    _, derived = assemble.plan(config)
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
    _, derived = assemble.plan(config)
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
