"""Tests for twophase.second_phase.nystrom and newton_cg(preconditioner="nystrom"): the sketch
against closed forms, the preconditioned spectrum, scipy's minimiser, refreshes, counting,
non-finite guards, dtypes, compilation and bad arguments."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import twophase as tp
from tests import problems
from twophase.second_phase import nystrom


def low_rank_psd(n, rank, seed=0):
    """An ``n x n`` positive semi-definite matrix of exactly ``rank``, eigenvalues 1 to 1e4."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    return basis @ np.diag(np.logspace(0.0, 4.0, rank)) @ basis.T


def sketch_of(matrix, rank, seed=0):
    n = matrix.shape[0]
    return nystrom.nystrom_sketch(
        lambda v: jnp.asarray(matrix) @ v, jax.random.key(seed), n, rank, jnp.float64
    )


# --------------------------------------------------------------------------- the sketch


@pytest.mark.parametrize("rank", [6, 10])
def test_sketch_is_exact_for_a_matrix_of_lower_rank(rank):
    # Nystrom with a sketch at least the rank of a PSD matrix reproduces it exactly
    # (Frangella et al. 2023, Lemma A.1).
    a = low_rank_psd(30, 6)
    basis, eigenvalues = sketch_of(a, rank)
    assert basis.shape == (30, rank) and eigenvalues.shape == (rank,)
    np.testing.assert_allclose(basis.T @ basis, np.eye(rank), atol=1e-10)
    np.testing.assert_allclose(basis @ np.diag(eigenvalues) @ basis.T, a, atol=1e-8 * 1e4)
    np.testing.assert_allclose(
        np.sort(np.asarray(eigenvalues))[-6:], np.logspace(0.0, 4.0, 6), rtol=1e-8
    )
    assert np.all(np.asarray(eigenvalues) >= 0)


def test_sketch_of_a_lower_rank_captures_the_top_of_a_decaying_spectrum():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    spectrum = 10.0 ** -np.arange(40.0)  # fast decay: a rank-8 sketch is accurate
    a = q @ np.diag(spectrum) @ q.T
    basis, eigenvalues = sketch_of(a, 8)
    # The error of a rank-r Nystrom sketch is of the order of the (r+1)-th eigenvalue
    # (1e-8) times a constant of the random test matrix (Frangella et al. 2023, Lemma 5.4).
    np.testing.assert_allclose(np.asarray(eigenvalues)[:4], spectrum[:4], rtol=0, atol=1e-5)
    error = np.linalg.norm(basis @ np.diag(eigenvalues) @ basis.T - a, 2)
    assert error < 1e-5


def test_indefinite_matrix_gives_a_finite_positive_semidefinite_sketch():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    a = q @ np.diag(np.r_[np.logspace(0, 3, 10), -np.logspace(0, 2, 10)]) @ q.T
    basis, eigenvalues = sketch_of(a, 12)
    assert np.all(np.isfinite(basis)) and np.all(np.isfinite(eigenvalues))
    assert np.all(np.asarray(eigenvalues) >= 0)
    assert np.any(np.asarray(eigenvalues) > 0)
    apply = nystrom.nystrom_inverse(basis, eigenvalues, jnp.asarray(1e-2))
    inverse = np.stack([np.asarray(apply(e)) for e in jnp.eye(20)])
    np.testing.assert_allclose(inverse, inverse.T, atol=1e-10)
    assert np.linalg.eigvalsh(inverse).min() > 0


def test_nonfinite_products_give_the_identity():
    basis, eigenvalues = nystrom.nystrom_sketch(
        lambda v: v * jnp.nan, jax.random.key(0), 10, 4, jnp.float64
    )
    chex.assert_trees_all_equal(eigenvalues, jnp.zeros(4))
    chex.assert_trees_all_equal(basis, jnp.zeros((10, 4)))
    r = jnp.arange(10.0)
    chex.assert_trees_all_close(nystrom.nystrom_inverse(basis, eigenvalues, 1.0)(r), r)


