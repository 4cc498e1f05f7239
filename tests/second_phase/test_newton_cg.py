"""Tests for twophase.second_phase.newton_cg: scipy oracle, exact Newton steps, negative curvature,
damping, Gauss-Newton, preconditioning, non-finite guards, dtypes, compilation."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import twophase as tp
from tests import problems
from twophase.second_phase.newton_cg import HVP_COST, truncated_cg

GTOL = 1e-5


# --------------------------------------------------------------------------- problems


def logistic_regression():
    """Mean logistic loss of a 200 x 6 linear classifier with a small L2 term (strictly
    convex, a unique minimiser)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((200, 6)))
    w_true = jnp.asarray(rng.standard_normal(6))
    logits = x @ w_true + 0.5 * jnp.asarray(rng.standard_normal(200))
    y = jnp.where(logits > 0, 1.0, -1.0)

    def f(w):
        return jnp.mean(jnp.logaddexp(0.0, -y * (x @ w))) + 5e-3 * jnp.sum(w**2)

    return f, jnp.zeros(6)


def exponential_fit_residuals():
    """Residuals of ``a exp(-b t) + c`` against noisy data (a small nonlinear least squares)."""
    t = jnp.linspace(0.0, 4.0, 40)
    noise = 0.01 * jnp.asarray(np.random.default_rng(1).standard_normal(40))
    data = 2.0 * jnp.exp(-1.3 * t) + 0.5 + noise

    def residuals(p):
        return p[0] * jnp.exp(-p[1] * t) + p[2] - data

    return residuals, jnp.array([1.0, 0.5, 0.0])


def suite():
    f_quad, _, _ = problems.spd_quadratic(50, 1e3, seed=4)
    f_logistic, w0 = logistic_regression()
    residuals, p0 = exponential_fit_residuals()
    return {
        "rosenbrock-2": (problems.rosenbrock, problems.rosenbrock_x0(2)),
        "rosenbrock-20": (problems.rosenbrock, problems.rosenbrock_x0(20)),
        "quadratic-50": (f_quad, jnp.zeros(50)),
        "logistic-6": (f_logistic, w0),
        "least-squares-3": (tp.gauss_newton_objective(residuals), p0),
    }


# --------------------------------------------------------------------------- runners


def cost(state):
    """Our cost: value+gradient evaluations plus curvature-vector products."""
    return int(state.value_and_grad_evals) + int(state.hessian_vector_products)


def scipy_newton_cg(f, x0, gtol=GTOL):
    """scipy's Newton-CG with ``fun`` returning ``(f, g)`` (``jac=True``) and ``hessp``.

    Counting: one call of ``fun`` is one value+gradient evaluation (scipy memoizes
    the gradient of a point it evaluated, so nfev = njev evaluations of a pair are one
    call each here), one call of ``hessp`` one HVP (= nhev). scipy's Newton-CG has no
    gradient tolerance; the cost is read at the first iterate whose gradient norm is
    at most ``gtol`` (checked in the callback with an uncounted gradient).
    """
    vg = jax.jit(jax.value_and_grad(f))
    grad = jax.jit(jax.grad(f))
    hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(f), (x,), (v,))[1])
    count = {"evals": 0, "hvps": 0, "at_gtol": None, "x": None}

    def fun(x):
        count["evals"] += 1
        value, g = vg(jnp.asarray(x))
        return float(value), np.asarray(g)

    def hessp(x, p):
        count["hvps"] += 1
        return np.asarray(hvp(jnp.asarray(x), jnp.asarray(p)))

    def callback(intermediate_result):
        x = intermediate_result.x
        if np.linalg.norm(np.asarray(grad(jnp.asarray(x)))) <= gtol:
            count["at_gtol"] = count["evals"] + count["hvps"]
            count["x"] = np.array(x)
            raise StopIteration

    scipy.optimize.minimize(
        fun,
        np.asarray(x0),
        jac=True,
        hessp=hessp,
        method="Newton-CG",
        callback=callback,
        options=dict(xtol=1e-16, maxiter=2000),
    )
    return count


