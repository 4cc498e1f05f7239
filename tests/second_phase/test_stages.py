"""The second phases' stages called alone: common pieces, CG and Newton-CG stages,
the evaluating adapter's stages, the one field lookup."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp
from twophase import _control
from twophase.second_phase import cg, common, contract, evaluating, newton_cg

# ------------------------------------------------------------------ contract: the lookup


class _Outer(NamedTuple):
    value: jax.Array
    inner: object = None


class _Inner(NamedTuple):
    value: jax.Array


def test_the_field_lookup_finds_the_outermost_state_and_skips_dict_keys():
    params_like = {"value": jnp.ones(2)}  # a parameter named "value" is not a state field
    tree = (
        params_like,
        _Outer(jnp.asarray(1.0), _Inner(jnp.asarray(2.0))),
        _Inner(jnp.asarray(3.0)),
    )
    assert float(contract.field(tree, "value")) == 1.0
    assert [float(n.value) for n in contract.states_with_field(tree, "value")] == [1.0, 3.0]
    assert contract.field(params_like, "value") is None
    assert contract.field(tree, "missing", default=7) == 7
    replaced = contract.replace_states(tree, "value", lambda n: n._replace(value=n.value * 10))
    assert float(replaced[1].value) == 10.0 and float(replaced[1].inner.value) == 2.0
    assert float(replaced[2].value) == 30.0


# ------------------------------------------------------------------ common


def test_unit_pow2_is_an_exact_power_of_two_bringing_the_largest_entry_below_one():
    for big in (3.0e14, 1.0, 7e-13):
        tree = {"a": jnp.asarray([big, -big / 3], jnp.float32)}
        c = float(common.unit_pow2(tree))
        assert 0.5 <= big * c < 1.0
        assert np.log2(c) == int(np.log2(c))
    assert float(common.unit_pow2({"a": jnp.zeros(3)})) == 1.0
    assert float(common.unit_pow2({})) == 1.0


def test_fresh_buffers_gives_every_field_its_own_buffer():
    zero = jnp.zeros([])
    state = (zero, zero, {"w": zero})
    fresh = _control.fresh_buffers(state)
    pointers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(fresh)}
    assert len(pointers) == 3


def test_warm_step_rules_against_their_formulas():
    value, value_prev, slope, step_prev, slope_prev = 1.0, 1.5, -2.0, 0.5, -4.0
    quadratic = 1.01 * 2 * (value - value_prev) / slope
    by_slope = step_prev * slope_prev / slope
    args = (value, value_prev, slope, step_prev, slope_prev)
    assert float(common.warm_step("quadratic", *args)) == pytest.approx(quadratic)
    assert float(common.warm_step("slope", *args)) == pytest.approx(by_slope)
    assert float(common.warm_step("max", *args)) == pytest.approx(max(quadratic, by_slope))
    assert float(common.warm_step("unit", *args)) == 1.0


def test_resolve_linesearch_names_the_argument():
    assert common.resolve_linesearch("golden").name == "golden"
    with pytest.raises(ValueError, match="`linesearch`"):
        common.resolve_linesearch("zoom")


# ------------------------------------------------------------------ CG stages


def test_next_direction_is_the_beta_rule_formula():
    opts = cg.CGOptions(tp.fletcher_reeves, None, None, None, None, "slope", 0.0)
    g_prev, d_prev = jnp.asarray([1.0, -2.0]), jnp.asarray([-1.0, 2.0])
    g = jnp.asarray([0.5, 0.25])
    direction, slope, restart = cg.next_direction(opts, g, g_prev, d_prev, None, 0)
    beta = float(g @ g / (g_prev @ g_prev))
    np.testing.assert_allclose(direction, -g + beta * d_prev, rtol=1e-6)
    assert float(slope) == pytest.approx(float(g @ (-g + beta * d_prev)))
    assert not bool(restart)


def test_first_trial_step_fresh_start_is_hager_zhang():
    state = cg.init_state(jnp.zeros(2))
    params, direction = jnp.asarray([2.0, -1.0]), jnp.asarray([0.5, -4.0])
    trial = cg.first_trial_step("slope", state, params, 3.0, direction, -1.0, jnp.asarray(True))
    assert float(trial) == pytest.approx(0.01 * 2.0 / 4.0)


def test_stalled_state_counts_a_failure_and_its_evaluation_and_changes_nothing_else():
    state = cg.init_state(jnp.zeros(2))
    new = cg.stalled_state(state, jnp.asarray(1, jnp.int32))
    assert int(new.consecutive_failures) == 1 and int(new.linesearch_failures) == 1
    assert int(new.value_and_grad_evals) == 1
    chex.assert_trees_all_equal(new.grad, state.grad)
    chex.assert_trees_all_equal(new.direction, state.direction)


def test_must_recheck_after_a_failure_or_at_a_converged_cache():
    state = cg.init_state(jnp.zeros(2))._replace(grad=jnp.asarray([1.0, 0.0]))
    assert not bool(common.must_recheck(state, 0.0))
    assert bool(common.must_recheck(state, 2.0))  # the cached gradient is "converged"
    assert bool(common.must_recheck(state._replace(consecutive_failures=jnp.asarray(1)), 0.0))


def test_unchanged_tolerates_rounding_but_not_a_changed_objective():
    v = jnp.asarray(3.0, jnp.float32)
    assert bool(common.unchanged(v * (1 + 1e-6), v))
    assert not bool(common.unchanged(v * (1 + 1e-3), v))
    v64 = jnp.asarray(3.0, jnp.float64) if jax.config.jax_enable_x64 else None
    if v64 is not None:
        assert not bool(common.unchanged(v64 * (1 + 1e-9), v64))


def test_value_here_reevaluates_when_told_to_recheck():
    calls = []

    def value_grad_aux(p):
        calls.append(1)
        return jnp.sum(p**2), 2 * p, None

    state = cg.init_state(jnp.zeros(2))._replace(value=jnp.asarray(9.0), grad=jnp.ones(2))
    params = jnp.asarray([1.0, 2.0])
    value, _, _, cached, evals = common.value_here(state, value_grad_aux, params)
    assert bool(cached) and float(value) == 9.0 and int(evals) == 0
    value, grad, _, cached, evals = common.value_here(state, value_grad_aux, params, True)
    assert not bool(cached) and float(value) == 5.0 and int(evals) == 1
    chex.assert_trees_all_close(grad, 2 * params)


# ------------------------------------------------------------------ Newton-CG stages


def test_truncated_cg_solves_a_scaled_spd_system_in_float32():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    for scale in (2.0**40, 1e-12):
        h = (q * np.linspace(1, 4, 5)) @ q.T * scale
        g = rng.standard_normal(5) * scale * 100  # a gradient of 1e14 at scale 2**40
        hj = jnp.asarray(h, jnp.float32)
        tolerance = 1e-5 * float(np.linalg.norm(g))
        out = newton_cg.truncated_cg(
            lambda v, hj=hj: hj @ v, jnp.asarray(g, jnp.float32), jnp.float32(0.0), tolerance, 10
        )
        np.testing.assert_allclose(out.step, np.linalg.solve(h, -g), rtol=2e-3, atol=1e-5)
        assert not bool(out.negative_curvature) and not bool(out.nonfinite)


def test_rejected_state_restarts_the_damping():
    opt_state = tp.newton_cg(damping=1e-2).init(jnp.zeros(2))
    opts = newton_cg.NewtonOptions(*([None] * 5), 1e-2, *([None] * 9))
    bad = opt_state._replace(damping=jnp.asarray(jnp.nan, jnp.float32))
    here = (jnp.asarray(1.0), jnp.ones(2), None, jnp.asarray(1, jnp.int32), jnp.asarray(1.0))
    new = newton_cg.rejected_state(opts, bad, here)
    assert float(new.damping) == pytest.approx(1e-2)
    assert int(new.rejected_steps) == 1 and int(new.nonfinite_events) == 1


# ------------------------------------------------------------------ evaluating stages


def test_cached_value_and_grad_reuses_a_finite_stored_point():
    lbfgs = optax.lbfgs()
    params = jnp.asarray([1.0, 2.0])
    calls = []

    def value_and_grad(p):
        calls.append(1)
        return jnp.sum(p**2), 2 * p

    state = lbfgs.init(params)
    value, grad, evaluated = evaluating.cached_value_and_grad(
        state, params, value_and_grad, jnp.float32
    )
    assert bool(evaluated) and float(value) == 5.0
    stored = optax.tree.set(state, value=jnp.asarray(9.0), grad=jnp.asarray([7.0, 7.0]))
    value, grad, evaluated = evaluating.cached_value_and_grad(
        stored, params, value_and_grad, jnp.float32
    )
    assert not bool(evaluated) and float(value) == 9.0
    np.testing.assert_allclose(grad, [7.0, 7.0])
