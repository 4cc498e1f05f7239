"""The PINN problems of ``twophase.experiments.pinn``: exact solutions, points, network, loss,
training at counted cost."""

from __future__ import annotations

import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp
from twophase.experiments import pinn

SMALL = {"n_x": 21, "n_t": 11, "n_residual": 60}

# Every problem; burgers in the fast suite (the others, reaction included, are marked slow).
SLOW_BUT_ONE = [
    pytest.param(name, marks=() if name == "burgers" else pytest.mark.slow)
    for name in pinn.PROBLEM_NAMES
]


def interior_points(problem, n=64, seed=0):
    """``(n, n_inputs)`` random points inside the domain."""
    rng = np.random.default_rng(seed)
    ranges = [problem.t_range] if problem.n_inputs == 1 else [problem.x_range, problem.t_range]
    return jnp.asarray(np.stack([rng.uniform(lo, hi, n) for lo, hi in ranges], axis=1))


def network_for(problem, key=0, widths=(8, 8), dtype=jnp.float64):
    return pinn.init_mlp(
        jax.random.PRNGKey(key),
        widths,
        dtype=dtype,
        n_inputs=problem.n_inputs,
        n_outputs=problem.n_outputs,
    )


# The size of the equation's largest terms at the exact solution (the residual's round-off
# scale): O(beta) (convection) to O((2 beta pi)^2) (wave), O(1 / nu) at Burgers' shocks,
# O(w) for the oscillator; the manufactured problems' O((a pi)^2) and O(pi^2).
SCALE = {
    "convection": 40.0,
    "reaction": 5.0,
    "wave": (10 * math.pi) ** 2,
    "burgers": 25.0,
    "allen_cahn": 10.0 * math.pi**2,
    "helmholtz": (4 * math.pi) ** 2,
    "oscillator": 10.0,
}


def test_every_problem_is_registered():
    assert set(pinn.PROBLEM_NAMES) == set(SCALE)
    assert pinn.ANCHOR_PROBLEMS == ("convection", "reaction", "wave")


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
def test_exact_solution_satisfies_the_equation(name):
    problem = pinn.make_problem(name)
    z = interior_points(problem)
    residual = jax.vmap(lambda p: pinn.equation_residual(problem, problem.solution, p))(z)
    assert residual.shape == (64, problem.n_outputs if problem.n_inputs == 1 else 1)
    assert float(jnp.max(jnp.abs(residual))) < 1e-12 * SCALE[name]
    if problem.n_inputs == 2:  # the scalar (x, t) form agrees
        scalar = jax.vmap(lambda p: pinn.pde_residual(problem, problem.exact, p[0], p[1]))(z)
        np.testing.assert_allclose(scalar, residual[:, 0], atol=1e-12 * SCALE[name])


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
def test_a_perturbed_solution_does_not_satisfy_the_equation(name):
    problem = pinn.make_problem(name)
    z = interior_points(problem)
    wrong = lambda p: problem.solution(p) * (1 + 0.1 * p[-1])  # off by 10% t at time t
    residual = jax.vmap(lambda p: pinn.equation_residual(problem, wrong, p))(z)
    assert float(jnp.max(jnp.abs(residual))) > 0.05


def _helmholtz_source(z, a=4.0, k=1.0):
    x, y = z
    return (
        (k**2 - math.pi**2 - (a * math.pi) ** 2) * jnp.sin(math.pi * x) * jnp.sin(a * math.pi * y)
    )


def _allen_cahn_source(z, d=1e-3):
    x, t = z
    u = jnp.exp(-t) * x**2 * jnp.cos(math.pi * x)
    u_xx = jnp.exp(-t) * (
        2 * jnp.cos(math.pi * x)
        - 4 * math.pi * x * jnp.sin(math.pi * x)
        - math.pi**2 * x**2 * jnp.cos(math.pi * x)
    )
    return -u - d * u_xx + 5 * (u**3 - u)


@pytest.mark.parametrize(
    "name, source", [("helmholtz", _helmholtz_source), ("allen_cahn", _allen_cahn_source)]
)
def test_manufactured_source_matches_its_closed_form(name, source):
    # The operator vanishes at u = 0 for both, so the residual of u = 0 is minus the source,
    # which the module computes by autodiff of the exact solution; the oracle is by hand.
    problem = pinn.make_problem(name)
    z = interior_points(problem)
    zero = lambda p: jnp.zeros((1,), p.dtype)
    residual = jax.vmap(lambda p: pinn.equation_residual(problem, zero, p))(z)[:, 0]
    np.testing.assert_allclose(residual, -jax.vmap(source)(z), rtol=1e-11, atol=1e-11)


