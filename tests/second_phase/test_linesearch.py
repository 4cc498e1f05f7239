"""Tests for twophase.second_phase.linesearch on one-dimensional functions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp
from tests import problems


def along(f, x0=0.0, d=1.0):
    """``evaluate`` for ``phi(step) = f(x0 + step d)`` with a scalar 'pytree'."""

    def evaluate(step):
        x = x0 + step * d
        v, g = jax.value_and_grad(f)(x)
        return v, g, g * d

    v0, g0 = jax.value_and_grad(f)(jnp.asarray(x0, jnp.float64))
    return evaluate, v0, g0, g0 * d


def quartic(x):
    return (x - 3.0) ** 4 + 0.5 * (x - 3.0) ** 2


@pytest.mark.parametrize("initial_step", [1e-3, 1.0, 2.9, 50.0])
def test_wolfe_conditions_hold_at_accepted_point(initial_step):
    ls = tp.wolfe_linesearch(c1=1e-4, c2=0.1)
    evaluate, v0, g0, s0 = along(quartic)
    r = jax.jit(ls.search, static_argnums=0)(evaluate, v0, g0, s0, jnp.asarray(initial_step))
    assert not bool(r.failed) and bool(r.converged)
    assert float(r.value) <= float(v0) + 1e-4 * float(r.step) * float(s0)
    assert abs(float(r.slope)) <= 0.1 * abs(float(s0))
    v, g = jax.value_and_grad(quartic)(r.step)
    assert float(r.value) == pytest.approx(float(v))
    assert float(r.grad) == pytest.approx(float(g))


def test_wolfe_is_exact_on_a_quadratic_in_two_evaluations():
    ls = tp.wolfe_linesearch(c1=1e-8, c2=1e-6)
    evaluate, v0, g0, s0 = along(lambda x: 2.0 * (x - 1.5) ** 2)
    r = ls.search(evaluate, v0, g0, s0, jnp.asarray(0.5))
    assert float(r.step) == pytest.approx(1.5, rel=1e-10)
    assert int(r.evaluations) == 2


def test_golden_section_brackets_and_converges():
    ls = tp.golden_section_linesearch(tolerance=1e-6, max_evaluations=100)
    for initial_step in [1e-4, 1.0, 100.0]:
        evaluate, v0, g0, s0 = along(quartic)
        r = ls.search(evaluate, v0, g0, s0, jnp.asarray(initial_step))
        assert bool(r.converged)
        assert float(r.step) == pytest.approx(3.0, abs=1e-4)


@pytest.mark.parametrize("make", [tp.wolfe_linesearch, tp.golden_section_linesearch])
def test_nonfinite_region_is_avoided(make):
    f = lambda x: jnp.where(x < 1.0, (x - 0.8) ** 2, jnp.nan)
    evaluate, v0, g0, s0 = along(f)
    r = make().search(evaluate, v0, g0, s0, jnp.asarray(10.0))
    assert not bool(r.failed)
    assert 0.0 < float(r.step) < 1.0
    assert float(r.value) < float(v0)


@pytest.mark.parametrize("make", [tp.wolfe_linesearch, tp.golden_section_linesearch])
def test_failure_when_no_decrease_exists(make):
    # Not a descent direction numerically: every trial is worse.
    f = lambda x: jnp.abs(x) + 1.0
    evaluate = lambda step: (f(step) + step * 0 + 1.0, step * 0, jnp.ones_like(step))
    r = make().search(
        evaluate, jnp.asarray(1.0), jnp.asarray(0.0), jnp.asarray(-1.0), jnp.asarray(1.0)
    )
    assert bool(r.failed)
    assert float(r.step) == 0.0
    assert float(r.value) == 1.0


@pytest.mark.parametrize(
    "make,kwargs,name",
    [
        (tp.wolfe_linesearch, dict(c1=0.5, c2=0.1), "c1"),
        (tp.wolfe_linesearch, dict(c2=1.5), "c2"),
        (tp.wolfe_linesearch, dict(c1=-1.0), "c1"),
        (tp.wolfe_linesearch, dict(max_evaluations=0), "max_evaluations"),
        (tp.wolfe_linesearch, dict(max_growth=1.0), "max_growth"),
        (tp.golden_section_linesearch, dict(tolerance=0.0), "tolerance"),
        (tp.golden_section_linesearch, dict(tolerance=2.0), "tolerance"),
        (tp.golden_section_linesearch, dict(max_evaluations=2.5), "max_evaluations"),
        (tp.wolfe_linesearch, dict(c1=True), "c1"),
    ],
)
def test_bad_arguments(make, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make(**kwargs)


def test_numpy_scalar_arguments_are_accepted():
    assert isinstance(tp.wolfe_linesearch(max_evaluations=np.int64(5)), tp.LineSearch)
    assert isinstance(tp.golden_section_linesearch(max_evaluations=np.int32(5)), tp.LineSearch)
    opt = tp.nonlinear_cg(restart_every=np.int64(5), grad_tol=np.float32(1e-6))
    x = jnp.array([3.0, -1.0])
    u, _ = opt.update(x, opt.init(x), x, value_fn=lambda p: jnp.sum((p - 1.0) ** 2))
    assert float(jnp.sum((x + u - 1.0) ** 2)) < float(jnp.sum((x - 1.0) ** 2))


def test_small_c2_below_slope_rounding_still_makes_progress():
    # n=4, condition 1e4: after 4 iterations the remaining gradient (1.4e-7
    # relative) lies along the top eigenvector and the slope at the exact
    # minimiser carries rounding noise of 6e-7 |f'(0)| > c2. The search then ends
    # on its bracket's low end (converged=False) instead of failing; before, CG
    # stalled there with every later search failing.
    f, _, b = problems.spd_quadratic(4, 1e4, 2)
    opt = tp.nonlinear_cg("dai_yuan", tp.wolfe_linesearch(c1=1e-8, c2=1e-7))
    x = jnp.zeros(4)
    state = opt.init(x)
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    tol = 1e-8 * float(jnp.linalg.norm(b))
    for _ in range(12):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
        if float(tp.info(state).grad_norm) <= tol:
            break
    assert float(tp.info(state).grad_norm) <= tol
    assert int(tp.info(state).linesearch_failures) == 0


def test_wrong_gradient_still_fails_after_the_budget():
    # The low end is kept without a strict decrease only if it flattened the
    # slope tenfold; an uphill "gradient" flattens nothing, so the search fails.
    def value_and_grad(step):
        value = 1.0 + 1e-17 * step  # rounding-level increase along the direction
        return value, None, jnp.asarray(-1.0)  # claimed slope never flattens

    search = tp.wolfe_linesearch()
    result = search.search(
        lambda t: value_and_grad(t), jnp.asarray(1.0), None, jnp.asarray(-1.0), jnp.asarray(1.0)
    )
    assert bool(result.failed) and float(result.step) == 0.0
