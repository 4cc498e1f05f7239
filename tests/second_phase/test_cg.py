"""Tests for twophase.second_phase.cg: direction rules, restarts, preconditioning, contracts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import twophase as tp
from tests import problems

RULES = sorted(tp.BETA_RULES)


def run_cg(opt, f, x0, *, max_iter=5000, gtol=1e-5, jit=True):
    return problems.run_second_phase(opt, f, x0, max_iter=max_iter, gtol=gtol, jit=jit)


def scipy_cg(f, x0, gtol=1e-5):
    vg = jax.jit(jax.value_and_grad(f))

    def fun(x):
        v, g = vg(jnp.asarray(x))
        return float(v), np.asarray(g)

    return scipy.optimize.minimize(
        fun, np.asarray(x0), jac=True, method="CG", options=dict(gtol=gtol, norm=2)
    )


@pytest.mark.parametrize(
    "name,f,x0",
    [
        ("rosenbrock-2", problems.rosenbrock, problems.rosenbrock_x0(2)),
        ("rosenbrock-10", problems.rosenbrock, problems.rosenbrock_x0(10)),
        ("powell-8", problems.extended_powell, problems.extended_powell_x0(8)),
        ("beale", problems.beale, jnp.array([1.0, 1.0])),
    ],
)
def test_agrees_with_scipy_cg(name, f, x0):
    x, state = run_cg(tp.nonlinear_cg(), f, x0, gtol=1e-5)
    ref = scipy_cg(f, x0)
    info = tp.info(state)
    assert float(info.grad_norm) <= 1e-5
    # Same minimiser (Powell's is singular: its minimiser is only located to ~1e-2).
    tol = 5e-2 if name.startswith("powell") else 1e-4
    np.testing.assert_allclose(np.asarray(x), ref.x, atol=tol)
    np.testing.assert_allclose(
        float(info.value), ref.fun, atol=1e-7 if name.startswith("powell") else 1e-9
    )
    # Comparable cost: never more than 1.5x scipy's value+gradient evaluations.
    assert int(info.value_and_grad_evals) <= 1.5 * ref.nfev, (
        int(info.value_and_grad_evals),
        ref.nfev,
    )


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "n,condition",
    # Each size compiles anew (~5 s a variant): the largest runs fast, the others slow.
    [
        pytest.param(10, 10.0, marks=pytest.mark.slow),
        pytest.param(50, 1e2, marks=pytest.mark.slow),
        (100, 1e2),
    ],
)
@pytest.mark.parametrize("c2,bound", [(0.01, 1.5), (None, 3.0)])
def test_spd_quadratic_converges_in_about_n_iterations(rule, n, condition, c2, bound):
    f, a, b = problems.spd_quadratic(n, condition, seed=n)
    x0 = jnp.zeros(n)
    g0 = float(optax.tree.norm(jax.grad(f)(x0)))
    linesearch = "wolfe" if c2 is None else tp.wolfe_linesearch(c2=c2)
    opt = tp.nonlinear_cg(rule, linesearch)
    x, state = run_cg(opt, f, x0, max_iter=3 * n, gtol=1e-8 * g0)
    info = tp.info(state)
    assert float(info.grad_norm) <= 1e-8 * g0
    # Exact arithmetic and exact line searches would need n iterations. A near-exact
    # search (c2 = 0.01: on a quadratic the second trial is exact) stays close to
    # that; the default (c2 = 0.2, tuned for non-quadratic problems) loses some
    # conjugacy at every step.
    assert int(info.cg_iterations) <= bound * n
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-5, atol=1e-7)


def test_golden_section_minimises_quadratic():
    f, a, b = problems.spd_quadratic(10, 10.0, seed=3)
    opt = tp.nonlinear_cg("polak_ribiere", tp.golden_section_linesearch(tolerance=1e-6))
    x, state = run_cg(opt, f, jnp.zeros(10), max_iter=100, gtol=1e-6)
    assert float(tp.info(state).grad_norm) <= 1e-6
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), atol=1e-5)


@pytest.mark.parametrize("linesearch", ["wolfe", "golden"])
def test_every_iteration_decreases_the_objective(linesearch):
    f, x0 = problems.rosenbrock, problems.rosenbrock_x0(6)
    opt = tp.nonlinear_cg("fletcher_reeves", linesearch)
    state, x = opt.init(x0), x0
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    previous = float(f(x0))
    for _ in range(60):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
        now = float(f(x))
        assert now <= previous
        previous = now
    assert previous < 0.5 * float(f(x0))


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_update_with_and_without_jit(self):
        f = problems.rosenbrock
        x0 = problems.rosenbrock_x0(4)
        opt = tp.nonlinear_cg()
        update = self.variant(lambda x, s: opt.update(x, s, x, value_fn=f))
        state, x = opt.init(x0), x0
        for _ in range(5):
            u, state = update(x, state)
            chex.assert_trees_all_equal_shapes_and_dtypes(u, x)
            x = optax.apply_updates(x, u)
        assert float(f(x)) < float(f(x0))
        assert int(tp.info(state).cg_iterations) == 5


def test_preconditioner_solves_diagonal_quadratic_in_one_iteration():
    lam = jnp.logspace(0, 4, 1000)
    f = lambda x: 0.5 * jnp.sum(lam * x**2)
    x0 = jnp.ones(1000)
    _, plain = run_cg(tp.nonlinear_cg(), f, x0, max_iter=2000, gtol=1e-5)
    _, pre = run_cg(tp.nonlinear_cg(preconditioner=1.0 / lam), f, x0, max_iter=2000, gtol=1e-5)
    assert float(tp.info(pre).grad_norm) <= 1e-5
    assert int(tp.info(pre).cg_iterations) <= 2
    assert int(tp.info(plain).cg_iterations) > 50


def test_callable_and_state_preconditioners_match_pytree():
    lam = jnp.array([1.0, 10.0, 100.0])
    f = lambda x: 0.5 * jnp.sum(lam * x**2) + jnp.sum(x**4)
    x0 = jnp.array([1.0, -2.0, 0.5])
    as_tree = tp.nonlinear_cg(preconditioner=1.0 / lam)
    as_fn = tp.nonlinear_cg(preconditioner=lambda params, state: 1.0 / lam)
    from_state = tp.nonlinear_cg(preconditioner="state")
    s_state = tp.set_preconditioner(from_state.init(x0), 1.0 / lam)
    results = []
    for opt, state in [(as_tree, as_tree.init(x0)), (as_fn, as_fn.init(x0)), (from_state, s_state)]:
        u, _ = opt.update(x0, state, x0, value_fn=f)
        results.append(u)
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-12)
    chex.assert_trees_all_close(results[0], results[2], rtol=1e-12)


def test_set_preconditioner_requires_stored_preconditioner():
    state = tp.nonlinear_cg().init(jnp.ones(3))
    with pytest.raises(ValueError, match="preconditioner"):
        tp.set_preconditioner(state, jnp.ones(3))


def test_cached_value_and_grad_are_reused():
    calls = {"n": 0}

    def count():
        calls["n"] += 1

    def f(x):
        jax.debug.callback(count)  # runs once per executed evaluation (test only)
        return problems.rosenbrock(x)

    opt = tp.nonlinear_cg()
    x0 = problems.rosenbrock_x0(4)
    state, x = opt.init(x0), x0
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    for _ in range(6):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
    jax.effects_barrier()
    # Counted evaluations are the executed ones: only the first update evaluates
    # at its starting point; later ones reuse the line search's last evaluation.
    assert calls["n"] == int(tp.info(state).value_and_grad_evals)
    assert calls["n"] <= 6 * 3
    # The cached gradient is the gradient at the current point.
    chex.assert_trees_all_close(state.grad, jax.grad(problems.rosenbrock)(x), rtol=1e-10)
    assert float(state.value) == pytest.approx(float(problems.rosenbrock(x)), rel=1e-12)


def test_jitted_loop_compiles_once(count_traces):
    f, x0 = problems.rosenbrock, problems.rosenbrock_x0(4)
    problems.jitted_loop(tp.nonlinear_cg(), f, x0, 30, count_traces)
    assert count_traces.counter["n"] == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtypes_preserved(dtype):
    params = {"w": jnp.ones((3, 2), dtype), "b": [jnp.zeros(2, dtype), jnp.array(0.5, dtype)]}

    def f(p):
        w = p["w"].astype(jnp.float32)
        return (
            jnp.sum((w - 2.0) ** 2)
            + jnp.sum(p["b"][0].astype(jnp.float32) ** 2)
            + (p["b"][1].astype(jnp.float32) - 1.0) ** 2
        )

    opt = tp.nonlinear_cg()
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=f))
    for _ in range(3):
        u, new_state = step(params, state)
        chex.assert_trees_all_equal_dtypes(u, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        params, state = optax.apply_updates(params, u), new_state
    assert params["w"].dtype == dtype
    start = {"w": jnp.ones((3, 2)), "b": [jnp.zeros(2), jnp.array(0.5)]}
    assert float(f(params)) < 1e-2 * float(f(start))


def test_nonfinite_trial_point_shrinks_step():
    # f is +inf beyond x = 1; minimum at 0.9 lies close to the wall.
    f = lambda x: jnp.where(x[0] < 1.0, (x[0] - 0.9) ** 2, jnp.inf)
    opt = tp.nonlinear_cg()
    x = jnp.array([-5.0])
    state = opt.init(x)
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    for _ in range(10):
        u, state = step(x, state)
        assert bool(jnp.all(jnp.isfinite(u)))
        x = optax.apply_updates(x, u)
    assert abs(float(x[0]) - 0.9) < 1e-4


def test_nan_at_current_point_gives_zero_update_and_is_counted():
    f = lambda x: jnp.sum(x**2) * jnp.nan
    opt = tp.nonlinear_cg()
    x = jnp.ones(3)
    state = opt.init(x)
    u, state = opt.update(x, state, x, value_fn=f)
    chex.assert_trees_all_equal(u, jnp.zeros(3))
    assert int(state.nonfinite_events) == 1
    assert int(tp.info(state).cg_iterations) == 0


def test_converged_point_does_not_move():
    f = lambda x: jnp.sum(x**2)
    opt = tp.nonlinear_cg(grad_tol=1e-6)
    x = jnp.zeros(3)
    u, state = opt.update(x, opt.init(x), x, value_fn=f)
    chex.assert_trees_all_equal(u, jnp.zeros(3))
    assert int(state.linesearch_failures) == 0


def test_repeated_failure_is_counted_without_searching():
    """After a failed CG search and a failed steepest-descent restart from the same point,
    a third call would repeat the restart exactly: it evaluates once, sees that the
    objective is unchanged, and fails without searching."""
    uphill = problems.uphill_quadratic()  # every line search fails
    opt = tp.nonlinear_cg()
    x = jnp.array([3.0, -2.0])
    state = opt.init(x)
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=uphill))
    evals = []
    for _ in range(5):
        u, state = step(x, state)
        chex.assert_trees_all_equal(u, jnp.zeros(2))
        evals.append(int(state.value_and_grad_evals))
    assert evals[0] < evals[1]  # the restart searched again
    assert np.diff(evals[1:]).tolist() == [1, 1, 1]  # afterwards one evaluation a call
    assert int(state.consecutive_failures) == int(state.linesearch_failures) == 5
    assert int(state.cg_iterations) == 5


def test_powell_and_periodic_restarts_are_counted():
    f, x0 = problems.rosenbrock, problems.rosenbrock_x0(10)
    _, s_periodic = run_cg(tp.nonlinear_cg("fletcher_reeves", restart_every=3), f, x0, max_iter=30)
    _, s_none = run_cg(
        tp.nonlinear_cg("fletcher_reeves", restart_threshold=None), f, x0, max_iter=30
    )
    # Every third iteration restarts at least (iterations 3, 6, ..., 30).
    assert int(s_periodic.restarts) >= 9
    assert int(s_none.restarts) < int(s_periodic.restarts)


def test_custom_beta_callable_is_used():
    zero_beta = lambda g, gp, dp, z, zp: jnp.zeros([], jnp.result_type(g))
    f, x0 = problems.rosenbrock, problems.rosenbrock_x0(2)
    # beta = 0 is steepest descent: slower than PR+ on Rosenbrock.
    _, s_sd = run_cg(tp.nonlinear_cg(zero_beta), f, x0, max_iter=40)
    _, s_pr = run_cg(tp.nonlinear_cg("polak_ribiere"), f, x0, max_iter=40)
    assert float(tp.info(s_sd).value) > float(tp.info(s_pr).value)


def test_beta_rules_closed_form():
    g = jnp.array([1.0, 2.0])
    gp = jnp.array([2.0, 0.0])
    dp = jnp.array([-2.0, 1.0])
    y = g - gp
    assert float(tp.fletcher_reeves(g, gp, dp, g, gp)) == pytest.approx(5.0 / 4.0)
    assert float(tp.polak_ribiere(g, gp, dp, g, gp)) == pytest.approx(max(0.0, g @ y / 4.0))
    assert float(tp.hestenes_stiefel(g, gp, dp, g, gp)) == pytest.approx(g @ y / (dp @ y))
    assert float(tp.dai_yuan(g, gp, dp, g, gp)) == pytest.approx(5.0 / (dp @ y))
    dy = dp @ y
    beta_n = (y @ g) / dy - 2 * (y @ y) * (dp @ g) / dy**2
    eta = -1.0 / (np.linalg.norm(dp) * min(0.01, np.linalg.norm(gp)))
    assert float(tp.hager_zhang(g, gp, dp, g, gp)) == pytest.approx(max(beta_n, eta))


@pytest.mark.parametrize("rule", RULES)
def test_vanishing_denominator_gives_finite_beta(rule):
    zero = jnp.zeros(3, jnp.float32)
    beta = tp.BETA_RULES[rule](zero, zero, zero, zero, zero)
    assert bool(jnp.isfinite(beta))


def test_works_inside_chain_and_info_finds_state():
    f, x0 = problems.rosenbrock, problems.rosenbrock_x0(4)
    opt = optax.chain(optax.identity(), tp.nonlinear_cg())
    state, x = opt.init(x0), x0
    for _ in range(3):
        u, state = opt.update(x, state, x, value_fn=f)
        x = optax.apply_updates(x, u)
    assert int(tp.info(state).cg_iterations) == 3
    # optax's helper reads the cached value and gradient.
    value, _ = optax.value_and_grad_from_state(f)(x, state=state)
    assert float(value) == pytest.approx(float(f(x)))


def test_empty_and_scalar_pytrees():
    opt = tp.nonlinear_cg()
    params = {"a": jnp.array(3.0), "empty": jnp.zeros((0,)), "none": None}
    f = lambda p: (p["a"] - 1.0) ** 2 + jnp.sum(p["empty"])
    state = opt.init(params)
    u, state = opt.update(params, state, params, value_fn=f)
    p = optax.apply_updates(params, u)
    assert abs(float(p["a"]) - 1.0) < 1e-6
    assert p["empty"].shape == (0,)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(beta="nope"), "beta"),
        (dict(linesearch="nope"), "linesearch"),
        (dict(restart_threshold=0.0), "restart_threshold"),
        (dict(restart_threshold=1.5), "restart_threshold"),
        (dict(restart_every=0), "restart_every"),
        (dict(initial_step="nope"), "initial_step"),
        (dict(grad_tol=-1.0), "grad_tol"),
        (dict(grad_tol=float("inf")), "grad_tol"),
        (dict(restart_every=2.5), "restart_every"),
        (dict(restart_threshold=True), "restart_threshold"),
        (dict(preconditioner="nope"), "preconditioner"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        tp.nonlinear_cg(**kwargs)


def test_missing_params_is_a_type_error_but_an_empty_none_tree_is_not():
    opt = tp.nonlinear_cg()
    x = jnp.ones(2)
    with pytest.raises(TypeError, match="`params`"):
        opt.update(x, opt.init(x), value_fn=lambda p: jnp.sum(p**2))
    u, _ = opt.update(None, opt.init(None), None, value_fn=lambda p: jnp.zeros([]))
    assert u is None


def test_missing_value_fn_is_a_type_error():
    problems.assert_update_needs_value_fn(tp.nonlinear_cg())


def test_non_scalar_value_fn_is_a_type_error():
    opt = tp.nonlinear_cg()
    x = jnp.ones(2)
    with pytest.raises(TypeError, match="value_fn"):
        jax.jit(lambda x, s: opt.update(x, s, x, value_fn=lambda p: p**2))(x, opt.init(x))


@pytest.mark.parametrize("make", [tp.nonlinear_cg, tp.newton_cg], ids=["cg", "newton_cg"])
def test_objective_changed_after_convergence_is_minimised(make):
    """A loss weight changed once the second phase has converged (stalled on its
    cache): the next calls evaluate afresh and reach the new closed-form minimiser."""
    a = jnp.diag(jnp.array([1.0, 3.0, 10.0]))
    b = jnp.array([1.0, -2.0, 0.5])
    opt = make()

    @jax.jit
    def step(x, s, weight):
        f = lambda y: weight * 0.5 * y @ a @ y - b @ y
        u, s = opt.update(x, s, x, value_fn=f)
        return optax.apply_updates(x, u), s

    x, s = jnp.array([5.0, -4.0, 3.0]), opt.init(jnp.zeros(3))
    for _ in range(15):
        x, s = step(x, s, 1.0)
    chex.assert_trees_all_close(x, jnp.linalg.solve(a, b), atol=1e-6)
    for _ in range(15):
        x, s = step(x, s, 4.0)
    chex.assert_trees_all_close(x, jnp.linalg.solve(4.0 * a, b), atol=1e-6)
