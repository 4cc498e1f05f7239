"""Tests for twophase.second_phase: the contract by field name and the `evaluating` adapter."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp
from twophase.policy import SafeResortConfig
from twophase.second_phase import contract as sp

KEY = jax.random.split(jax.random.PRNGKey(3), 3)
A = jax.random.normal(KEY[0], (64, 6))
B = A @ jax.random.normal(KEY[1], (6,)) + 0.5


def least_squares(p):
    return 0.5 * jnp.mean((A.astype(p["w"].dtype) @ p["w"] + p["b"] - B) ** 2)


def test_fields_are_read_by_name():
    cg_state = tp.nonlinear_cg().init({"w": jnp.zeros(3)})
    assert sp.evaluates_itself(cg_state)
    assert not sp.evaluates_itself(optax.lbfgs().init({"w": jnp.zeros(3)}))
    assert int(sp.failures(cg_state)) == 0 and int(sp.hessian_vector_products(cg_state)) == 0
    assert np.isinf(float(sp.current_value(cg_state)))


def test_evaluating_lbfgs_takes_optax_lbfgs_steps_and_counts_its_evaluations():
    params = {"w": jnp.zeros(6, jnp.float64), "b": jnp.zeros((), jnp.float64)}
    calls = {"n": 0}

    def counted(p):
        jax.debug.callback(lambda: calls.__setitem__("n", calls["n"] + 1))
        return least_squares(p)

    wrapped = tp.evaluating(optax.lbfgs())
    ref = optax.lbfgs()
    vg = optax.value_and_grad_from_state(least_squares)
    wrapped_step = jax.jit(lambda p, s: wrapped.update(None, s, p, value_fn=counted))

    @jax.jit
    def ref_step(q, r):
        value, grad = vg(q, state=r)
        return ref.update(grad, r, q, value=value, grad=grad, value_fn=least_squares)

    p, s = params, wrapped.init(params)
    q, r = params, ref.init(params)
    for _ in range(6):
        u, s = wrapped_step(p, s)
        v, r = ref_step(q, r)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), p, q)
    jax.effects_barrier()
    assert int(s.value_and_grad_evals) == calls["n"]
    np.testing.assert_allclose(float(s.value), float(least_squares(p)), rtol=1e-12)


def test_float16_parameters_in_the_lbfgs_phase_never_become_nan():
    # Issue: NaN reached float16 parameters after the loss reached ~1e-8.
    params = {"w": jnp.zeros(6, jnp.float16), "b": jnp.zeros((), jnp.float16)}
    full = lambda p: least_squares(jax.tree.map(lambda x: x.astype(jnp.float32), p))
    opt = tp.adam_lbfgs(0.05, policy=tp.switch_at(5))
    step = jax.jit(lambda p, s: opt.update(jax.grad(full)(p), s, p, value=full(p), value_fn=full))
    p, s = params, opt.init(params)
    losses = []
    for _ in range(40):
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
        assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(p))
        losses.append(float(full(p)))
    assert losses[-1] < 1e-3 * losses[0]


class _NaNState(NamedTuple):
    value: jax.Array
    value_and_grad_evals: jax.Array
    consecutive_failures: jax.Array


def nan_second_phase():
    """A second phase (by the contract's fields) whose every update is NaN."""

    def init(params):
        return _NaNState(jnp.asarray(jnp.inf), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, value_fn, **extra):
        nan = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
        return nan, state._replace(
            value=value_fn(params), value_and_grad_evals=state.value_and_grad_evals + 1
        )

    return optax.GradientTransformationExtraArgs(init, update)


@pytest.mark.parametrize("policy", ["detector", "safe_resort"])
def test_a_nonfinite_second_phase_update_never_reaches_the_parameters(policy):
    params = {"w": jnp.zeros(6), "b": jnp.zeros(())}
    decide = (
        tp.switch_at(2)
        if policy == "detector"
        else tp.safe_resort(steps_per_epoch=1, config=SafeResortConfig(explore=0.9))
    )
    opt = tp.two_phase(optax.adam(1e-2), nan_second_phase(), decide)
    step = jax.jit(
        lambda p, s: opt.update(
            jax.grad(least_squares)(p), s, p, value=least_squares(p), value_fn=least_squares
        )
    )
    p, s = params, opt.init(params)
    for _ in range(12):
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
    assert int(s.second_phase_nonfinite) >= 1
    # A custom second phase plugs in by its fields: its evaluations are counted.
    assert int(tp.info(s).value_and_grad_evals) == int(s.second_phase_evals) >= 1
    if policy == "safe_resort":  # the failed trial returns to Adam
        assert int(tp.info(s).fallbacks) >= 1


def test_evaluating_rejects_a_non_transformation_and_needs_value_fn():
    with pytest.raises(ValueError, match="inner"):
        tp.evaluating(lambda x: x)
    opt = tp.evaluating(optax.lbfgs())
    params = {"w": jnp.zeros(3)}
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(None, opt.init(params), params)
