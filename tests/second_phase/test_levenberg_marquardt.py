"""Levenberg-Marquardt against independent oracles.

Oracles: ``scipy.optimize.least_squares(method="lm")`` (MINPACK) on small
nonlinear least squares, Jacobians and Gauss-Newton matrices from ``jax.jacfwd``
of the whole residual vector, Nielsen's formula, and on a PINN ``optax.lbfgs`` at
equal wall time.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import twophase as tp
from twophase.second_phase import jacobian as jac
from twophase.second_phase import levenberg_marquardt as lm

jax.config.update("jax_enable_x64", True)

SOLVERS = ["dense", "matrix_free"]


# --------------------------------------------------------------------------- problems


def rosenbrock(p):
    """Rosenbrock's function as two residuals; minimum 0 at (1, 1)."""
    return jnp.stack([10.0 * (p[1] - p[0] ** 2), 1.0 - p[0]])


EXP_X = np.linspace(0.0, 3.0, 40)
EXP_Y = 2.5 * np.exp(-1.3 * EXP_X) + 0.4 + 0.01 * np.sin(7 * EXP_X)


def exponential(p):
    """``a exp(-b x) + c - y`` on 40 points (nonzero residual at the minimum)."""
    return p[0] * jnp.exp(-p[1] * EXP_X) + p[2] - EXP_Y


MLP_X = np.linspace(-2.0, 2.0, 30)
MLP_TEACHER = np.array([1.5, -1.0, 0.7, 0.3, -0.5, 0.9, 1.0, -0.7, 0.5, 0.2])


def mlp(p, x):
    """A 1-3-1 tanh network (10 parameters)."""
    w1, b1, w2, b2 = p[:3], p[3:6], p[6:9], p[9]
    return jnp.tanh(x[:, None] * w1 + b1) @ w2 + b2


MLP_Y = np.asarray(mlp(MLP_TEACHER, MLP_X)) + 0.05 * np.cos(11.0 * MLP_X)


def mlp_residuals(p):
    """The network fitting a teacher's output plus a wiggle (nonzero residual)."""
    return mlp(p, MLP_X) - MLP_Y


PROBLEMS = {
    "rosenbrock": (rosenbrock, np.array([-1.2, 1.0])),
    "exponential": (exponential, np.array([1.0, 0.5, 0.0])),
    "mlp": (mlp_residuals, MLP_TEACHER + 0.1 * np.cos(np.arange(10.0))),
}


def run_lm(residual_fn, x0, steps, **kwargs):
    """``(params, state, executables)`` after ``steps`` jitted updates on ``0.5 ||r||^2``."""
    objective = tp.gauss_newton_objective(residual_fn, reduction="half_sum")
    opt = tp.levenberg_marquardt(**kwargs)
    params = jnp.asarray(x0)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        u, s = opt.update(p, s, p, value_fn=objective)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return params, state, step._cache_size()


# --------------------------------------------------------------------------- scipy oracle


def scipy_lm(residual_fn, x0, scaling="marquardt"):
    """MINPACK's Levenberg-Marquardt with the exact Jacobian, to convergence;
    ``D`` from the Jacobian's column norms (``x_scale="jac"``) or the identity."""
    fun, jacobian = jax.jit(residual_fn), jax.jit(jax.jacfwd(residual_fn))
    return scipy.optimize.least_squares(
        lambda x: np.asarray(fun(x)),
        np.asarray(x0, np.float64),
        jac=lambda x: np.asarray(jacobian(x)),
        method="lm",
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        x_scale="jac" if scaling == "marquardt" else 1.0,
    )


