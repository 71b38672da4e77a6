import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagenet_jax import models
from imagenet_jax.models import summary

# torchvision's parameter counts at 1000 classes.
TORCHVISION_PARAMS = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
    "googlenet": 6_624_904,           # without its auxiliary classifiers
    "inception_v3": 27_161_264,       # with its auxiliary head
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "resnext50_32x4d": 25_028_904,
}


@pytest.mark.parametrize("name,expected", sorted(TORCHVISION_PARAMS.items()))
def test_param_counts_match_torchvision(name, expected):
    assert summary.describe(name)["params"] == expected


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'.*resnet50"):
        models.create("resnet5", num_classes=10, rngs=nnx.Rngs(0))


def test_forward_shape_and_dtype():
    def forward(images):
        model = models.create("resnet_tiny", num_classes=7, dtype=jnp.bfloat16,
                              rngs=nnx.Rngs(0))
        model.eval()
        return model(images), model.stem[0].conv.kernel.value

    # Traced, not run (op by op it took 13 s here): shapes and dtypes are what is checked.
    logits, kernel = jax.eval_shape(forward, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.bfloat16))
    assert logits.shape == (2, 7)
    assert logits.dtype == jnp.bfloat16
    assert kernel.dtype == jnp.float32  # parameters stay float32


# Published forward multiply-adds of one image at the native resolution (torchvision's docs).
PUBLISHED_GMACS = {
    "alexnet": 0.714, "vgg16": 15.47, "googlenet": 1.498, "inception_v3": 5.713,
    "resnet18": 1.814, "resnet34": 3.664, "resnet50": 4.089, "resnet101": 7.801,
    "resnet152": 11.514,
}


@pytest.mark.parametrize("name,expected", sorted(PUBLISHED_GMACS.items()))
def test_gmacs_from_the_xla_computation_match_published(name, expected):
    assert summary.describe(name)["gmacs"] == pytest.approx(expected, rel=0.03)


def test_stablehlo_macs_follow_calls_into_functions():
    """A convolution inside a function called twice counts twice."""
    import jax

    kernel = jnp.ones((3, 3, 4, 8))

    @jax.jit
    def conv(x):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def twice(x):
        return conv(x) + conv(x)

    text = jax.jit(twice).lower(jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)).as_text()
    assert summary.stablehlo_macs(text) == 2 * (8 * 8 * 8) * (3 * 3 * 4)


@pytest.mark.parametrize("unbiased", [False, True])
def test_batchnorm_running_variance_biased_or_unbiased_as_torch(unbiased):
    from imagenet_jax.models.layers import BatchNorm, set_batchnorm_groups

    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 3, 3, 5)).astype(np.float32)
    norm = set_batchnorm_groups(BatchNorm(5, momentum=0.9, rngs=nnx.Rngs(0)), 1, unbiased)
    y = norm(jnp.asarray(x))
    n = 4 * 3 * 3
    variance = x.reshape(n, 5).var(axis=0, ddof=1 if unbiased else 0)
    np.testing.assert_allclose(norm.var[...], 0.9 + 0.1 * variance, rtol=1e-5)
    np.testing.assert_allclose(norm.mean[...], 0.1 * x.reshape(n, 5).mean(axis=0), rtol=1e-5)
    # The normalisation uses the batch's own (biased) variance either way, as torch does.
    np.testing.assert_allclose(np.asarray(y).reshape(n, 5).std(axis=0), 1.0, rtol=1e-3)


def test_an_option_the_model_does_not_take_is_named_with_those_it_does():
    with pytest.raises(ValueError, match="'googlenet' takes no option 'init_weights'; its "
                                         "options: aux_logits, transform_input, dropout"):
        models.create("googlenet", num_classes=10, rngs=nnx.Rngs(0), init_weights=True)
    assert "zero_init_residual" in models.options_of("resnet50")
    assert "base_width" not in models.options_of("wide_resnet50_2")  # fixed by the variant
