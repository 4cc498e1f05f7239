"""Tests for twophase.experiments.models: model zoo and MSE loss of Hrycej et al. (KDIR 2025)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from twophase.experiments.models import (
    MODEL_NAMES,
    accuracy,
    conv3x3_im2col,
    count_params,
    cross_entropy_loss,
    default_patch_size,
    make_model,
    mse_loss,
    overdetermination,
)

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]
VITS = ("vit-mlp", "vit-nomlp", "vit-nomlp-wkewq", "vit-nomlp-wkewq-wvwo")


def build(name, image_shape=(8, 8, 1), num_classes=10, seed=0, **kwargs):
    return make_model(
        name, image_shape=image_shape, num_classes=num_classes, rngs=nnx.Rngs(seed), **kwargs
    )


def params_of(name, image_shape=(8, 8, 1), num_classes=10, **kwargs):
    """Parameter count from an abstract model (``nnx.eval_shape``: shapes only, no compute)."""
    model = nnx.eval_shape(lambda: build(name, image_shape, num_classes, **kwargs))
    return count_params(model)


@nnx.jit
def forward(model, x):
    """One compiled forward pass (much faster than op-by-op dispatch on CPU)."""
    return model(x)


def images(n, image_shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, *image_shape), dtype=jnp.float32)


@pytest.mark.parametrize("image_shape", SHAPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_and_outputs_finite_logits(name, image_shape):
    model = build(name, image_shape, num_classes=7)
    logits = forward(model, images(3, image_shape))
    assert logits.shape == (3, 7)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("image_shape", SHAPES)
def test_parameter_counts_ordered_as_the_ablations(image_shape):
    p = {name: params_of(name, image_shape) for name in VITS}
    width = 64
    linear = width * width + width  # one width x width projection with bias
    mlp = 2 * width + (width * 256 + 256) + (256 * width + width)  # layer norm + two layers
    assert p["vit-mlp"] - p["vit-nomlp"] == 3 * mlp
    assert p["vit-nomlp"] - p["vit-nomlp-wkewq"] == 3 * linear  # W_k dropped per layer
    assert p["vit-nomlp-wkewq"] - p["vit-nomlp-wkewq-wvwo"] == 3 * 2 * linear  # W_v, W_o


def test_parameter_counts_28x28():
    counts = {name: params_of(name, (28, 28, 1)) for name in MODEL_NAMES}
    assert counts == {
        "vit-mlp": 154954,
        "vit-nomlp": 55306,
        "vit-nomlp-wkewq": 42826,
        "vit-nomlp-wkewq-wvwo": 17866,
        # 4 convs 3x3 (32, 32, 64, 64) + dense from 7x7x64
        "vgg5-max-relu": 320 + 9248 + 18496 + 36928 + 7 * 7 * 64 * 10 + 10,
        "mlp": 784 * 64 + 64 + 64 * 10 + 10,
    }


def test_architecture_keywords():
    small = build("vit-mlp", num_layers=1, num_heads=2, width=16, mlp_dim=32)
    assert count_params(small) < params_of("vit-mlp")
    assert forward(small, images(2, (8, 8, 1))).shape == (2, 10)
    deep = params_of("mlp", hidden=(32, 16), activation="relu")
    assert deep == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    vgg = params_of("vgg5-max-relu", blocks=((8,), (8,)))
    assert vgg == (9 * 8 + 8) + (9 * 64 + 8) + 2 * 2 * 8 * 10 + 10


def test_vgg_pooling_adapts_to_tiny_inputs():
    # 8x8 -> 4x4 -> 2x2; a 2x2 map is not pooled further.
    vgg = build("vgg5-max-relu", blocks=((4,), (4,), (4,)))
    assert vgg.pool_after == (True, True, False)
    assert forward(vgg, images(2, (8, 8, 1))).shape == (2, 10)


@pytest.mark.parametrize("image_shape", [(8, 8, 1), (28, 28, 3)])
def test_vgg_im2col_convolution_equals_nnx_conv(image_shape):
    """The CPU path (im2col + matmul) computes the same function and gradient as
    nnx.Conv with the same parameters."""
    model = build("vgg5-max-relu", image_shape=image_shape, conv_impl="lax")
    x = images(4, image_shape)
    graphdef, params = nnx.split(model)

    def loss(params, impl):
        model = nnx.merge(graphdef, params)
        model.conv_impl = impl
        return jnp.sum(jnp.sin(model(x)))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value_lax, grad_lax = value_and_grad(params, "lax")
    value_im2col, grad_im2col = value_and_grad(params, "im2col")
    np.testing.assert_allclose(value_im2col, value_lax, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad_im2col), jax.tree.leaves(grad_lax), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_conv3x3_im2col_against_lax_conv():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 7, 4))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 6))
    bias = jnp.arange(6.0)
    expected = (
        jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + bias
    )
    np.testing.assert_allclose(conv3x3_im2col(x, kernel, bias), expected, rtol=1e-5, atol=1e-5)


def test_vgg_conv_impl_default_and_bad_value():
    expected = "im2col" if jax.default_backend() == "cpu" else "lax"
    assert build("vgg5-max-relu").conv_impl == expected
    with pytest.raises(ValueError, match="conv_impl"):
        build("vgg5-max-relu", conv_impl="fft")


@pytest.mark.parametrize(("side", "patch"), [(8, 2), (28, 4), (32, 4), (16, 2)])
def test_default_patch_size(side, patch):
    assert default_patch_size(side, side) == patch


def test_patch_size_errors():
    with pytest.raises(ValueError, match="patch_size"):
        default_patch_size(17, 19)
    with pytest.raises(ValueError, match="patch_size"):
        build("vit-nomlp", (8, 8, 1), patch_size=3)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError) as err:
        build("resnet50")
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match="tanh"):
        build("mlp", activation="swish")


def test_overdetermination():
    assert overdetermination(60000, 10, 154954) == pytest.approx(60000 * 10 / 154954)
    assert overdetermination(100, 10, 1000) == 1.0


def test_mse_loss_normalisation():
    logits = jnp.zeros((2, 4), jnp.float32)
    # each example misses its target by 1 in exactly one of its 4 outputs
    assert float(mse_loss(logits, jnp.array([0, 3]), 4)) == pytest.approx(1 / 4)
    perfect = jnp.eye(4, dtype=jnp.float32)[jnp.array([1, 2])]
    assert float(mse_loss(perfect, jnp.array([1, 2]), 4)) == 0.0
    assert mse_loss(logits, jnp.array([0, 3]), 4).dtype == jnp.float32


def test_cross_entropy_and_accuracy():
    logits = jnp.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    labels = jnp.array([0, 1, 1])
    assert float(accuracy(logits, labels)) == pytest.approx(2 / 3)
    expected = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 2)).mean()
    assert float(cross_entropy_loss(logits, labels)) == pytest.approx(float(expected))


@pytest.mark.slow  # 5-9 s a model
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_adam_steps_lower_mse(name):
    x = images(16, (8, 8, 1), seed=1)
    y = jnp.arange(16) % 10
    model = build(name)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def loss_fn(m):
        return mse_loss(m(x), y, 10)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    first = float(step(model, optimizer))
    for _ in range(9):
        step(model, optimizer)
    last = float(loss_fn(model))
    assert np.isfinite(last) and last < first