@pytest.mark.parametrize("rank, on_range", [(5, 1.0 + 0.1), (8, 0.1)])
def test_preconditioned_spectrum_of_an_exact_sketch(rank, on_range):
    # P^{-1} (A + mu I) = (lam_min + mu) on A's range and mu on its null space (Frangella et
    # al. (5.3) with an exact sketch): preconditioned CG converges in at most two iterations.
    # lam_min is the sketch's smallest eigenvalue: 1 for a sketch of A's rank 5; 0 for a
    # larger sketch, whose extra columns see only A's null space (then all of it is mu).
    a, mu = low_rank_psd(25, 5), 0.1
    basis, eigenvalues = sketch_of(a, rank)
    apply = nystrom.nystrom_inverse(basis, eigenvalues, jnp.asarray(mu))
    inverse = np.stack([np.asarray(apply(e)) for e in jnp.eye(25)])
    spectrum = np.sort(np.linalg.eigvals(inverse @ (a + mu * np.eye(25))).real)
    np.testing.assert_allclose(spectrum[:20], mu, rtol=1e-6)
    np.testing.assert_allclose(spectrum[20:], on_range, rtol=1e-6)


# --------------------------------------------------------------------------- newton_cg


def singular_quadratic(n=25, rank=5):
    """``0.5 x^T A x - b^T x`` with ``A`` PSD of rank 5, ``b`` in its range."""
    a = jnp.asarray(low_rank_psd(n, rank))
    b = a @ jnp.asarray(np.random.default_rng(2).standard_normal(n))
    return (lambda x: 0.5 * x @ a @ x - b @ x), a, b


def test_first_inner_solve_takes_one_product_instead_of_rank_plus_one():
    f, _, _ = singular_quadratic()
    x = jnp.zeros(25)
    counts = {}
    for name, kwargs in {"plain": {}, "nystrom": dict(preconditioner="nystrom")}.items():
        opt = tp.newton_cg(damping=0.1, forcing=1e-10, sketch_size=8, **kwargs)
        _, state = opt.update(x, opt.init(x), x, value_fn=f)
        counts[name] = int(state.hessian_vector_products)
    assert counts["plain"] >= 5  # five distinct eigenvalues plus the damping's
    # The sketch, then one inner iteration: the gradient lies in A's range, where the
    # preconditioned operator is a multiple of the identity.
    assert counts["nystrom"] == 8 + 1


def test_refresh_schedule_and_product_count():
    f, x0 = problems.rosenbrock, problems.rosenbrock_x0(6)
    opt = tp.newton_cg(preconditioner="nystrom", sketch_size=4, sketch_refresh=3)
    state, x = opt.init(x0), x0
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    inner = 0
    for k in range(7):
        before = int(state.hessian_vector_products)
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
        due = k % 3 == 0
        inner += int(state.hessian_vector_products) - before - (4 if due else 0)
        assert int(state.sketch.sketches) == k // 3 + 1
        assert int(state.sketch.age) == k % 3 + 1
    # Iterations 0, 3 and 6 sketched: every product is either the sketch's or an inner one.
    assert inner >= 7
    assert int(state.hessian_vector_products) == 3 * 4 + inner


@pytest.mark.parametrize(
    "name, f, x0",
    [
        ("rosenbrock-20", problems.rosenbrock, problems.rosenbrock_x0(20)),
        ("powell-12", problems.extended_powell, problems.extended_powell_x0(12)),
        ("beale", problems.beale, jnp.array([1.0, 1.0])),
    ],
)
def test_same_minimiser_as_scipy_newton_cg(name, f, x0):
    opt = tp.newton_cg(preconditioner="nystrom", sketch_size=8, sketch_refresh=5)
    x, state = problems.run_second_phase(opt, f, x0, max_iter=300, gtol=1e-7)
    assert float(optax.tree.norm(state.grad)) <= 1e-7, name
    # Compiled callbacks: scipy runs up to 2000 iterations on Powell's singular minimiser,
    # and op-by-op products made this oracle take minutes.
    value, grad = jax.jit(f), jax.jit(jax.grad(f))
    hessp = jax.jit(lambda x, p: jax.jvp(jax.grad(f), (x,), (p,))[1])
    ref = scipy.optimize.minimize(
        lambda x: float(value(jnp.asarray(x))),
        np.asarray(x0),
        jac=lambda x: np.asarray(grad(jnp.asarray(x))),
        hessp=lambda x, p: np.asarray(hessp(jnp.asarray(x), jnp.asarray(p))),
        method="Newton-CG",
        options=dict(xtol=1e-14, maxiter=2000),
    )
    np.testing.assert_allclose(np.asarray(x), ref.x, atol=2e-3)
    assert int(state.nonfinite_events) == 0


