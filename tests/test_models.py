import jax.numpy as jnp
import pytest
from flax import nnx

from imagenet_jax import models
from imagenet_jax.models import summary

# torchvision's parameter counts at 1000 classes.
TORCHVISION_PARAMS = {
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
    model = models.create("resnet_tiny", num_classes=7, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model.eval()
    logits = model(jnp.zeros((2, 16, 16, 3), jnp.bfloat16))
    assert logits.shape == (2, 7)
    assert logits.dtype == jnp.bfloat16
    kernel = model.stem[0].conv.kernel
    assert kernel.value.dtype == jnp.float32  # parameters stay float32