@pytest.mark.parametrize(
    ("scaling", "solver"),
    [
        ("identity", "dense"),
        ("marquardt", "matrix_free"),
        pytest.param("marquardt", "dense", marks=pytest.mark.slow),
        pytest.param("identity", "matrix_free", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_matches_scipy_lm(name, scaling, solver):
    residual_fn, x0 = PROBLEMS[name]
    ref = scipy_lm(residual_fn, x0, scaling)
    assert ref.success
    # A tight CG tolerance: the matrix-free path then takes MINPACK's exact steps
    # (inexact ones may lead the network to another local minimum).
    extra = {"cg_tolerance": 1e-10} if solver == "matrix_free" else {}
    params, state, executables = run_lm(
        residual_fn, x0, 150, scaling=scaling, solver=solver, **extra
    )
    cost = 0.5 * float(jnp.sum(residual_fn(params) ** 2))
    assert executables == 1
    assert cost <= ref.cost * (1 + 1e-8) + 1e-20
    assert float(state.value) == pytest.approx(cost, rel=1e-12, abs=1e-24)
    if name == "mlp":  # saturated units: a flat direction, compare the fits
        np.testing.assert_allclose(residual_fn(params), ref.fun, atol=1e-6)
    else:
        np.testing.assert_allclose(params, ref.x, rtol=1e-6, atol=1e-8)


def test_geodesic_acceleration_converges_on_rosenbrock():
    params, state, _ = run_lm(rosenbrock, [-1.2, 1.0], 60, geodesic=True)
    np.testing.assert_allclose(params, [1.0, 1.0], atol=1e-10)
    assert int(state.hessian_vector_products) > 0  # the second derivatives were taken


# --------------------------------------------------------------------------- stages


def test_nielsen_rule():
    mu, nu = jnp.asarray(4.0), jnp.asarray(8.0)
    for rho in (0.1, 0.5, 0.9, 1.7):
        got, growth = lm.nielsen_damping(mu, nu, jnp.asarray(rho), jnp.asarray(True), 1e10)
        assert float(got) == pytest.approx(4.0 * max(1 / 3, 1 - (2 * rho - 1) ** 3))
        assert float(growth) == 2.0
    got, growth = lm.nielsen_damping(mu, nu, jnp.asarray(-1.0), jnp.asarray(False), 1e10)
    assert (float(got), float(growth)) == (32.0, 16.0)


def test_dense_and_matrix_free_steps_agree():
    rng = np.random.default_rng(0)
    jmat = rng.normal(size=(30, 12))
    gram, grad = jnp.asarray(jmat.T @ jmat), jnp.asarray(rng.normal(size=12))
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, size=12))
    expected = -np.linalg.solve(jmat.T @ jmat + 0.3 * np.diag(scaling), grad)
    dense, _ = lm.dense_step(gram, grad, scaling, jnp.asarray(0.3))
    sketch = tp.NystromSketch(jnp.zeros((12, 4)), jnp.zeros(4), 0, 0)
    free, _, finite = lm.matrix_free_step(
        lambda v: gram @ v, grad, scaling, jnp.asarray(0.3), sketch, 1e-12, 100
    )
    np.testing.assert_allclose(dense, expected, rtol=1e-9)
    np.testing.assert_allclose(free, expected, rtol=1e-7)
    assert bool(finite)


def pointwise_fit(has_aux=False, reduction="term_means"):
    """Two terms: an exponential fit (scalar residual per point) and a
    two-entry penalty per point."""
    x = jnp.asarray(EXP_X)
    fit = (lambda p, d: p[0] * jnp.exp(-p[1] * d[0]) + p[2] - d[1], (x, jnp.asarray(EXP_Y)))
    pair = (lambda p, d: jnp.stack([p[0] - d, p[1] * d]), jnp.linspace(0.0, 0.1, 5))
    return tp.pointwise_residuals({"fit": fit, "pair": pair}, has_aux=has_aux, reduction=reduction)


def dense_model(objective, params):
    """``(value, w J^T r, w J^T J)`` from ``jax.jacfwd`` of the whole residual vector."""
    vec = lambda p: jax.flatten_util.ravel_pytree(objective.residual_fn(p))[0]
    r, jmat = vec(params), jax.jacfwd(vec)(params)
    w = objective.weight(params)
    return 0.5 * w * r @ r, w * jmat.T @ r, w * jmat.T @ jmat


@pytest.mark.parametrize(
    ("kind", "chunk", "reduction"),
    [
        ("pointwise", None, "term_means"),
        ("pointwise", 3, "mean"),
        ("pointwise", 7, "half_sum"),
        ("rows", None, "term_means"),
        ("rows", 7, "term_means"),
        ("columns", None, "term_means"),
        ("columns", 2, "term_means"),
    ],
)
def test_linearize_matches_jacfwd(kind, chunk, reduction):
    objective = pointwise_fit(reduction=reduction)
    params = jnp.asarray([1.0, 0.5, 0.1])
    if kind == "rows":  # M = 50 residuals > P = 3 would take columns: widen P instead
        params = jnp.concatenate([params, jnp.zeros(60)])
        inner = objective
        objective = tp.gauss_newton_objective(
            lambda p: inner.residual_fn(p[:3]) | {"extra": p[3:]}, reduction="half_sum"
        )
    elif kind == "columns":
        objective = tp.gauss_newton_objective(objective.residual_fn, reduction="half_sum")
    value, grad, gram = dense_model(objective, params)
    got = jax.jit(lambda p: jac.linearize(objective, p, "gram", chunk=chunk))(params)
    np.testing.assert_allclose(got.value, value, rtol=1e-12)
    np.testing.assert_allclose(got.gradient, grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got.curvature, gram, rtol=1e-10, atol=1e-14)
    diag = jax.jit(lambda p: jac.linearize(objective, p, "diagonal", chunk=chunk))(params)
    diag = diag.curvature
    np.testing.assert_allclose(diag, np.diag(gram), rtol=1e-10, atol=1e-14)


def test_term_means_is_the_pinn_loss():
    objective = pointwise_fit(reduction="term_means")
    p = np.array([1.0, 0.5, 0.1])
    fit = p[0] * np.exp(-p[1] * EXP_X) + p[2] - EXP_Y
    d = np.linspace(0.0, 0.1, 5)
    pair = np.stack([p[0] - d, p[1] * d], axis=1)
    assert float(objective(jnp.asarray(p))) == pytest.approx(
        np.mean(fit**2) + np.mean(pair**2), rel=1e-12
    )


# --------------------------------------------------------------------------- contract


def test_has_aux_reports_the_terms_at_the_accepted_point():
    objective = pointwise_fit(has_aux=True)
    opt = tp.levenberg_marquardt()
    params = jnp.asarray([1.0, 0.5, 0.1])
    state = tp.prepare_aux(opt.init(params), objective, params)
    step = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=objective))
    for _ in range(5):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    loss, terms = objective(params)
    assert float(state.value) == pytest.approx(float(loss), rel=1e-12)
    for name in ("fit", "pair"):
        assert float(state.aux[name]) == pytest.approx(float(terms[name]), rel=1e-12)
    assert step._cache_size() == 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_two_phase_switches_to_lm_and_beats_adam(solver):
    objective = tp.gauss_newton_objective(exponential, reduction="half_sum")
    x0 = jnp.asarray([1.0, 0.5, 0.0])

    def train(opt, steps=40):
        params, state = x0, opt.init(x0)

        @jax.jit
        def step(p, s):
            value, grad = jax.value_and_grad(objective)(p)
            u, s = opt.update(grad, s, p, value=value, value_fn=objective)
            return optax.apply_updates(p, u), s

        for _ in range(steps):
            params, state = step(params, state)
        return params, state, step._cache_size()

    opt = tp.two_phase(optax.adam(1e-2), tp.levenberg_marquardt(solver=solver), tp.switch_at(10))
    params, state, executables = train(opt)
    adam_params, _, _ = train(optax.adam(1e-2))
    ref = scipy_lm(exponential, x0)
    assert int(tp.info(state).phase) == 1
    assert executables == 1
    assert float(objective(params)) == pytest.approx(ref.cost, rel=1e-8)
    assert float(objective(params)) < 1e-3 * float(objective(adam_params))
    assert int(tp.info(state).value_and_grad_evals) > 0