@pytest.fixture(scope="module")
def comparisons():
    """name -> (our final x, our state, scipy's count), computed once per module."""
    return {}


def compare(name, comparisons):
    if name not in comparisons:
        f, x0 = suite()[name]
        x, state = problems.run_second_phase(tp.newton_cg(), f, x0)
        comparisons[name] = (x, state, scipy_newton_cg(f, x0))
    return comparisons[name]


# --------------------------------------------------------------------------- scipy oracle


@pytest.mark.parametrize("name", list(suite()))
def test_agrees_with_scipy_newton_cg(name, comparisons):
    x, state, ref = compare(name, comparisons)
    assert float(optax.tree.norm(state.grad)) <= GTOL
    assert ref["at_gtol"] is not None, "scipy did not reach the gradient tolerance"
    # Same minimiser.
    np.testing.assert_allclose(np.asarray(x), ref["x"], atol=1e-4)
    # Cost (evaluations + HVPs) no worse than 1.5x scipy's (evaluations + hessp calls).
    assert cost(state) <= 1.5 * ref["at_gtol"], (cost(state), ref["at_gtol"])
    assert int(state.linesearch_failures) == 0
    assert int(state.nonfinite_events) == 0


def test_cheaper_than_scipy_in_geometric_mean(comparisons):
    ratios = {}
    for name in suite():
        _, state, ref = compare(name, comparisons)
        ratios[name] = cost(state) / ref["at_gtol"]
    mean = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
    assert mean < 1.0, ratios


# --------------------------------------------------------------------------- exact steps


def exact_newton(**kwargs):
    return tp.newton_cg(
        forcing=1e-12, damping=1e-12, min_damping=1e-12, initial_step="unit", **kwargs
    )


@pytest.mark.parametrize("n,condition,cap", [(5, 10.0, 5), (30, 1e3, 60)])
def test_quadratic_solved_in_one_outer_step(n, condition, cap):
    f, a, b = problems.spd_quadratic(n, condition, seed=n)
    # With cap = n exact arithmetic needs n products; rounding costs some more when
    # the condition number is large.
    opt = exact_newton(max_inner_iterations=cap)
    x0 = jnp.zeros(n)
    u, state = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))(x0, opt.init(x0))
    x = optax.apply_updates(x0, u)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-7, atol=1e-9)
    assert float(state.step) == 1.0  # the Newton step, accepted at once
    assert int(state.value_and_grad_evals) == 2  # the start and the accepted point
    assert int(state.hessian_vector_products) <= cap
    assert float(state.ratio) == pytest.approx(1.0, abs=1e-6)
    assert int(state.iterations) == 1


def test_diagonal_preconditioner_solves_diagonal_quadratic_with_one_product():
    lam = jnp.logspace(0, 4, 200)
    f = lambda x: 0.5 * jnp.sum(lam * (x - 1.0) ** 2)
    x0 = jnp.zeros(200)
    plain = exact_newton(max_inner_iterations=400)
    pre = exact_newton(max_inner_iterations=400, preconditioner=1.0 / lam)
    _, s_plain = plain.update(x0, plain.init(x0), x0, value_fn=f)
    u_pre, s_pre = pre.update(x0, pre.init(x0), x0, value_fn=f)
    np.testing.assert_allclose(np.asarray(u_pre), np.ones(200), rtol=1e-9)
    assert int(s_pre.hessian_vector_products) == 1
    assert int(s_plain.hessian_vector_products) > 20


def test_gauss_newton_is_exact_on_linear_least_squares():
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.standard_normal((30, 8)))
    y = jnp.asarray(rng.standard_normal(30))
    value_fn = tp.gauss_newton_objective(lambda w: a @ w - y)
    mse = float(jnp.mean((a @ jnp.ones(8) - y) ** 2))
    assert float(value_fn(jnp.ones(8))) == pytest.approx(mse)
    opt = exact_newton(curvature="gauss_newton", max_inner_iterations=16)
    w0 = jnp.zeros(8)
    u, _ = opt.update(w0, opt.init(w0), w0, value_fn=value_fn)
    w_ls = np.linalg.lstsq(np.asarray(a), np.asarray(y), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(u), w_ls, rtol=1e-7, atol=1e-9)


