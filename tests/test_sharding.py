"""Sharding on 8 fake devices, read off the compiled step: data parallel, fsdp, grouped BN.

The collectives are counted in the compiled HLO (`lower(...).compile().as_text()`), so
these tests pin what XLA actually runs, not what the code asks for. XLA:CPU (jaxlib
0.10.2) does not fuse an all-reduce and a slice into a reduce-scatter, as XLA's GPU and
TPU pipelines do, so on CPU the fsdp gradient reduction shows as an all-reduce of the
whole gradient, which each device then slices to its shard.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from imagenet_jax.bench import hlo
from imagenet_jax.bench.train import synthetic_batches
from imagenet_jax.config import base_config, mesh_shape, validate
from imagenet_jax.errors import ConfigError
from imagenet_jax.models.layers import BatchNorm, batchnorm_groups, set_batchnorm_groups
from imagenet_jax.parallel import batch_sharding, mesh_from_shape, replicated
from imagenet_jax.parallel.sharding import ShardingRules, param_shardings
from imagenet_jax.train import assemble, steps

FSDP_MIN_SIZE = 1024  # resnet_tiny's 3x3 convs (2,304+ elements) shard; BN and biases do not


def result_arrays(instructions: list[hlo.Instruction]) -> set[tuple[int, ...]]:
    """The dimensions of every array the collectives produce (tuples unpacked)."""
    return {dims for i in instructions for _, dims in hlo.result_arrays(i)}


def _config(dataset, data, fsdp, **overrides):
    config = tiny_config(dataset, batch_size=32, fsdp_min_size=FSDP_MIN_SIZE, **overrides)
    config.mesh.data, config.mesh.fsdp = data, fsdp
    return config


def _build(config):
    _, derived = assemble.plan(config)
    mesh = mesh_from_shape(derived.mesh_shape)
    run = assemble.build(config, derived, mesh)
    batch = next(synthetic_batches(config, derived, mesh))
    return run, batch, mesh


def _train(run, batch, compiled, num_steps):
    state, losses = run.state, []
    for _ in range(num_steps):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics.loss.compute()))
    return jax.device_get(state), losses


@pytest.fixture(scope="module")
def data_parallel(tiny_dataset):
    run, batch, _ = _build(_config(tiny_dataset, data=8, fsdp=1))
    return run, batch, run.train_step.lower(run.state, batch).compile()


@pytest.fixture(scope="module")
def fsdp(tiny_dataset):
    run, batch, _ = _build(_config(tiny_dataset, data=2, fsdp=4))
    return run, batch, run.train_step.lower(run.state, batch).compile()


def test_data_parallel_all_reduces_gradients_and_gathers_nothing(data_parallel):
    run, _, compiled = data_parallel
    found = hlo.collectives(compiled.as_text())
    assert found["all-reduce"], "no gradient all-reduce"
    # Neither parameters nor activations: top-1/top-5 stay per example (no top_k sort
    # over the gathered logits).
    assert not found["all-gather"], f"all-gathered: {[i.shape for i in found['all-gather']]}"
    specs = {x.sharding.spec for x in jax.tree.leaves(run.state)}
    assert specs == {PartitionSpec()}, "data parallelism replicates the whole state"


def test_fsdp_shards_the_state_gathers_parameters_and_reduces_into_shards(fsdp):
    run, _, compiled = fsdp
    params = jax.tree.leaves(run.state.params)
    sharded = [p for p in params if p.sharding.spec != PartitionSpec()]
    assert len(sharded) >= 8, "the convolutions should be sharded"
    for p in sharded:
        assert "fsdp" in p.sharding.spec and p.size >= FSDP_MIN_SIZE
        assert p.addressable_shards[0].data.size == p.size // 4  # really stored split
    for p in params:
        if p.size < FSDP_MIN_SIZE:
            assert p.sharding.spec == PartitionSpec()
    # Momentum follows its parameter.
    momentum = [x for x in jax.tree.leaves(run.state.opt_state) if x.ndim > 0]
    assert sorted(str(x.sharding.spec) for x in momentum) == sorted(
        str(p.sharding.spec) for p in params)

    found = hlo.collectives(compiled.as_text())
    gathered = result_arrays(found["all-gather"])
    assert {p.shape for p in sharded} <= gathered, "every sharded parameter is all-gathered whole"
    # The gradients reduce into the shards: a reduce-scatter, or on XLA:CPU an all-reduce
    # of the whole gradient (its layout may be transposed) that each device slices.
    if jax.devices()[0].platform != "cpu":
        assert found["reduce-scatter"]
    else:
        reduced_sizes = {math.prod(dims) for dims in result_arrays(found["all-reduce"])}
        assert {p.size for p in sharded} <= reduced_sizes
    # ZeRO, not model parallelism: activations are never exchanged between devices.
    assert not found["all-to-all"]


def test_fsdp_trains_like_data_parallel(data_parallel, fsdp):
    """Last in the module of the tests on these fixtures: the steps donate their states."""
    initial = jax.device_get(data_parallel[0].state.params)
    state_dp, losses_dp = _train(*data_parallel, 2)
    state_fsdp, losses_fsdp = _train(*fsdp, 2)
    np.testing.assert_allclose(losses_fsdp, losses_dp, rtol=1e-5)
    for name in ("params", "model_state", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(state_fsdp, name)),
                        jax.tree.leaves(getattr(state_dp, name)), strict=True):
            assert np.max(np.abs(a - b)) <= 1e-5 * (np.max(np.abs(b)) + 1e-12), name
    moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(state_dp.params),
                                                    jax.tree.leaves(initial), strict=True)]
    assert max(moved) > 1e-3, "the steps moved the parameters"


def _forward_fn(run, mesh):
    """The train-mode forward pass alone, logits out, jitted with the batch on the devices."""

    def forward(params, model_state, images):
        model = nnx.merge(run.graphdef, params, model_state)
        model.train()
        return model(steps.normalize(images, jnp.float32))

    return jax.jit(forward, in_shardings=(replicated(mesh), replicated(mesh),
                                          batch_sharding(mesh)))


def _forward(tiny_dataset, group_examples, data=8):
    config = _config(tiny_dataset, data=data, fsdp=1, batchnorm_group_examples=group_examples)
    run, batch, mesh = _build(config)
    forward = _forward_fn(run, mesh)
    args = (run.state.params, run.state.model_state, batch["image"])
    return forward.lower(*args).compile().as_text(), forward(*args)


def test_per_device_batchnorm_needs_no_collective_in_the_forward_pass(tiny_dataset):
    # 32 examples over 8 devices: groups of 4 are each one device's examples.
    per_device_hlo, per_device_logits = _forward(tiny_dataset, group_examples=4)
    global_hlo, global_logits = _forward(tiny_dataset, group_examples=0)
    assert len(hlo.collectives(global_hlo)["all-reduce"]) >= 1
    assert hlo.collectives(per_device_hlo)["all-reduce"] == []
    assert not np.allclose(per_device_logits, global_logits, rtol=1e-3), \
        "per-device statistics differ from global ones on random data"
    whole_hlo, whole_logits = _forward(tiny_dataset, group_examples=32)  # one group: global
    np.testing.assert_allclose(whole_logits, global_logits, rtol=1e-6, atol=1e-6)
    # Groups are examples, not devices: one device computes what the eight do.
    _, one_device_logits = _forward(tiny_dataset, group_examples=4, data=1)
    np.testing.assert_allclose(one_device_logits, per_device_logits, rtol=1e-5, atol=1e-5)


def test_grouped_batchnorm_is_batchnorm_of_each_group():
    x = jax.random.normal(jax.random.key(0), (8, 3, 3, 4)) * 3 + 1
    grouped = BatchNorm(4, num_groups=2, momentum=0.9, rngs=nnx.Rngs(0))
    whole = nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    halves = [nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0)) for _ in range(2)]
    y = grouped(x)
    expected = jnp.concatenate([bn(x[4 * i:4 * (i + 1)]) for i, bn in enumerate(halves)])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, whole(x), atol=1e-3)
    # The running averages move towards the whole batch's statistics, the variance
    # included (from the group moments, not the mean of the group variances).
    for name in ("mean", "var"):
        np.testing.assert_allclose(getattr(grouped, name)[...], getattr(whole, name)[...],
                                   rtol=1e-5)
    mean_of_group_vars = (halves[0].var[...] + halves[1].var[...]) / 2
    assert not np.allclose(grouped.var[...], mean_of_group_vars, rtol=1e-3)
    grouped.eval(), whole.eval()
    whole.mean[...], whole.var[...] = grouped.mean[...], grouped.var[...]
    np.testing.assert_allclose(grouped(x), whole(x), rtol=1e-6)  # eval is unchanged


def test_every_batchnorm_model_can_group_its_statistics():
    from imagenet_jax import models

    for name in ("resnet18", "vgg11_bn", "googlenet", "inception_v3"):
        model = nnx.eval_shape(lambda n=name: models.create(n, num_classes=10,
                                                            rngs=nnx.Rngs(0)))
        set_batchnorm_groups(model, 4)  # raises on a plain nnx.BatchNorm
        norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
        assert norms and all(m.num_groups == 4 for m in norms), name
    assert batchnorm_groups(0, 8) == 1 and batchnorm_groups(1, 8) == 8
    assert batchnorm_groups(4, 8) == 2


def test_default_rule_and_overrides_on_parameter_paths():
    mesh = mesh_from_shape({"data": 2, "fsdp": 4})
    params = {"conv": {"kernel": jnp.zeros((3, 3, 64, 128))}, "bn": {"scale": jnp.zeros(128)},
              "fc": {"kernel": jnp.zeros((512, 1000)), "bias": jnp.zeros(1000)},
              "head": {"kernel": jnp.zeros((512, 1001))}}
    specs = lambda rules: {  # noqa: E731
        f"{k}/{n}": s.spec for k, v in param_shardings(params, mesh, rules).items()
        for n, s in v.items()}
    default = specs(ShardingRules(fsdp_min_size=4096))
    assert default == {"conv/kernel": PartitionSpec(None, None, None, "fsdp"),
                       "bn/scale": PartitionSpec(), "fc/kernel": PartitionSpec(None, "fsdp"),
                       "fc/bias": PartitionSpec(), "head/kernel": PartitionSpec("fsdp")}
    overridden = specs(ShardingRules(fsdp_min_size=4096, overrides=(
        ("^fc/kernel$", ("fsdp",)), ("conv", ()))))
    assert overridden["fc/kernel"] == PartitionSpec("fsdp")
    assert overridden["conv/kernel"] == PartitionSpec()
    with pytest.raises(ConfigError, match="does not split into 8 equal parts"):
        specs(ShardingRules(overrides=(("head", (None, ("data", "fsdp"))),)))
    # fsdp of size 1: everything replicated, whatever the threshold.
    one = param_shardings(params, mesh_from_shape({"data": 8, "fsdp": 1}), ShardingRules(0))
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(one))
    assert isinstance(jax.tree.leaves(one)[0], NamedSharding)


@pytest.mark.parametrize("field,value,message", [
    ("mesh", {"data": 2, "model": 4}, "unknown axis 'model'; valid axes: data, fsdp"),
    ("mesh", {"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ("batchnorm_group_examples", 3, r"must be 0 \(the whole batch\) or divide batch_size=256"),
    ("mesh", {"data": 2, "fsdp": 2, "dcn_data": 3}, "12 devices; 8 are available|do not divide"),
    ("fsdp_min_size", -1, "fsdp_min_size must be a non-negative integer"),
    ("sharding_rules", (("conv", ("model",)),), "valid axes: data, fsdp"),
    ("sharding_rules", (("(", ()),), "bad regex"),
])
def test_bad_sharding_config_names_what_is_valid(field, value, message):
    config = base_config()
    if field == "mesh":
        config.mesh = type(config.mesh)(value)
    else:
        config[field] = value
    with pytest.raises(ConfigError, match=message):
        validate(config, model_names=["resnet50"], num_devices=8)


def test_mesh_resolves_minus_one_and_splits_the_batch_over_both_axes():
    config = base_config()
    config.mesh.fsdp = 4
    assert mesh_shape(config, 8) == {"data": 2, "fsdp": 4}
    mesh = mesh_from_shape({"data": 2, "fsdp": 4})
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    config.batch_size = 12
    with pytest.raises(ConfigError, match="not divisible by the number of devices"):
        validate(config, model_names=["resnet50"], num_devices=8)


def test_hlo_reading_counts_async_collectives_once_and_sizes_tuples():
    text = """HloModule m