def test_checkpoint_round_trip(tmp_path):
    objective = pointwise_fit(has_aux=True)
    opt = tp.levenberg_marquardt()
    params = jnp.asarray([1.0, 0.5, 0.1])
    state = tp.prepare_aux(opt.init(params), objective, params)
    step = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=objective))
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    tp.save_checkpoint(tmp_path, 3, {"params": params, "state": state})
    target = {"params": params, "state": tp.prepare_aux(opt.init(params), objective, params)}
    _, restored = tp.restore_checkpoint(tmp_path, target)
    same = jax.tree.map(np.array_equal, restored["state"], state)
    assert all(jax.tree.leaves(same))
    a, _ = step(params, state)
    b, _ = step(restored["params"], restored["state"])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32(solver):
    params, state, _ = run_lm(
        lambda p: exponential(p).astype(jnp.float32),
        np.array([1.0, 0.5, 0.0], np.float32),
        60,
        solver=solver,
    )
    ref = scipy_lm(exponential, [1.0, 0.5, 0.0])
    assert params.dtype == jnp.float32 and state.value.dtype == jnp.float32
    np.testing.assert_allclose(params, ref.x, rtol=1e-3)


# --------------------------------------------------------------------------- bad input


def test_value_fn_not_in_residual_form():
    opt = tp.levenberg_marquardt()
    params = jnp.zeros(2)
    with pytest.raises(TypeError, match="gauss_newton_objective"):
        opt.update(params, opt.init(params), params, value_fn=lambda p: jnp.sum(p**2))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("damping", 0.0),
        ("damping", float("nan")),
        ("max_damping", -1.0),
        ("max_damping", 1e-4),  # below damping
        ("dense_max_params", -1),
        ("dense_max_params", 2.5),
        ("memory_limit", 0),
        ("scaling", "diag"),
        ("solver", "qr"),
        ("geodesic_ratio", 0.0),
        ("jacobian_chunk", 0),
        ("cg_tolerance", 1.0),
        ("max_cg_iterations", 0),
        ("sketch_size", 0),
        ("sketch_refresh", 0),
        ("seed", -1),
    ],
)
def test_bad_arguments(name, value):
    with pytest.raises(ValueError, match=name):
        tp.levenberg_marquardt(**{name: value})