def test_burgers_shocks_and_oscillator_closed_form():
    burgers = pinn.make_problem("burgers")
    # Far from the shocks u sits at its states 1 | 0 | -1; they merge at t = 0.8 near x = 0.
    u = burgers.exact(jnp.array([-0.9, 0.0, 0.9, -0.5, 0.5]), jnp.array([0, 0, 0, 1, 1.0]))
    np.testing.assert_allclose(u, [1, 0, -1, 1, -1], atol=3e-3)  # exp(-0.5 / (2 nu))
    assert abs(float(burgers.exact(0.0, 1.0))) < 1e-12  # symmetric: u(-x) = -u(x)
    oscillator = pinn.make_problem("oscillator")
    np.testing.assert_allclose(oscillator.initial(None), [1.0, 0.0], atol=1e-15)
    # y2 is the velocity over w: y1' = w y2, checked against a central difference
    t, h = 0.37, 1e-5
    slope = (oscillator.exact(t + h)[0] - oscillator.exact(t - h)[0]) / (2 * h)
    np.testing.assert_allclose(slope, 10.0 * oscillator.exact(t)[1], rtol=1e-8)
    # against scipy's integrator at a tight tolerance (an independent oracle)
    from scipy.integrate import solve_ivp

    w, zeta = 10.0, 0.1
    found = solve_ivp(
        lambda _, y: [w * y[1], -w * y[0] - 2 * zeta * w * y[1]],
        (0, 1),
        [1.0, 0.0],
        t_eval=np.linspace(0, 1, 11),
        rtol=1e-12,
        atol=1e-12,
        method="DOP853",
    )
    np.testing.assert_allclose(
        oscillator.exact(jnp.linspace(0, 1, 11)), found.y.T, rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
def test_exact_solution_meets_initial_and_boundary_conditions(name):
    problem = pinn.make_problem(name)
    points = pinn.collocation(problem, **SMALL)
    np.testing.assert_allclose(
        problem.solution(points.initial).reshape(points.initial_values.shape),
        points.initial_values,
        atol=1e-14,
    )
    if problem.n_inputs == 1:
        return
    x_min, x_max = problem.x_range
    xs = jnp.linspace(x_min, x_max, 33)
    ts = jnp.linspace(*problem.t_range, 33)
    if not problem.steady:
        np.testing.assert_allclose(problem.exact(xs, 0.0 * xs), problem.initial(xs), atol=1e-14)
    lower, upper = problem.exact(x_min + 0 * ts, ts), problem.exact(x_max + 0 * ts, ts)
    if problem.periodic:
        np.testing.assert_allclose(lower, upper, atol=1e-12)
    elif name in ("wave", "helmholtz"):
        np.testing.assert_allclose(lower, 0.0, atol=1e-12)
        np.testing.assert_allclose(upper, 0.0, atol=1e-12)
    if problem.steady:
        np.testing.assert_allclose(problem.exact(xs, -1.0 + 0 * xs), 0.0, atol=1e-12)
        np.testing.assert_allclose(problem.exact(xs, 1.0 + 0 * xs), 0.0, atol=1e-12)
    if problem.initial_velocity:
        u_t = jax.vmap(jax.grad(problem.exact, argnums=1), in_axes=(0, None))(xs, 0.0)
        np.testing.assert_allclose(u_t, 0.0, atol=1e-12)


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
def test_loss_is_not_trivially_zero_at_init_and_zero_at_the_solution(name):
    problem = pinn.make_problem(name)
    points = pinn.collocation(problem, **SMALL)
    total, terms = pinn.loss_terms(network_for(problem, 3), problem, points)
    assert float(total) > 1e-2, terms
    assert all(float(v) > 0 for v in terms.values()), terms
    error = pinn.relative_l2_error(network_for(problem, 3), problem, pinn.evaluation_grid(problem))
    assert float(error) > 0.1


def test_make_problem_rejects_bad_input():
    with pytest.raises(ValueError, match="convection, reaction, wave, burgers"):
        pinn.make_problem("heat")
    with pytest.raises(ValueError, match="coefficient"):
        pinn.make_problem("wave", float("nan"))
    assert pinn.make_problem("convection", 30).coefficient == 30.0
    with pytest.raises(ValueError, match="equation_residual"):
        pinn.pde_residual(pinn.make_problem("oscillator"), lambda x, t: t, 0.0, 0.5)


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
def test_collocation_points(name):
    problem = pinn.make_problem(name)
    points = pinn.collocation(problem, **SMALL)
    d = problem.n_inputs
    res = np.asarray(points.residual)
    assert res.shape == (60, d) and len(np.unique(res, axis=0)) == 60
    assert np.all(pinn.grid_interior(problem, res))
    grid = pinn.evaluation_grid(problem, 21, 11)
    assert grid.shape == (231, d)
    assert np.sum(pinn.grid_interior(problem, grid)) == (229 if d == 1 else 19 * 9)
    assert all(a.dtype == jnp.float64 for a in points)
    again = pinn.collocation(problem, **SMALL)
    np.testing.assert_array_equal(points.residual, again.residual)  # seeded
    if d == 1:
        assert points.initial.shape == (1, 1) and points.boundary_lower.shape == (0, 1)
        assert points.initial_values.shape == (1, problem.n_outputs)
        return
    x_min, x_max = problem.x_range
    lower, upper = np.asarray(points.boundary_lower), np.asarray(points.boundary_upper)
    if problem.steady:
        assert points.initial.shape == (0, 2) and lower.shape == (11 + 21, 2)
        assert np.all((lower[:11, 0] == x_min) & (upper[:11, 0] == x_max))
        assert np.all((lower[11:, 1] == -1) & (upper[11:, 1] == 1))
        return
    assert points.initial.shape == (21, 2) and np.all(np.asarray(points.initial[:, 1]) == 0)
    np.testing.assert_allclose(points.initial_values, problem.initial(points.initial[:, 0]))
    assert np.all(lower[:, 0] == x_min) and np.all(upper[:, 0] == x_max)
    np.testing.assert_array_equal(lower[:, 1], upper[:, 1])
    assert lower.shape == (11, 2)


def test_collocation_rejects_bad_sizes():
    problem = pinn.make_problem("reaction")
    with pytest.raises(ValueError, match="n_residual"):
        pinn.collocation(problem, n_x=5, n_t=5, n_residual=10)  # interior holds 9
    with pytest.raises(ValueError, match="n_x"):
        pinn.collocation(problem, n_x=2)
    with pytest.raises(ValueError, match="dtype"):
        pinn.collocation(problem, dtype=jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_mlp_init_statistics(dtype):
    widths = (200, 300, 100)
    params = pinn.init_mlp(jax.random.PRNGKey(0), widths, dtype=dtype)
    sizes = (2, *widths, 1)
    assert len(params) == 4
    for layer, fan_in, fan_out in zip(params, sizes[:-1], sizes[1:], strict=True):
        w, b = np.asarray(layer["w"], np.float64), np.asarray(layer["b"])
        assert layer["w"].dtype == dtype and layer["b"].dtype == dtype
        assert w.shape == (fan_in, fan_out) and b.shape == (fan_out,)
        assert np.all(b == 0)
        std = math.sqrt(2.0 / (fan_in + fan_out))  # Xavier (Glorot) normal
        tolerance = 4 / math.sqrt(2 * w.size)  # ~4 standard errors of a sample std
        assert abs(w.std() / std - 1) < tolerance, (fan_in, fan_out, w.std(), std)
        assert abs(w.mean()) < 4 * std / math.sqrt(w.size)
    with pytest.raises(ValueError, match="widths"):
        pinn.init_mlp(jax.random.PRNGKey(0), ())


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_loss_terms_are_nonnegative_and_sum_to_the_total(name, dtype):
    problem = pinn.make_problem(name)
    points = pinn.collocation(problem, **SMALL, dtype=dtype)
    params = network_for(problem, 1, dtype=dtype)
    total, terms = jax.jit(pinn.make_loss(problem, points))(params)
    expected = {"residual", "initial", "boundary"}
    if name == "wave":
        expected.add("initial_velocity")
    if name == "helmholtz":
        expected.remove("initial")
    if name == "oscillator":
        expected.remove("boundary")
    assert set(terms) == expected
    assert total.dtype == dtype and total.shape == ()
    for value in terms.values():
        assert value.shape == () and float(value) >= 0
    rtol = 1e-6 if dtype == jnp.float32 else 1e-14
    np.testing.assert_allclose(float(total), sum(float(v) for v in terms.values()), rtol=rtol)
    error = pinn.relative_l2_error(params, problem, pinn.evaluation_grid(problem, 11, 11))
    assert 0 < float(error) < 10


def test_mismatched_collocation_sizes_raise():
    problem = pinn.make_problem("convection")
    points = pinn.collocation(problem, **SMALL)
    params = pinn.init_mlp(jax.random.PRNGKey(0), (4,))
    cases = {
        "initial_values": points._replace(initial_values=points.initial_values[:-1]),
        "boundary_upper": points._replace(boundary_upper=points.boundary_upper[:-2]),
        "residual": points._replace(residual=jnp.zeros((5, 3))),
    }
    for name, bad in cases.items():
        with pytest.raises(ValueError, match=name):
            pinn.loss_terms(params, problem, bad)
        with pytest.raises(ValueError, match=name):
            pinn.make_loss(problem, bad)


def _counting_loss(problem, points, counter):
    """make_loss's function, counting its evaluations on the host."""
    loss_fn = pinn.make_loss(problem, points)

    def counted(params):
        total, terms = loss_fn(params)
        jax.debug.callback(lambda: counter.__setitem__("n", counter["n"] + 1))
        return total, terms

    return counted


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.adam(1e-2),
        pytest.param(lambda: optax.lbfgs(memory_size=20), marks=pytest.mark.slow),
        pytest.param(
            lambda: tp.adam_lbfgs(
                1e-2, second=optax.lbfgs(memory_size=20), policy=tp.switch_at(10)
            ),
            marks=pytest.mark.slow,
        ),
        pytest.param(lambda: tp.adam_cg(1e-2, policy=tp.switch_at(10)), marks=pytest.mark.slow),
    ],
    ids=["adam", "lbfgs", "adam_lbfgs", "adam_cg"],
)
def test_tiny_training_lowers_the_loss_within_budget(make):
    problem = pinn.make_problem("reaction")
    points = pinn.collocation(problem, **SMALL)
    params = pinn.init_mlp(jax.random.PRNGKey(0), (10, 10))
    counter = {"n": 0}
    budget = 40
    log = pinn.train(
        _counting_loss(problem, points, counter), params, make(), budget=budget, log_points=4
    )
    assert log.loss[-1] < 0.8 * log.loss[0]
    assert log.cost[0] == 0 and np.all(np.diff(log.cost) >= 0) and log.cost[-1] <= budget
    assert log.cost[-1] > budget - 16  # stopped by the budget, not early
    assert len(log.loss) == len(log.cost) == len(log.phase) == len(log.terms["residual"])
    np.testing.assert_allclose(sum(log.terms.values()), log.loss, rtol=1e-12)
    # The host saw every counted evaluation, one per logged point, and at most the
    # evaluations of the one step discarded at the budget.
    in_steps = counter["n"] - len(log.loss)
    assert log.cost[-1] <= in_steps <= log.cost[-1] + 16, (in_steps, log.cost[-1])
    two_phase = isinstance(log.state, tp.TwoPhaseState)
    assert (log.switch_cost is not None) == two_phase
    if two_phase:  # 10 Adam steps at one evaluation each
        assert log.switch_cost == 10 and log.phase[-1] == 1
        assert int(tp.info(log.state).switch_step) == 10