ENTRY %main (p: f32[8,4]) -> f32[4] {
  %p = f32[8,4]{1,0} parameter(0)
  %ars = (f32[8,4]{1,0}, bf16[3]{0}) all-reduce-start(f32[8,4]{1,0} %p), to_apply=%add
  %ard = f32[8,4]{1,0} all-reduce-done((f32[8,4]{1,0}, bf16[3]{0}) %ars)
  ROOT %ag = pred[5]{0} all-gather(f32[8,4]{1,0} %ard), dimensions={0}
}
"""
    found = hlo.collectives(text)
    assert {k: [i.name for i in v] for k, v in found.items()} == {
        "all-reduce": ["ars"], "all-gather": ["ag"]}
    assert hlo.nbytes(found["all-reduce"][0].shape) == 8 * 4 * 4 + 3 * 2
    assert hlo.arrays(found["all-gather"][0].shape) == [("pred", (5,))]
    gather_start = hlo.Instruction("g", "(f32[2,4]{1,0}, f32[16,4]{1,0})", "all-gather-start", "")
    assert hlo.result_arrays(gather_start) == [("f32", (16, 4))]  # the operand is not gathered
    assert hlo.nbytes("(f8e4m3fn[4,2]{1,0}, s4[3]{0})") == 8 + 2
    assert [i.opcode for i in hlo.computations(text)["ENTRY"]][0] == "parameter"
