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


def interior_points(problem, n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(*problem.x_range, n)
    t = rng.uniform(0.0, 1.0, n)
    return jnp.asarray(x), jnp.asarray(t)


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
def test_exact_solution_satisfies_the_pde(name):
    problem = pinn.make_problem(name)
    x, t = interior_points(problem)
    residual = jax.vmap(lambda a, b: pinn.pde_residual(problem, problem.exact, a, b))(x, t)
    # the terms of the residual are O(beta) (convection) to O((2 beta pi)^2) (wave)
    scale = {"convection": 40.0, "reaction": 5.0, "wave": (10 * math.pi) ** 2}[name]
    assert float(jnp.max(jnp.abs(residual))) < 1e-12 * scale


def test_residual_is_not_trivially_zero():
    problem = pinn.make_problem("convection")
    x, t = interior_points(problem)
    wrong = lambda a, b: jnp.sin(a - 30.0 * b)  # solves beta = 30, not 40
    residual = jax.vmap(lambda a, b: pinn.pde_residual(problem, wrong, a, b))(x, t)
    assert float(jnp.max(jnp.abs(residual))) > 1.0


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
def test_exact_solution_meets_initial_and_boundary_conditions(name):
    problem = pinn.make_problem(name)
    x_min, x_max = problem.x_range
    xs = jnp.linspace(x_min, x_max, 33)
    ts = jnp.linspace(0.0, 1.0, 33)
    np.testing.assert_allclose(problem.exact(xs, 0.0 * xs), problem.initial(xs), atol=1e-14)
    lower, upper = problem.exact(x_min + 0 * ts, ts), problem.exact(x_max + 0 * ts, ts)
    if problem.periodic:
        np.testing.assert_allclose(lower, upper, atol=1e-12)
    else:
        np.testing.assert_allclose(lower, 0.0, atol=1e-12)
        np.testing.assert_allclose(upper, 0.0, atol=1e-12)
    if problem.initial_velocity:
        u_t = jax.vmap(jax.grad(problem.exact, argnums=1), in_axes=(0, None))(xs, 0.0)
        np.testing.assert_allclose(u_t, 0.0, atol=1e-12)


def test_make_problem_rejects_bad_input():
    with pytest.raises(ValueError, match="convection, reaction, wave"):
        pinn.make_problem("burgers")
    with pytest.raises(ValueError, match="coefficient"):
        pinn.make_problem("wave", float("nan"))
    assert pinn.make_problem("convection", 30).coefficient == 30.0


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
def test_collocation_points(name):
    problem = pinn.make_problem(name)
    points = pinn.collocation(problem, **SMALL)
    x_min, x_max = problem.x_range
    res = np.asarray(points.residual)
    assert res.shape == (60, 2) and len(np.unique(res, axis=0)) == 60
    assert np.all((res[:, 0] > x_min) & (res[:, 0] < x_max))
    assert np.all((res[:, 1] > 0) & (res[:, 1] < 1))
    assert points.initial.shape == (21, 2) and np.all(np.asarray(points.initial[:, 1]) == 0)
    np.testing.assert_allclose(points.initial_values, problem.initial(points.initial[:, 0]))
    assert np.all(np.asarray(points.boundary_lower[:, 0]) == x_min)
    assert np.all(np.asarray(points.boundary_upper[:, 0]) == x_max)
    np.testing.assert_array_equal(points.boundary_lower[:, 1], points.boundary_upper[:, 1])
    assert points.boundary_lower.shape == (11, 2)
    assert all(a.dtype == jnp.float64 for a in points)
    grid = pinn.evaluation_grid(problem, 21, 11)
    assert grid.shape == (231, 2)
    again = pinn.collocation(problem, **SMALL)
    np.testing.assert_array_equal(points.residual, again.residual)  # seeded


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
    params = pinn.init_mlp(jax.random.PRNGKey(1), (8, 8), dtype=dtype)
    total, terms = jax.jit(pinn.make_loss(problem, points))(params)
    expected = {"residual", "initial", "boundary"}
    if name == "wave":
        expected.add("initial_velocity")
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
        lambda: optax.lbfgs(memory_size=20),
        lambda: tp.adam_lbfgs(1e-2, second=optax.lbfgs(memory_size=20), policy=tp.switch_at(10)),
        lambda: tp.adam_cg(1e-2, policy=tp.switch_at(10)),
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


@pytest.mark.parametrize("name", pinn.PROBLEM_NAMES)
def test_gauss_newton_loss_is_the_loss_and_its_products_are_jtj(name):
    problem = pinn.make_problem(name)
    points = pinn.collocation(problem, n_x=9, n_t=7, n_residual=12)
    params = pinn.init_mlp(jax.random.PRNGKey(2), (3,))
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