def test_dense_path_that_does_not_fit_says_so():
    opt = tp.levenberg_marquardt(solver="dense", memory_limit=1e6)
    with pytest.raises(ValueError, match=r"1000 parameters.*GiB"):
        opt.init(jnp.zeros(1000))
    # "auto" above the crossover takes the matrix-free path instead.
    state = tp.levenberg_marquardt(dense_max_params=999, memory_limit=1e6).init(jnp.zeros(1000))
    assert state.gram.shape == (0, 0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_nonfinite_trial_is_rejected_and_damping_rises(solver):
    # log(x) is NaN for x < 0: the nearly undamped first step from x = 1 is
    # -r / r' = -3, to x = -2.
    def residuals(p):
        return jnp.log(p) + 3.0

    objective = tp.gauss_newton_objective(residuals, reduction="half_sum")
    opt = tp.levenberg_marquardt(damping=1e-9, solver=solver)
    params = jnp.asarray([1.0])
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=objective))
    update, first = step(params, state)
    assert float(update[0]) == 0.0
    assert int(first.rejected_steps) == 1 and int(first.nonfinite_events) == 1
    assert int(first.consecutive_failures) == 1
    update, second = step(params, first)
    assert float(second.damping) > float(first.damping)
    params, state, _ = run_lm(residuals, [1.0], 80, damping=1e-9, solver=solver)
    assert float(params[0]) == pytest.approx(np.exp(-3.0), rel=1e-10)


def test_nonfinite_residuals_here_reject_and_count():
    objective = tp.gauss_newton_objective(lambda p: jnp.log(p) - 1.0, reduction="half_sum")
    opt = tp.levenberg_marquardt()
    params = jnp.asarray([-1.0, 2.0])
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=objective))
    for _ in range(3):
        update, state = step(params, state)
        assert np.array_equal(update, np.zeros(2))
    assert int(state.consecutive_failures) == 3 and int(state.rejected_steps) == 3
    assert int(state.nonfinite_events) >= 1
    assert float(state.damping) > 0 and bool(jnp.isfinite(state.damping))


# --------------------------------------------------------------------------- several devices