def test_train_rejects_a_bad_budget():
    problem = pinn.make_problem("reaction")
    points = pinn.collocation(problem, **SMALL)
    params = pinn.init_mlp(jax.random.PRNGKey(0), (4,))
    with pytest.raises(ValueError, match="budget"):
        pinn.train(pinn.make_loss(problem, points), params, optax.adam(1e-3), budget=0)


@pytest.mark.slow  # ~20 s
def test_hyperparameter_sweeps_compile_once():
    problem = pinn.make_problem("reaction")
    points = pinn.collocation(problem, **SMALL)
    params = pinn.init_mlp(jax.random.PRNGKey(0), (4,))
    loss_fn = pinn.make_loss(problem, points)

    def make(h):
        return tp.adam_cg(h["lr"], policy=tp.switch_at(h["switch"]))

    runs = [
        pinn.train(loss_fn, params, make, budget=budget, log_points=2, hyperparams=h)
        for budget, h in [(12, {"lr": 1e-2, "switch": 3}), (15, {"lr": 3e-2, "switch": 6})]
    ]
    assert runs[0].compile_seconds > 0 and runs[1].compile_seconds == 0
    assert [r.switch_cost for r in runs] == [3, 6]
    assert runs[0].cost[-1] <= 12 and 10 < runs[1].cost[-1] <= 15
    with pytest.raises(ValueError, match="optimizer"):
        pinn.train(loss_fn, params, optax.adam(1e-3), budget=5, hyperparams={"lr": 1.0})