def test_gauss_newton_matches_hessian_newton_on_nonlinear_least_squares():
    residuals, p0 = exponential_fit_residuals()
    for reduction in ("mean", "half_sum"):
        value_fn = tp.gauss_newton_objective(residuals, reduction=reduction)
        x_gn, s_gn = problems.run_second_phase(
            tp.newton_cg(curvature="gauss_newton"), value_fn, p0, gtol=1e-8
        )
        x_h, _ = problems.run_second_phase(tp.newton_cg(), value_fn, p0, gtol=1e-8)
        assert float(optax.tree.norm(s_gn.grad)) <= 1e-8
        np.testing.assert_allclose(np.asarray(x_gn), np.asarray(x_h), atol=1e-6)
        np.testing.assert_allclose(np.asarray(x_gn), [2.0, 1.3, 0.5], atol=0.05)
    # The Gauss-Newton product is w J^T J v.
    value_fn = tp.gauss_newton_objective(residuals)
    jac = jax.jacfwd(residuals)(p0)
    v = jnp.array([0.3, -1.0, 2.0])
    expected = 2.0 / 40 * jac.T @ (jac @ v)
    np.testing.assert_allclose(np.asarray(value_fn.product(p0)(v)), expected, rtol=1e-10)


def test_gauss_newton_needs_a_gauss_newton_objective():
    opt = tp.newton_cg(curvature="gauss_newton")
    x = jnp.ones(2)
    with pytest.raises(TypeError, match="gauss_newton_objective"):
        opt.update(x, opt.init(x), x, value_fn=lambda p: jnp.sum(p**2))
    with pytest.raises(ValueError, match="`reduction`"):
        tp.gauss_newton_objective(lambda p: p, reduction="sum")
    with pytest.raises(TypeError, match="`residual_fn`"):
        tp.gauss_newton_objective(None)


# --------------------------------------------------------------------------- negative curvature


def saddle(x):
    """``x^2 - y^2 + y^4 / 4``: a saddle at 0, minima at ``(0, +-sqrt(2))``."""
    return x[0] ** 2 - x[1] ** 2 + 0.25 * x[1] ** 4


@pytest.mark.parametrize(
    "x0,first_inner",
    [((0.0, 0.1), True), ((1.0, 0.05), False)],
    ids=["first-inner-iteration", "later-inner-iteration"],
)
def test_negative_curvature_still_descends(x0, first_inner):
    # A tight forcing term, so that the inner solve does reach the second direction.
    opt = tp.newton_cg(forcing=1e-3)
    x = jnp.array(x0)
    state = opt.init(x)
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=saddle))
    u, state = step(x, state)
    assert int(state.negative_curvature) == 1
    assert int(state.hessian_vector_products) == (1 if first_inner else 2)
    assert float(saddle(x + u)) < float(saddle(x))
    # The damping now covers the negative curvature found (-2 along y).
    assert float(state.damping) >= 1.9
    values = [float(saddle(x))]
    for _ in range(40):
        x = optax.apply_updates(x, u)
        values.append(float(saddle(x)))
        assert bool(jnp.all(jnp.isfinite(x)))
        u, state = step(x, state)
    assert all(b <= a for a, b in itertools.pairwise(values))
    np.testing.assert_allclose(np.abs(np.asarray(x)), [0.0, math.sqrt(2.0)], atol=1e-6)