DEVICES_SCRIPT = """
import json, sys
import chex
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import twophase as tp

assert jax.device_count() == 4, jax.devices()
X = np.linspace(0.0, 3.0, 40)
Y = 2.5 * np.exp(-1.3 * X) + 0.4 + 0.01 * np.sin(7 * X)


def run(sharded, solver):
    mesh = Mesh(np.array(jax.devices()), ("points",))
    if sharded:
        data, replicated = NamedSharding(mesh, P("points")), NamedSharding(mesh, P())
    else:
        data = replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    x, y = jax.device_put(X, data), jax.device_put(Y, data)
    opt = tp.levenberg_marquardt(solver=solver)
    params = jax.device_put(jnp.asarray([1.0, 0.5, 0.0]), replicated)
    state = jax.device_put(opt.init(params), replicated)

    @jax.jit
    def step(p, s, x, y):
        objective = tp.pointwise_residuals(
            {"fit": (lambda q, d: q[0] * jnp.exp(-q[1] * d[0]) + q[2] - d[1], (x, y))}
        )
        u, s = opt.update(p, s, p, value_fn=objective)
        return optax.apply_updates(p, u), s

    for _ in range(12):
        params, state = step(params, state, x, y)
    return {
        "params": np.asarray(params).tolist(),
        "value": float(state.value),
        "executables": step._cache_size(),
        "shards": len(x.addressable_shards),
    }


out = {f"{solver}_{sharded}": run(sharded, solver)
       for solver in ("dense", "matrix_free") for sharded in (True, False)}
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
def test_sharded_residual_points_match_one_device(tmp_path):
    script, out = tmp_path / "lm_devices.py", tmp_path / "out.json"
    script.write_text(textwrap.dedent(DEVICES_SCRIPT))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    ref = scipy_lm(exponential, [1.0, 0.5, 0.0])
    for solver in ("dense", "matrix_free"):
        sharded, single = result[f"{solver}_True"], result[f"{solver}_False"]
        assert sharded["shards"] == 4 and single["shards"] == 1
        assert sharded["executables"] == 1
        np.testing.assert_allclose(sharded["params"], single["params"], rtol=1e-10)
        np.testing.assert_allclose(sharded["params"], ref.x, rtol=1e-6)


# --------------------------------------------------------------------------- a PINN


def reaction_objective(problem, points):
    """The reaction PINN's loss (each term's mean square, summed), point by point."""
    from twophase.experiments import pinn

    def pde(params, point):
        return pinn.pde_residual(problem, lambda x, t: pinn.mlp(params, x, t), point[0], point[1])

    def initial(params, datum):
        return pinn.mlp(params, datum[0][0], datum[0][1]) - datum[1]

    def boundary(params, pair):
        return pinn.mlp(params, pair[0][0], pair[0][1]) - pinn.mlp(params, pair[1][0], pair[1][1])

    return tp.pointwise_residuals(
        {
            "residual": (pde, points.residual),
            "initial": (initial, (points.initial, points.initial_values)),
            "boundary": (boundary, (points.boundary_lower, points.boundary_upper)),
        }
    )


def run_for(step, carry, seconds):
    """Repeats the jitted ``step`` (compiled first) for ``seconds`` of wall time,
    LAPACK on one thread: on a CPU shared with other processes OpenBLAS's
    spinning threads made a 281 x 281 Cholesky a hundred times slower."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    carry = jax.block_until_ready(step(*carry))
    with threadpoolctl.threadpool_limits(1):
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            carry = jax.block_until_ready(step(*carry))
    return carry