def _chain(lr, k1, k2, memory_size=20):
    """Adam -> L-BFGS -> Newton-CG as a nested two_phase (benchmarks/pinn.py's chain): the
    first Newton-CG step is step ``k2``, the first L-BFGS step ``k1``."""
    inner = tp.adam_lbfgs(lr, second=optax.lbfgs(memory_size=memory_size), policy=tp.switch_at(k1))
    return tp.two_phase(inner, tp.newton_cg(), tp.switch_at(k2))


@pytest.mark.slow  # compiles a Newton-CG training loop: ~30-60 s on 2 shared cores
@pytest.mark.parametrize(
    "make, last_stage",
    [
        (lambda: tp.adam_newton_cg(1e-2, policy=tp.switch_at(10)), 1),
        (lambda: _chain(1e-2, 10, 16), 2),
        (lambda: tp.newton_cg(), 1),
    ],
    ids=["adam_newton_cg", "adam_lbfgs_newton_cg", "newton_cg"],
)
def test_newton_cg_cost_charges_hvps_and_keeps_a_strict_budget(make, last_stage):
    problem = pinn.make_problem("reaction")
    points = pinn.collocation(problem, **SMALL)
    params = pinn.init_mlp(jax.random.PRNGKey(0), (10, 10))
    counter = {"n": 0}
    budget = 301  # Newton-CG steps cost half-integers: 1.5 per HVP
    log = pinn.train(
        _counting_loss(problem, points, counter), params, make(), budget=budget, log_points=4
    )
    jax.effects_barrier()
    assert log.loss[-1] < 0.5 * log.loss[0]
    assert log.hessian_vector_products > 0
    assert log.cost[-1] == log.evaluations + tp.HVP_COST * log.hessian_vector_products
    assert log.cost[0] == 0 and np.all(np.diff(log.cost) >= 0) and log.cost[-1] <= budget
    # The host saw one call per counted evaluation and per HVP (the callback fires once in
    # an HVP's forward-over-reverse pass), plus one per logged point, plus what the one step
    # discarded at the budget made (at most 100 HVPs and a line search).
    in_steps = counter["n"] - len(log.loss)
    counted = log.evaluations + log.hessian_vector_products
    assert counted <= in_steps <= counted + 130, (in_steps, counted)
    assert log.zero_steps is not None and all(z is not None for z in log.zero_steps[-1:])
    if isinstance(log.state, tp.TwoPhaseState):
        assert log.switch_cost == 10
    assert log.phase[-1] == last_stage