def test_truncated_cg_stops_at_negative_curvature():
    h = jnp.diag(jnp.array([2.0, 1.0, -3.0]))
    g = jnp.array([1.0, 1.0, 1.0])
    out = truncated_cg(lambda v: h @ v, g, jnp.asarray(0.0), 1e-12, 10)
    assert bool(out.negative_curvature)
    assert bool(jnp.vdot(g, out.step) < 0)
    assert bool(jnp.all(jnp.isfinite(out.step)))
    # First direction -g: curvature 0 -> negative: scaled steepest descent.
    h0 = jnp.diag(jnp.array([1.0, -1.0]))
    out0 = truncated_cg(lambda v: h0 @ v, jnp.ones(2), jnp.asarray(0.0), 1e-12, 10)
    assert bool(out0.negative_curvature) and int(out0.products) == 1
    np.testing.assert_allclose(np.asarray(out0.step), [-1.0, -1.0])


# --------------------------------------------------------------------------- guards


def nan_hvp_objective():
    """``sum(x^2)`` with a correct gradient whose derivative (the HVP) is NaN."""

    @jax.custom_jvp
    def grad_impl(x):
        return 2.0 * x

    grad_impl.defjvp(lambda primals, tangents: (grad_impl(primals[0]), jnp.nan * tangents[0]))

    @jax.custom_vjp
    def f(x):
        return jnp.sum(x**2)

    f.defvjp(lambda x: (jnp.sum(x**2), x), lambda x, ct: (ct * grad_impl(x),))
    return f


def test_nonfinite_hvp_gives_zero_update_and_is_counted():
    f = nan_hvp_objective()
    opt = tp.newton_cg()
    x = jnp.array([1.0, -2.0])
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    state = opt.init(x)
    for k in range(1, 4):
        u, state = step(x, state)
        chex.assert_trees_all_equal(u, jnp.zeros(2))
        assert int(state.nonfinite_events) == k
        assert int(state.rejected_steps) == k
        assert int(state.consecutive_failures) == k
        assert int(state.linesearch_failures) == 0
    # One per call, no line search: a call after a failure re-evaluates (the
    # objective may have changed under the cache).
    assert int(state.value_and_grad_evals) == 3
    assert int(state.hessian_vector_products) == 3  # one per call, stopped at once
    assert bool(jnp.isfinite(state.value))


def test_nonfinite_objective_gives_zero_update_and_is_counted():
    opt = tp.newton_cg()
    x = jnp.ones(3)
    u, state = opt.update(x, opt.init(x), x, value_fn=lambda p: jnp.sum(p**2) * jnp.nan)
    chex.assert_trees_all_equal(u, jnp.zeros(3))
    assert int(state.nonfinite_events) == 1
    assert int(state.consecutive_failures) == 1
    assert int(state.hessian_vector_products) == 0
    assert int(state.iterations) == 0


def test_nonfinite_trial_points_never_reach_the_parameters():
    f = lambda x: jnp.where(x[0] < 1.0, (x[0] - 0.9) ** 2 - jnp.log1p(-x[0]), jnp.nan)
    opt = tp.newton_cg()
    x = jnp.array([-5.0])
    state = opt.init(x)
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    for _ in range(30):
        u, state = step(x, state)
        assert bool(jnp.all(jnp.isfinite(u)))
        x = optax.apply_updates(x, u)
    assert float(x[0]) < 1.0
    assert float(optax.tree.norm(state.grad)) < 1e-8


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_nonpositive_damping_in_the_state_is_rejected_and_counted(bad):
    f, x0 = problems.rosenbrock, problems.rosenbrock_x0(4)
    opt = tp.newton_cg(damping=1e-2)
    state = opt.init(x0)._replace(damping=jnp.asarray(bad))
    u, state = opt.update(x0, state, x0, value_fn=f)
    chex.assert_trees_all_equal(u, jnp.zeros(4))
    assert int(state.rejected_steps) == 1
    assert int(state.consecutive_failures) == 1
    assert int(state.hessian_vector_products) == 0
    assert float(state.damping) == 1e-2  # restarted
    u, state = opt.update(x0, state, x0, value_fn=f)
    assert float(f(x0 + u)) < float(f(x0))
    assert int(state.consecutive_failures) == 0