def test_jitted_loop_with_refreshes_compiles_once(count_traces):
    f, x0 = problems.rosenbrock, problems.rosenbrock_x0(6)
    opt = tp.newton_cg(preconditioner="nystrom", sketch_size=3, sketch_refresh=2)
    _, state = problems.jitted_loop(opt, f, x0, 30, count_traces)
    assert count_traces.counter["n"] == 1
    assert int(state.sketch.sketches) >= 2


def test_nonfinite_products_never_reach_the_parameters():
    @jax.custom_jvp
    def poisoned(x):
        return jnp.sum(x**2)

    # The gradient is finite, every curvature product is NaN.
    poisoned.defjvps(lambda t, ans, x: jnp.sum(2 * x * t) * jnp.nan)
    f = lambda x: jnp.sum((x - 1.0) ** 2) + 0.0 * poisoned(x)
    opt = tp.newton_cg(preconditioner="nystrom", sketch_size=2)
    x = jnp.array([3.0, -2.0, 0.5])
    state = opt.init(x)
    for _ in range(3):
        u, state = opt.update(x, state, x, value_fn=f)
        assert bool(jnp.all(jnp.isfinite(u)))
        x = optax.apply_updates(x, u)
    assert bool(jnp.all(jnp.isfinite(x)))
    assert bool(jnp.all(jnp.isfinite(state.sketch.basis)))
    assert int(state.nonfinite_events) >= 1


def test_pytree_params_with_mixed_dtypes_and_low_precision():
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones((2, 2), jnp.float32)}
    target = {"a": jnp.full(3, 2.0), "b": -jnp.ones((2, 2))}
    f = lambda p: sum(jnp.sum((p[k].astype(jnp.float32) - target[k]) ** 2) for k in ("a", "b"))
    opt = tp.newton_cg(preconditioner="nystrom", sketch_size=60)
    state = opt.init(params)
    assert state.sketch.basis.shape == (7, 7)  # the rank is capped at the parameter count
    assert state.sketch.basis.dtype == jnp.float32
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    for _ in range(5):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
    chex.assert_trees_all_equal_dtypes(
        params, {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones((2, 2), jnp.float32)}
    )
    np.testing.assert_allclose(np.asarray(params["a"], np.float32), 2.0, atol=1e-2)
    np.testing.assert_allclose(np.asarray(params["b"]), -1.0, atol=1e-5)


def test_empty_and_none_params():
    opt = tp.newton_cg(preconditioner="nystrom")
    u, state = opt.update(None, opt.init(None), None, value_fn=lambda p: jnp.zeros([]))
    assert u is None and int(state.sketch.sketches) == 0
    params = {"a": jnp.ones(3), "c": jnp.zeros((0,))}
    f = lambda p: jnp.sum((p["a"] - 2.0) ** 2) + jnp.sum(p["c"])
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    u, state = step(params, opt.init(params))
    assert state.sketch.basis.shape == (3, 3) and int(state.sketch.sketches) == 1
    # One damped Newton step (damping 1e-3 against curvature 2).
    np.testing.assert_allclose(np.asarray(optax.apply_updates(params, u)["a"]), 2.0, atol=1e-3)
    assert u["c"].shape == (0,)


def test_adam_newton_cg_nystrom_switches_once_compiled(count_traces):
    f, a, b = problems.spd_quadratic(20, 1e4, seed=0)
    x_star = np.linalg.solve(a, b)
    x0 = jnp.zeros(20)
    opt = tp.adam_newton_cg(
        1e-2, second=tp.newton_cg(preconditioner="nystrom", sketch_size=4), policy=tp.switch_at(5)
    )
    step = jax.jit(count_traces(lambda x, s: opt.update(x, s, x, value=f(x), value_fn=f)))
    state, x = opt.init(x0), x0
    for _ in range(40):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
    assert count_traces.counter["n"] == 1
    info = tp.info(state)
    assert int(info.switches) == 1
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_star), atol=1e-6)
    # The sketches' products are charged: at least one sketch of four products.
    assert int(info.hessian_vector_products) >= 4 + int(state.second_state.iterations)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(preconditioner="nystrum"), "preconditioner"),
        (dict(sketch_size=0), "sketch_size"),
        (dict(sketch_size=2.5), "sketch_size"),
        (dict(sketch_refresh=0), "sketch_refresh"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        tp.newton_cg(**kwargs)


def test_adam_newton_cg_rejects_an_unknown_precondition():
    with pytest.raises(ValueError, match="`precondition`"):
        tp.adam_newton_cg(precondition="diag")
