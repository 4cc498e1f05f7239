"""Tests for twophase.objectives: as_value_and_grad and the chunked full_batch."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twophase.objectives import as_value_and_grad, full_batch

ROOT = Path(__file__).resolve().parents[1]
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-6), jnp.float64: dict(rtol=1e-12, atol=1e-12)}


def make_data(n, features=5, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, features)), dtype)
    y = jnp.asarray(rng.normal(size=(n,)), dtype)
    return {"x": x, "y": y}


def make_params(features=5, hidden=7, dtype=jnp.float64, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(size=(features, hidden)), dtype),
        "b1": jnp.asarray(rng.normal(size=(hidden,)), dtype),
        "w2": jnp.asarray(rng.normal(size=(hidden,)), dtype),
    }


def mlp_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def linear_loss(w, batch):
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


def assert_tree_close(a, b, **tol):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tol), a, b)


# --- as_value_and_grad ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2,), (1, 1), (3, 4)])
def test_as_value_and_grad_rejects_non_scalar(shape):
    with pytest.raises(TypeError, match="`value_fn` must return a scalar"):
        as_value_and_grad(lambda p: jnp.zeros(shape) + p, jnp.ones(()))


def test_as_value_and_grad_rejects_integer_and_non_callable():
    with pytest.raises(TypeError, match="real floating"):
        as_value_and_grad(lambda p: jnp.sum(p).astype(jnp.int32), jnp.ones(3))
    with pytest.raises(TypeError, match="callable"):
        as_value_and_grad(3.0, jnp.ones(3))


def test_as_value_and_grad_accepts_shape_one():
    v, g = as_value_and_grad(lambda p: jnp.sum(p**2, keepdims=True), jnp.ones(3))(jnp.ones(3))
    assert v.shape == ()
    np.testing.assert_allclose(g, 2.0 * np.ones(3))


# --- full_batch: values and gradients --------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("batch_size", [None, 1, 7, 10, 50, 103, 200])
@pytest.mark.parametrize("loss", [linear_loss, mlp_loss], ids=["linear", "mlp"])
def test_full_batch_matches_direct_mean_and_gradient(loss, batch_size, dtype):
    data = make_data(103, dtype=dtype)
    params = make_params(dtype=dtype)
    if loss is linear_loss:
        params = params["w1"][:, 0]
    value_fn = full_batch(loss, data, batch_size=batch_size)

    value, grad = jax.value_and_grad(value_fn)(params)
    want_value, want_grad = jax.value_and_grad(loss)(params, data)
    assert value.shape == () and value.dtype == dtype
    np.testing.assert_allclose(value, want_value, **TOL[dtype])
    assert_tree_close(grad, want_grad, **TOL[dtype])


def test_full_batch_remainder_is_weighted_by_its_size():
    # Per-example "loss" = example index: any mis-weighting of the 3 leftover examples shows.
    n = 103
    data = jnp.arange(n, dtype=jnp.float64)
    value_fn = full_batch(lambda p, b: p * jnp.mean(b), data, batch_size=10)
    np.testing.assert_allclose(value_fn(1.0), (n - 1) / 2, rtol=1e-14)


@pytest.mark.parametrize(
    "param_dtype, loss_dtype",
    [
        (jnp.bfloat16, jnp.bfloat16),
        (jnp.float32, jnp.bfloat16),
        (jnp.float16, jnp.float16),
    ],
    ids=["bf16-params", "f32-params-bf16-loss", "f16-params"],
)
def test_full_batch_low_precision_accumulates_in_float32(param_dtype, loss_dtype):
    # 1024 chunks of 8: summed in bfloat16/float16 the mean, the gradient (accumulated in
    # the params' dtype by the scan's reverse pass) and the jvp drift far beyond rounding.
    n, batch_size = 8192, 8
    rng = np.random.default_rng(0)
    data = {
        "x": jnp.asarray(rng.uniform(0.5, 1.5, size=(n, 3)), loss_dtype),
        "y": jnp.asarray(rng.uniform(0.0, 0.5, size=(n,)), loss_dtype),
    }
    w = jnp.asarray([0.5, 1.0, 1.5], param_dtype)

    def loss(w, batch):
        return jnp.mean((batch["x"] @ w.astype(loss_dtype) - batch["y"]) ** 2)

    # Exact float64 mean and gradient of the (already rounded) inputs.
    x, y, w64 = (np.asarray(a, np.float64) for a in (data["x"], data["y"], w))
    residual = x @ w64 - y
    want_value, want_grad = np.mean(residual**2), 2.0 * x.T @ residual / n

    value_fn = full_batch(loss, data, batch_size=batch_size)
    value, grad = jax.value_and_grad(value_fn)(w)
    _, dv = jax.jvp(value_fn, (w,), (jnp.ones_like(w),))
    assert value.dtype == loss_dtype and grad.dtype == param_dtype
    tol = dict(rtol=2 * float(jnp.finfo(loss_dtype).eps))
    np.testing.assert_allclose(np.float64(value), want_value, **tol)
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, **tol)
    np.testing.assert_allclose(np.float64(dv), want_grad.sum(), **tol)


def test_full_batch_jit_and_forward_mode():
    data, params = make_data(64), make_params()
    value_fn = full_batch(mlp_loss, data, batch_size=12)
    want = mlp_loss(params, data)
    np.testing.assert_allclose(jax.jit(value_fn)(params), want, rtol=1e-12)
    v, g = jax.jit(jax.value_and_grad(value_fn))(params)
    np.testing.assert_allclose(v, want, rtol=1e-12)
    assert_tree_close(g, jax.grad(mlp_loss)(params, data), rtol=1e-12, atol=1e-12)
    # Forward mode (directional derivatives, e.g. for line searches) also works.
    tangent = jax.tree.map(jnp.ones_like, params)
    _, dv = jax.jvp(value_fn, (params,), (tangent,))
    _, want_dv = jax.jvp(lambda p: mlp_loss(p, data), (params,), (tangent,))
    np.testing.assert_allclose(dv, want_dv, rtol=1e-12)


def test_full_batch_data_as_jit_argument_and_nested_pytree():
    data = {"inputs": (make_data(40)["x"],), "targets": make_data(40)["y"]}
    params = make_params()

    def loss(p, b):
        return mlp_loss(p, {"x": b["inputs"][0], "y": b["targets"]})

    @jax.jit
    def vg(p, d):
        return jax.value_and_grad(full_batch(loss, d, batch_size=16))(p)

    v, g = vg(params, data)
    np.testing.assert_allclose(v, loss(params, data), rtol=1e-12)
    assert_tree_close(g, jax.grad(loss)(params, data), rtol=1e-12, atol=1e-12)


def test_full_batch_chunks_never_exceed_batch_size():
    seen = []

    def loss(p, b):
        seen.append(b.shape[0])
        return p * jnp.mean(b)

    full_batch(loss, jnp.ones(103), batch_size=10)(1.0)
    assert max(seen) <= 10 and 3 in seen


@pytest.mark.slow
@given(n=st.integers(1, 60), batch_size=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_full_batch_property_equals_direct_mean(n, batch_size, seed):
    data, params = make_data(n, features=3, seed=seed), make_params(features=3, hidden=4)
    value_fn = full_batch(mlp_loss, data, batch_size=batch_size)
    v, g = jax.value_and_grad(value_fn)(params)
    want_v, want_g = jax.value_and_grad(mlp_loss)(params, data)
    np.testing.assert_allclose(v, want_v, rtol=1e-12)
    assert_tree_close(g, want_g, rtol=1e-10, atol=1e-12)


# --- full_batch: errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"x": jnp.ones((5, 2)), "y": jnp.ones((4,))},
        {},
        (),
        None,
        {"x": jnp.ones((0, 2)), "y": jnp.ones((0,))},
        jnp.ones(()),
    ],
    ids=["ragged", "empty-dict", "empty-tuple", "none", "zero-examples", "scalar-leaf"],
)
def test_full_batch_rejects_bad_data(data):
    with pytest.raises(ValueError, match="`data`"):
        full_batch(linear_loss, data)


@pytest.mark.parametrize("batch_size", [0, -3, 2.0, 2.5, "8", True, np.float32(4)])
def test_full_batch_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="`batch_size`"):
        full_batch(linear_loss, make_data(10), batch_size=batch_size)


def test_full_batch_accepts_numpy_int_batch_size():
    data = make_data(10)
    value_fn = full_batch(linear_loss, data, batch_size=np.int64(3))
    w = jnp.ones(5, jnp.float64)
    np.testing.assert_allclose(value_fn(w), linear_loss(w, data), rtol=1e-12)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_full_batch_rejects_non_scalar_loss(batch_size):
    value_fn = full_batch(
        lambda w, b: (b["x"] @ w - b["y"]) ** 2, make_data(10), batch_size=batch_size
    )
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar"):
        value_fn(jnp.ones(5, jnp.float64))
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar"):
        jax.jit(jax.grad(value_fn))(jnp.ones(5, jnp.float64))


def test_full_batch_rejects_integer_loss():
    value_fn = full_batch(lambda w, b: jnp.sum(b).astype(jnp.int32), jnp.ones(6), batch_size=4)
    with pytest.raises(TypeError, match="real floating"):
        value_fn(1.0)


# --- full_batch: sharded data ------------------------------------------------------------------

SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from twophase.objectives import full_batch

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    rng = np.random.default_rng(0)
    n = 104  # 13 examples per device
    data = {
        "x": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(n,)), jnp.float32),
    }
    params = {
        "w1": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
    }

    def loss(p, b):
        return jnp.mean((jnp.tanh(b["x"] @ p["w1"]) @ p["w2"] - b["y"]) ** 2)

    sharded = jax.device_put(data, sharding)
    assert len(sharded["x"].sharding.device_set) == 8
    want_v, want_g = jax.value_and_grad(loss)(params, data)
    # 16 is a multiple of 8 (6 chunks + 8 left over); 10 is not (10 chunks + 4 left over).
    for batch_size in [None, 16, 10]:
        def vg(p, d):
            return jax.value_and_grad(full_batch(loss, d, batch_size=batch_size))(p)

        v0, g0 = jax.jit(vg)(params, data)
        compiled = jax.jit(vg).lower(params, sharded).compile()
        v1, g1 = compiled(params, sharded)
        for v, g in [(v0, g0), (v1, g1)]:
            np.testing.assert_allclose(v, want_v, rtol=1e-5)
            for k in g:
                np.testing.assert_allclose(g[k], want_g[k], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v1, v0, rtol=1e-5)
        if batch_size is None or batch_size % 8 == 0:
            # Every chunk spans all 8 devices: no data moves between devices.
            hlo = compiled.as_text()
            assert "all-gather" not in hlo and "collective-permute" not in hlo, batch_size
    # Eager (unjitted) use on sharded data.
    v, g = jax.value_and_grad(full_batch(loss, sharded, batch_size=24))(params)
    np.testing.assert_allclose(v, want_v, rtol=1e-5)
    print("SHARDED-OK")
    """
)


def test_full_batch_sharded_matches_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SHARDED-OK" in proc.stdout