def test_failed_line_search_raises_damping_and_does_not_move():
    uphill = problems.uphill_quadratic()  # every line search fails
    opt = tp.newton_cg()
    x = jnp.array([3.0, -2.0])
    state = opt.init(x)
    lam = float(state.damping)
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=uphill))
    for k in range(1, 4):
        u, state = step(x, state)
        chex.assert_trees_all_equal(u, jnp.zeros(2))
        assert int(state.consecutive_failures) == k
        assert float(state.damping) > lam
        lam = float(state.damping)


def test_converged_point_does_not_move():
    opt = tp.newton_cg(grad_tol=1e-6)
    x = jnp.zeros(3)
    u, state = opt.update(x, opt.init(x), x, value_fn=lambda p: jnp.sum(p**2))
    chex.assert_trees_all_equal(u, jnp.zeros(3))
    assert int(state.hessian_vector_products) == 0
    assert int(state.consecutive_failures) == 0


# --------------------------------------------------------------------------- contracts


def test_jitted_loop_compiles_once(count_traces):
    f, x0 = problems.rosenbrock, problems.rosenbrock_x0(6)
    _, state = problems.jitted_loop(tp.newton_cg(), f, x0, 80, count_traces)
    assert count_traces.counter["n"] == 1
    assert float(optax.tree.norm(state.grad)) < 1e-6


def test_counts_are_the_executed_evaluations():
    calls = {"n": 0}

    def bump():
        calls["n"] += 1

    def f(x):
        jax.debug.callback(bump)  # executed once per evaluation and once per product
        return problems.rosenbrock(x)

    opt = tp.newton_cg()
    x = problems.rosenbrock_x0(4)
    state = opt.init(x)
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    for _ in range(8):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
    jax.effects_barrier()
    assert calls["n"] == int(state.value_and_grad_evals) + int(state.hessian_vector_products)
    # The cached value and gradient belong to the current point.
    chex.assert_trees_all_close(state.grad, jax.grad(problems.rosenbrock)(x), rtol=1e-10)
    assert float(state.value) == pytest.approx(float(problems.rosenbrock(x)), rel=1e-12)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_update_with_and_without_jit(self):
        f, x0 = problems.rosenbrock, problems.rosenbrock_x0(4)
        opt = tp.newton_cg()
        update = self.variant(lambda x, s: opt.update(x, s, x, value_fn=f))
        state, x = opt.init(x0), x0
        for _ in range(3):
            u, state = update(x, state)
            chex.assert_trees_all_equal_shapes_and_dtypes(u, x)
            x = optax.apply_updates(x, u)
        assert float(f(x)) < float(f(x0))
        assert int(state.iterations) == 3