@pytest.mark.slow
def test_pinn_reaction_lm_beats_lbfgs_at_equal_wall_time():
    from twophase.experiments import pinn

    problem = pinn.make_problem("reaction")
    points = pinn.collocation(problem, n_x=51, n_t=51, n_residual=400)
    objective = reaction_objective(problem, points)
    loss = lambda p: pinn.loss_terms(p, problem, points)[0]
    assert float(objective(pinn.init_mlp(jax.random.key(0), (10,) * 3))) == pytest.approx(
        float(loss(pinn.init_mlp(jax.random.key(0), (10,) * 3))), rel=1e-12
    )
    adam = optax.adam(1e-2)

    @jax.jit
    def adam_steps(p, s):
        def body(_, c):
            u, s = adam.update(jax.grad(loss)(c[0]), c[1], c[0])
            return optax.apply_updates(c[0], u), s

        return jax.lax.fori_loop(0, 500, body, (p, s))

    start = pinn.init_mlp(jax.random.key(0), (10,) * 3)
    start, _ = adam_steps(start, adam.init(start))

    lm_opt = tp.levenberg_marquardt()

    @jax.jit
    def lm_steps(p, s):
        for _ in range(5):
            u, s = lm_opt.update(p, s, p, value_fn=objective)
            p = optax.apply_updates(p, u)
        return p, s

    lbfgs = optax.lbfgs(memory_size=100)
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def lbfgs_steps(p, s):
        def body(_, c):
            v, g = value_and_grad(c[0], state=c[1])
            u, s = lbfgs.update(g, c[1], c[0], value=v, grad=g, value_fn=loss)
            return optax.apply_updates(c[0], u), s

        return jax.lax.fori_loop(0, 50, body, (p, s))

    lm_params, _ = run_for(lm_steps, (start, lm_opt.init(start)), 10.0)
    lbfgs_params, _ = run_for(lbfgs_steps, (start, lbfgs.init(start)), 10.0)
    lm_loss, lbfgs_loss = float(loss(lm_params)), float(loss(lbfgs_params))
    assert np.isfinite(lm_loss)
    assert lm_loss < 0.1 * lbfgs_loss, (lm_loss, lbfgs_loss, float(loss(start)))


# ------------------------------------------------ the objective changing under the model


def _tanh_fit(target):
    return tp.gauss_newton_objective(lambda p: jnp.tanh(p["w"]) - 0.5 * jnp.tanh(target))


def test_changed_objective_mid_run_is_minimised():
    """Resampled data (a PINN's residual points) after convergence: the model of the
    old objective is dropped, not kept forever (the closed-form minimiser)."""
    opt = tp.levenberg_marquardt()

    @jax.jit
    def step(p, s, target):
        u, s = opt.update(p, s, p, value_fn=_tanh_fit(target))
        return optax.apply_updates(p, u), s

    t1, t2 = jnp.array([1.0, 2.0, 3.0]), jnp.array([-1.0, 0.0, 1.0])
    p, s = {"w": jnp.zeros(3)}, opt.init({"w": jnp.zeros(3)})
    for _ in range(12):
        p, s = step(p, s, t1)
    chex.assert_trees_all_close(p["w"], jnp.arctanh(0.5 * jnp.tanh(t1)), atol=1e-6)
    for _ in range(12):
        p, s = step(p, s, t2)
    chex.assert_trees_all_close(p["w"], jnp.arctanh(0.5 * jnp.tanh(t2)), atol=1e-6)


def test_recheck_keeps_the_model_of_an_unchanged_objective():
    """At a converged point every step is rejected; the recheck costs one evaluation
    a call and no Jacobian while the objective stays the same."""
    opt = tp.levenberg_marquardt()
    f = _tanh_fit(jnp.array([1.0, 2.0, 3.0]))
    step = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=f))
    p, s = {"w": jnp.zeros(3)}, opt.init({"w": jnp.zeros(3)})
    for _ in range(30):
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
    assert int(s.consecutive_failures) >= 4
    jacobians = int(s.jacobian_evals)
    for _ in range(3):
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
    assert int(s.jacobian_evals) == jacobians


def test_recheck_model_drops_a_stale_model_and_its_damping():
    opt = tp.levenberg_marquardt()
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)._replace(
        value=jnp.asarray(5.0, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32),
        linearized=jnp.asarray(True),
        damping=jnp.asarray(1e6),
        consecutive_failures=jnp.asarray(3, jnp.int32),
    )
    f = _tanh_fit(jnp.ones(3))
    new = lm.recheck_model(state, f, params)
    assert not bool(new.linearized) and float(new.damping) == 0.0
    assert int(new.consecutive_failures) == 0
    assert int(new.value_and_grad_evals) == int(state.value_and_grad_evals) + 1
    same = lm.recheck_model(state._replace(value=f(params).astype(state.value.dtype)), f, params)
    assert bool(same.linearized) and float(same.damping) == 1e6