@pytest.mark.slow  # ~60 s on 2 shared cores, mostly compilation
def test_nested_chain_enters_newton_cg_at_its_step_and_compiles_once(count_traces):
    problem = pinn.make_problem("reaction")
    points = pinn.collocation(problem, **SMALL)
    params = pinn.init_mlp(jax.random.PRNGKey(0), (6, 6))
    value_fn = lambda p: pinn.loss_terms(p, problem, points)[0]
    k1, k2, steps = 3, 7, 10
    opt = _chain(1e-2, k1, k2, memory_size=5)

    @jax.jit
    @count_traces
    def step(p, s):
        value, grad = jax.value_and_grad(value_fn)(p)
        u, s = opt.update(grad, s, p, value=value, value_fn=value_fn)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    stages, counts = [], []
    for _ in range(steps):
        params, state = step(params, state)
        outer, inner = state, state.first_state
        assert isinstance(inner, tp.TwoPhaseState)
        stages.append(int(inner.phase) + int(outer.phase))
        counts.append(
            (
                int(tp.info(inner).value_and_grad_evals),  # L-BFGS's
                int(tp.info(outer).value_and_grad_evals),  # Newton-CG's
                int(tp.info(outer).hessian_vector_products),
            )
        )
    assert count_traces.counter["n"] == 1 and step._cache_size() == 1
    # The stage after step t: Adam decides at step k1 - 1 to switch, the outer switch
    # counts every step (Adam's and L-BFGS's) and decides at step k2 - 1.
    assert stages == [0] * (k1 - 1) + [1] * (k2 - k1) + [2] * (steps - k2 + 1)
    assert int(tp.info(state.first_state).switch_step) == k1
    assert int(tp.info(state).switch_step) == k2
    lbfgs_evals = [c[0] for c in counts]
    newton = [c[1:] for c in counts]
    assert lbfgs_evals[k1 - 1] == 0 < lbfgs_evals[k1]  # L-BFGS starts at step k1
    assert len(set(lbfgs_evals[k2 - 1 :])) == 1  # ... and stops at step k2
    assert newton[k2 - 1] == (0, 0) and newton[k2][0] > 0 and newton[k2][1] > 0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_train_rejects_a_non_finite_budget():
    problem = pinn.make_problem("reaction")
    points = pinn.collocation(problem, **SMALL)
    params = pinn.init_mlp(jax.random.PRNGKey(0), (4,))
    for bad in (float("nan"), float("inf"), 0.5, True):
        with pytest.raises(ValueError, match="budget"):
            pinn.train(pinn.make_loss(problem, points), params, optax.adam(1e-3), budget=bad)