@pytest.fixture
def x64():
    """float64 enabled for one test, restored afterwards (conftest enables it for the
    whole session; this keeps the test correct on its own and leaks nothing)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def test_float64_reaches_float64_accuracy(x64):
    f, a, b = problems.spd_quadratic(20, 1e4, seed=7, dtype=jnp.float64)
    x, state = problems.run_second_phase(tp.newton_cg(), f, jnp.zeros(20, jnp.float64), gtol=1e-12)
    assert x.dtype == jnp.float64 and state.value.dtype == jnp.float64
    assert state.grad.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtypes_preserved(dtype):
    params = {"w": jnp.ones((3, 2), dtype), "b": [jnp.zeros(2, dtype), jnp.array(0.5, dtype)]}

    def f(p):
        w = p["w"].astype(jnp.float32)
        b0 = p["b"][0].astype(jnp.float32)
        return jnp.sum((w - 2.0) ** 2 + 0.1 * w**4) + jnp.sum(b0**2) + (p["b"][1] - 1.0) ** 2

    opt = tp.newton_cg()
    state = opt.init(params)
    assert state.value.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
    chex.assert_trees_all_equal_dtypes(
        state.grad,
        jax.tree.map(lambda x: x.astype(tp.second_phase.common.compute_dtype(x.dtype)), params),
    )
    step = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=f))
    start = float(f(params))
    params, state = problems.run_steps_keeping_types(step, params, state, 4)
    assert params["w"].dtype == dtype
    # The minimiser: w solves 2 (w - 2) + 0.4 w^3 = 0, w = 1.42326...; b = (0, 0, 1).
    w_star = scipy.optimize.brentq(lambda w: 2 * (w - 2) + 0.4 * w**3, 0.0, 2.0)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-3
    np.testing.assert_allclose(np.asarray(params["w"], np.float64), w_star, atol=tol)
    assert float(f(params)) < start


# --------------------------------------------------------------------------- preconditioner


def test_state_preconditioner_is_set_by_set_preconditioner():
    lam = jnp.array([1.0, 10.0, 100.0])
    f = lambda x: 0.5 * jnp.sum(lam * x**2) + jnp.sum(x**4)
    x0 = jnp.array([1.0, -2.0, 0.5])
    as_tree = tp.newton_cg(preconditioner=1.0 / lam)
    as_fn = tp.newton_cg(preconditioner=lambda params, state: 1.0 / lam)
    from_state = tp.newton_cg(preconditioner="state")
    # Found inside a chain, by field name.
    chained = optax.chain(optax.identity(), from_state)
    s_chain = tp.set_preconditioner(chained.init(x0), 1.0 / lam)
    chex.assert_trees_all_close(s_chain[1].preconditioner, 1.0 / lam)
    s_state = tp.set_preconditioner(from_state.init(x0), 1.0 / lam)
    results = []
    for opt, state in [(as_tree, as_tree.init(x0)), (as_fn, as_fn.init(x0)), (from_state, s_state)]:
        u, new_state = opt.update(x0, state, x0, value_fn=f)
        results.append((u, int(new_state.hessian_vector_products)))
    chex.assert_trees_all_close(results[0][0], results[1][0], rtol=1e-12)
    chex.assert_trees_all_close(results[0][0], results[2][0], rtol=1e-12)
    assert results[0][1] == results[1][1] == results[2][1]


def test_set_preconditioner_requires_stored_preconditioner():
    with pytest.raises(ValueError, match="preconditioner"):
        tp.set_preconditioner(tp.newton_cg().init(jnp.ones(3)), jnp.ones(3))


def test_state_buffers_and_contract_fields():
    x = {"a": jnp.ones((4, 3)), "b": jnp.ones(5)}
    state = tp.newton_cg().init(x)
    sized = [
        name
        for name, value in state._asdict().items()
        if jax.tree.structure(value) == jax.tree.structure(x)
    ]
    assert sized == ["grad"]  # at most 5 parameter-sized buffers besides the preconditioner
    for name in (
        "value",
        "grad",
        "value_and_grad_evals",
        "hessian_vector_products",
        "consecutive_failures",
        "nonfinite_events",
        "linesearch_failures",
        "iterations",
        "damping",
        "preconditioner",
    ):
        assert name in tp.NewtonCGState._fields
    assert float(state.value) == math.inf
    for name in ("value_and_grad_evals", "hessian_vector_products", "iterations"):
        assert getattr(state, name).dtype == jnp.int32


def test_hvp_cost_is_a_plausible_measurement():
    assert 1.0 <= HVP_COST <= 4.0


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(linesearch="nope"), "linesearch"),
        (dict(curvature="nope"), "curvature"),
        (dict(forcing="nope"), "forcing"),
        (dict(forcing=0.0), "forcing"),
        (dict(forcing=1.0), "forcing"),
        (dict(forcing=True), "forcing"),
        (dict(eta_max=1.5), "eta_max"),
        (dict(max_inner_iterations=0), "max_inner_iterations"),
        (dict(max_inner_iterations=2.5), "max_inner_iterations"),
        (dict(damping=0.0), "damping"),
        (dict(damping=-1.0), "damping"),
        (dict(damping=float("nan")), "damping"),
        (dict(min_damping=0.0), "min_damping"),
        (dict(damping=1e-3, min_damping=1e-2), "damping"),
        (dict(max_damping=1e-6), "damping"),
        (dict(preconditioner="nope"), "preconditioner"),
        (dict(grad_tol=-1.0), "grad_tol"),
        (dict(initial_step="nope"), "initial_step"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        tp.newton_cg(**kwargs)


def test_missing_value_fn_is_a_type_error():
    problems.assert_update_needs_value_fn(tp.newton_cg())


def test_mixed_dtype_empty_and_none_pytrees():
    opt = tp.newton_cg()
    u, state = opt.update(None, opt.init(None), None, value_fn=lambda p: jnp.zeros([]))
    assert u is None and int(state.iterations) == 0
    params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.float64), "c": jnp.zeros((0,))}

    def f(p):
        return jnp.sum((p["a"] - 2.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2) + jnp.sum(p["c"])

    x, state = problems.run_second_phase(opt, f, params, max_iter=10, gtol=1e-6)
    chex.assert_trees_all_equal_dtypes(x, params)
    np.testing.assert_allclose(np.asarray(x["a"]), 2.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x["b"]), -1.0, atol=1e-6)
    assert x["c"].shape == (0,)


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_are_solved_in_float32(dtype):
    # An ill-conditioned 256-dimensional quadratic; the objective computes in float32. The
    # update for low-precision parameters must be the float32 run's update, rounded once to
    # the parameters' dtype: an inner solve in bfloat16 (8-bit mantissa) would be far off.
    n = 256
    d = jnp.logspace(0.0, 2.0, n, dtype=jnp.float32)
    c = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)
    f = lambda p: 0.5 * jnp.sum(d * (p.astype(jnp.float32) - c) ** 2)
    x_low = jnp.zeros(n, dtype)
    opt = tp.newton_cg(damping=1e-6, forcing=1e-4, max_inner_iterations=n)
    u_low, state = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))(x_low, opt.init(x_low))
    u_32, _ = opt.update(
        x_low.astype(jnp.float32),
        opt.init(x_low.astype(jnp.float32)),
        x_low.astype(jnp.float32),
        value_fn=f,
    )
    assert u_low.dtype == dtype
    assert state.value.dtype == jnp.float32 and state.grad.dtype == jnp.float32
    assert state.damping.dtype == jnp.float32
    # Within 1%: the line search evaluates f at trial points rounded to `dtype` (measured
    # up to 3 ulps off), but a solve in bfloat16 could not reach the 1e-4 residual.
    eps = 1e-2
    np.testing.assert_allclose(np.asarray(u_low, np.float32), np.asarray(u_32), rtol=eps, atol=1e-6)
    # ... which is the Newton step to the minimiser c (solved to a relative residual 1e-4).
    assert float(jnp.max(jnp.abs(u_32 - c))) < 1e-2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_adam_newton_cg_keeps_nonfinite_values_out_of_low_precision_params(dtype):
    # sum(sqrt(1 + w^2)): the Newton step from w overshoots to -w^3, here into a region
    # where the objective is NaN; the line search must back off and nothing non-finite
    # may reach the parameters.
    def f(p):
        w = p["w"].astype(jnp.float32)
        return jnp.where(jnp.max(jnp.abs(w)) > 2.0, jnp.nan, jnp.sum(jnp.sqrt(1.0 + w**2)))

    params = {"w": jnp.full((4,), 1.5, dtype)}
    opt = tp.adam_newton_cg(1e-2, policy=tp.switch_at(3))

    @jax.jit
    def step(p, s):
        value, grad = jax.value_and_grad(f)(p)
        u, s = opt.update(grad, s, p, value=value, value_fn=f)
        return optax.apply_updates(p, u), s, u

    state, start = opt.init(params), float(f(params))
    for _ in range(12):
        params, state, u = step(params, state)
        assert params["w"].dtype == dtype and u["w"].dtype == dtype
        assert bool(jnp.all(jnp.isfinite(u["w"]))) and bool(jnp.all(jnp.isfinite(params["w"])))
    assert int(tp.info(state).phase) == 1 and int(tp.info(state).hessian_vector_products) > 0
    assert float(f(params)) < start - 1.0  # from 4 * 1.80 towards the minimum 4
