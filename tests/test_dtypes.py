"""Issue 28, faults 1 and 2: every dtype optax.adam accepts works in phase 0 as
optax.adam does; second phases see complex parameters as real pairs and leave
integer leaves alone; float16 phase 0 never produces NaN from finite inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp

DTYPES = {
    "float16": (jnp.float16, 5e-3),
    "bfloat16": (jnp.bfloat16, 1e-2),
    "float32": (jnp.float32, 1e-6),
    "float64": (jnp.float64, 1e-12),
    "complex64": (jnp.complex64, 1e-6),
}


def _gradients(dtype, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = rng.normal(size=(5,))
        if jnp.issubdtype(dtype, jnp.complexfloating):
            g = g + 1j * rng.normal(size=(5,))
        out.append(jnp.asarray(g, dtype))
    return out


@pytest.mark.parametrize("name", DTYPES)
def test_phase0_matches_optax_adam_for_every_dtype(name):
    dtype, rtol = DTYPES[name]
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        pytest.skip("float64 needs jax_enable_x64")
    params = jnp.ones((5,), dtype)
    opt = tp.adam_cg(1e-2, policy=tp.switch_at(100))
    ref = optax.adam(1e-2)
    state, ref_state = opt.init(params), ref.init(params)
    for g in _gradients(dtype, 4):
        u, state = opt.update(g, state, params, value=jnp.float32(1.0), value_fn=_abs2)
        r, ref_state = ref.update(g, ref_state, params)
        assert u.dtype == r.dtype == params.dtype
        np.testing.assert_allclose(
            np.asarray(u, np.complex128), np.asarray(r, np.complex128), rtol=rtol, atol=1e-7
        )
    assert int(tp.info(state).skipped_steps) == 0


def _abs2(p):
    return sum(jnp.sum(jnp.abs(x.astype(jnp.complex64)) ** 2) for x in jax.tree.leaves(p)).real


def test_integer_leaf_is_left_alone_and_float_leaves_match_optax():
    params = {"w": jnp.ones((3,), jnp.float32), "count": jnp.asarray(7, jnp.int32)}
    opt = tp.adam_cg(1e-2, policy=tp.switch_at(3))
    ref = optax.adam(1e-2)
    state, ref_state = opt.init(params), ref.init(params)

    def f(p):
        return jnp.sum((p["w"] - 2.0) ** 2) + 0.0 * p["count"]

    step = jax.jit(
        lambda p, s, g: opt.update(g, s, p, value=f(p), value_fn=f),
    )
    p = params
    for k in range(6):
        g = jax.grad(f, allow_int=True)(p)  # float0 for the integer leaf
        u, state = step(p, state, g)
        assert u["count"].dtype == jnp.int32 and int(u["count"]) == 0
        if k < 3:
            r, ref_state = ref.update({"w": g["w"], "count": jnp.zeros([], jnp.int32)}, ref_state)
            np.testing.assert_allclose(u["w"], r["w"], rtol=1e-6)
        p = optax.apply_updates(p, u)
    assert int(tp.info(state).phase) == 1 and int(p["count"]) == 7
    assert float(f(p)) < 1e-6  # CG on the float leaf


def test_complex_parameters_run_cg_on_real_and_imaginary_parts():
    target = jnp.asarray([1 + 2j, -3 + 0.5j], jnp.complex64)

    def f(z):
        return jnp.sum(jnp.abs(z - target) ** 2)

    opt = tp.adam_cg(1e-2, policy=tp.switch_at(2))
    z = jnp.zeros(2, jnp.complex64)
    state = opt.init(z)
    step = jax.jit(lambda z, s: opt.update(jnp.conj(jax.grad(f)(z)), s, z, value=f(z), value_fn=f))
    for _ in range(6):
        u, state = step(z, state)
        z = optax.apply_updates(z, u)
    assert int(tp.info(state).phase) == 1
    np.testing.assert_allclose(np.asarray(z), np.asarray(target), atol=1e-5)


def test_handover_with_complex_parameters_is_rejected_at_init_naming_the_leaf():
    opt = tp.adam_cg(policy=tp.switch_at(2), precondition=True)
    with pytest.raises(ValueError, match=r"\['z'\].*complex64"):
        opt.init({"z": jnp.zeros(2, jnp.complex64), "w": jnp.zeros(2)})


@pytest.mark.parametrize("make", [tp.adam_cg, tp.adam_lbfgs, tp.adam_newton_cg])
def test_float16_zero_gradient_leaf_gives_a_finite_zero_step(make):
    params = {"a": jnp.ones(4, jnp.float16), "b": jnp.ones(4, jnp.float16)}
    opt = make(1e-3, policy=tp.switch_at(100))
    state = opt.init(params)
    grads = {"a": jnp.full(4, 0.5, jnp.float16), "b": jnp.zeros(4, jnp.float16)}
    for _ in range(3):
        u, state = opt.update(grads, state, params, value=jnp.float16(1.0), value_fn=_abs2)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
        chex.assert_trees_all_equal(u["b"], jnp.zeros(4, jnp.float16))
        params = optax.apply_updates(params, u)
    assert int(tp.info(state).skipped_steps) == 0
    assert float(params["a"][0]) < 1.0  # the other leaf moved


def test_float16_large_gradient_square_does_not_overflow():
    params = jnp.ones(3, jnp.float16)
    opt = tp.adam_cg(1e-3, policy=tp.switch_at(100))
    g = jnp.full(3, 1000.0, jnp.float16)  # 1000**2 overflows float16
    u, _ = opt.update(g, opt.init(params), params, value=jnp.float16(1.0), value_fn=_abs2)
    np.testing.assert_allclose(np.asarray(u, np.float32), -1e-3, rtol=1e-2)


def test_nonfinite_update_from_finite_inputs_is_zeroed_and_counted():
    """A learning rate that overflows the step (a schedule gone wrong): the update
    is replaced by zeros and counted; the parameters never see inf."""
    params = jnp.ones(3, jnp.float16)
    opt = tp.adam_cg(lambda count: 1e6, policy=tp.switch_at(100))
    g = jnp.ones(3, jnp.float16)
    u, state = opt.update(g, opt.init(params), params, value=jnp.float16(1.0), value_fn=_abs2)
    chex.assert_trees_all_equal(u, jnp.zeros(3, jnp.float16))
    assert int(tp.info(state).skipped_steps) == 1
