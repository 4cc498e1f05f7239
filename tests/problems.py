"""Classic unconstrained test problems (More, Garbow & Hillstrom 1981) in JAX,
and checks shared by the tests of several second phases."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def rosenbrock_x0(n):
    x0 = np.ones(n)
    x0[::2] = -1.2
    return jnp.asarray(x0)


def extended_powell(x):
    x = x.reshape(-1, 4)
    a, b, c, d = x[:, 0], x[:, 1], x[:, 2], x[:, 3]
    return jnp.sum((a + 10 * b) ** 2 + 5 * (c - d) ** 2 + (b - 2 * c) ** 4 + 10 * (a - d) ** 4)


def extended_powell_x0(n):
    return jnp.asarray(np.tile([3.0, -1.0, 0.0, 1.0], n // 4))


def trigonometric(x):
    n = x.shape[0]
    i = jnp.arange(1, n + 1, dtype=x.dtype)
    r = n - jnp.sum(jnp.cos(x)) + i * (1.0 - jnp.cos(x)) - jnp.sin(x)
    return jnp.sum(r**2)


def beale(x):
    a, b = x[0], x[1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def spd_quadratic(n, condition, seed, dtype=jnp.float64):
    """``f(x) = 0.5 x^T A x - b^T x`` with a random SPD ``A`` of the given condition."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.logspace(0, np.log10(condition), n)
    a = (q * eig) @ q.T
    a = 0.5 * (a + a.T)
    b = rng.standard_normal(n)
    a_j, b_j = jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    def f(x):
        return 0.5 * x @ (a_j @ x) - b_j @ x

    return f, a, b


def exact_step_cg_iterations(a, b, rule, *, tol=1e-8, max_iterations=None, powell=None):
    """Iterations nonlinear CG with analytically exact steps needs on ``0.5 x'Ax - b'x``.

    A float64 NumPy oracle for the direction rules themselves: the step is
    ``-<g, d> / <d, A d>`` (exact up to rounding), the betas are the textbook
    formulas (Polak-Ribiere+, Hager-Zhang with its lower bound, eta = 0.01),
    with Powell's restart test when ``powell`` is given. Returns the number of
    iterations to reach ``||g|| <= tol ||g0||`` from ``x = 0``, or ``None``.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    n = b.size
    max_iterations = 10 * n if max_iterations is None else max_iterations
    x = np.zeros(n)
    g = -b
    d = -g
    g0 = np.linalg.norm(b)
    for k in range(max_iterations):
        x = x - (g @ d) / (d @ a @ d) * d
        g_new = a @ x - b
        if np.linalg.norm(g_new) <= tol * g0:
            return k + 1
        y = g_new - g
        dy = d @ y
        if rule == "fletcher_reeves":
            beta = (g_new @ g_new) / (g @ g)
        elif rule == "polak_ribiere":
            beta = max(0.0, (g_new @ y) / (g @ g))
        elif rule == "hestenes_stiefel":
            beta = (g_new @ y) / dy
        elif rule == "dai_yuan":
            beta = (g_new @ g_new) / dy
        elif rule == "hager_zhang":
            beta = (y - 2 * d * (y @ y) / dy) @ g_new / dy
            beta = max(beta, -1 / (np.linalg.norm(d) * min(0.01, np.linalg.norm(g))))
        else:
            raise ValueError(rule)
        restart = powell is not None and abs(g_new @ g) >= powell * (g_new @ g_new)
        d = -g_new if restart else -g_new + beta * d
        g = g_new
    return None


# --------------------------------------------------------------------------- #
# Checks shared by the tests of nonlinear_cg, newton_cg and the switch.


def run_steps_keeping_types(step, params, state, steps):
    """``steps`` calls of ``step(params, state) -> (updates, state)``; each must
    give updates with the parameters' dtypes and a state of unchanged shapes and
    dtypes. Returns the final ``(params, state)``."""
    for _ in range(steps):
        u, new_state = step(params, state)
        chex.assert_trees_all_equal_dtypes(u, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        params, state = optax.apply_updates(params, u), new_state
    return params, state


def assert_update_needs_value_fn(opt):
    """``opt.update`` without ``value_fn`` raises a TypeError naming it."""
    x = jnp.ones(2)
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(x, opt.init(x), x)


def uphill_quadratic():
    """``sum((x - 1)^2)`` with a gradient of the wrong sign (its value is right):
    every line search along the negative "gradient" fails."""
    f = lambda x: jnp.sum((x - 1.0) ** 2)

    @jax.custom_vjp
    def uphill(x):
        return f(x)

    uphill.defvjp(lambda x: (f(x), x), lambda x, ct: (-ct * jax.grad(f)(x),))
    return uphill


def jitted_loop(opt, f, x0, steps, wrap=lambda fn: fn):
    """``steps`` jitted calls of a second phase's ``update`` on ``f`` from ``x0``
    (``wrap`` wraps the traced function, e.g. the ``count_traces`` fixture).
    Returns the final ``(x, state)``."""
    step = jax.jit(wrap(lambda x, s: opt.update(x, s, x, value_fn=f)))
    state, x = opt.init(x0), x0
    for _ in range(steps):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
    return x, state


def run_second_phase(opt, f, x0, *, max_iter=500, gtol=1e-5, jit=True):
    """Calls a second phase's ``update`` on ``f`` from ``x0`` (jitted unless ``jit=False``)
    until the gradient norm is at most ``gtol`` or ``max_iter`` calls. Returns the final
    ``(x, state)``."""
    state = opt.init(x0)
    step = lambda x, s: opt.update(x, s, x, value_fn=f)
    if jit:
        step = jax.jit(step)
    x = x0
    for _ in range(max_iter):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
        if bool(jnp.isfinite(state.value)) and float(optax.tree.norm(state.grad)) <= gtol:
            break
    return x, state