@pytest.mark.parametrize("name", SLOW_BUT_ONE)
def test_gauss_newton_loss_is_the_loss_and_its_products_are_jtj(name):
    problem = pinn.make_problem(name)
    points = pinn.collocation(problem, n_x=9, n_t=7, n_residual=12)
    params = network_for(problem, 2, (3,))
    objective = pinn.make_gauss_newton_loss(problem, points)
    total, _ = pinn.loss_terms(params, problem, points)
    np.testing.assert_allclose(float(objective(params)), float(total), rtol=1e-13)
    # Oracle: the Gauss-Newton matrix sum_k (2 / n_k) J_k^T J_k from explicit Jacobians of
    # the unscaled residual vectors.
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jacobians = jax.jacfwd(lambda f: pinn.residuals(unravel(f), problem, points))(flat)
    gn = sum((2.0 / j.shape[0]) * j.T @ j for j in jacobians.values())
    v = jax.random.normal(jax.random.PRNGKey(3), flat.shape, flat.dtype)
    product = objective.product(params)(unravel(v))
    np.testing.assert_allclose(
        np.asarray(jax.flatten_util.ravel_pytree(product)[0]), np.asarray(gn @ v), rtol=1e-10
    )


@pytest.mark.parametrize("name", SLOW_BUT_ONE)
def test_pointwise_jacobian_is_the_jacobian_of_the_scaled_residuals(name):
    # Oracle: forward mode over the whole residual vector of make_gauss_newton_loss (whose
    # half sum of squares is the loss), against reverse mode per point under vmap.
    problem = pinn.make_problem(name)
    points = pinn.collocation(problem, n_x=9, n_t=7, n_residual=12)
    params = network_for(problem, 4, (5, 4))
    terms = pinn.pointwise_terms(problem, points)
    jacobian = pinn.pointwise_jacobian(params, terms)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    objective = pinn.make_gauss_newton_loss(problem, points)
    whole = jax.jacfwd(lambda f: objective.residual_fn(unravel(f)))(flat)
    expected = jnp.concatenate([whole[k] for k in terms])
    assert jacobian.shape == (sum(t.size for t in terms.values()), flat.size)
    np.testing.assert_allclose(jacobian, expected, rtol=1e-10, atol=1e-12)
    # each term's per-point function, mapped over its data, is the residual the loss squares
    found = pinn.residuals(params, problem, points)
    for term_name, term in terms.items():
        rows = jax.vmap(term.fn, (None, 0))(params, term.data).reshape(-1)
        np.testing.assert_array_equal(rows, found[term_name])
        assert term.size == rows.size and term.scale == math.sqrt(2.0 / rows.size)
