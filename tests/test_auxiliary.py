"""Tests for twophase.auxiliary: objectives returning ``(loss, aux)`` in every second
phase, in two_phase and in full_batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp

KEY = jax.random.split(jax.random.PRNGKey(7), 3)
X = jax.random.normal(KEY[0], (40, 5), jnp.float64)
Y = jnp.tanh(X @ jax.random.normal(KEY[1], (5,), jnp.float64)) + 0.1


def terms(p):
    """Two loss terms of a small nonlinear least-squares fit, and their sum."""
    r = jnp.tanh(X @ p["w"] + p["b"]) - Y
    fit = jnp.mean(r**2)
    penalty = 1e-2 * jnp.sum(p["w"] ** 2)
    return fit + penalty, {"fit": fit, "penalty": penalty}


def scalar(p):
    return terms(p)[0]


PARAMS = {"w": jnp.full(5, 0.3, jnp.float64), "b": jnp.zeros((), jnp.float64)}

SECOND_PHASES = {
    "nonlinear_cg": tp.nonlinear_cg,
    "newton_cg": tp.newton_cg,
    "lbfgs": lambda: tp.evaluating(optax.lbfgs()),
}


def _run(opt, value_fn, steps, params=PARAMS):
    step = jax.jit(lambda p, s: opt.update(None, s, p, value_fn=value_fn))
    state = opt.init(params)
    for _ in range(steps):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize(
    "name",
    # ~7 s each: nonlinear_cg stays in the fast suite.
    [
        pytest.param(n, marks=pytest.mark.slow) if n != "nonlinear_cg" else n
        for n in sorted(SECOND_PHASES)
    ],
)
def test_every_second_phase_returns_the_aux_of_its_accepted_point(name):
    params, state = _run(SECOND_PHASES[name](), terms, 6)
    ref_params, _ = _run(SECOND_PHASES[name](), scalar, 6)
    # The aux changes nothing on the path...
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), params, ref_params)
    # ...and is that of the current (accepted) point, as tp.info reports it.
    expected = terms(params)[1]
    for got in (state.aux, tp.info(state).aux):
        assert set(got) == {"fit", "penalty"}
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-10)
    assert float(tp.info(state).value) < float(scalar(PARAMS))


@pytest.mark.parametrize("name", ["nonlinear_cg", "newton_cg"])
def test_aux_costs_no_extra_evaluation_in_cg_and_newton_cg(name):
    _, with_aux = _run(SECOND_PHASES[name](), terms, 5)
    _, without = _run(SECOND_PHASES[name](), scalar, 5)
    assert int(with_aux.value_and_grad_evals) == int(without.value_and_grad_evals)


def test_aux_is_none_without_one():
    _, state = _run(tp.nonlinear_cg(), scalar, 2)
    assert state.aux is None and tp.info(state).aux is None


@pytest.mark.parametrize(
    "preset",
    [
        lambda: tp.adam_cg(0.05, policy=tp.switch_at(3)),
        lambda: tp.adam_lbfgs(0.05, policy=tp.switch_at(3)),
        pytest.param(
            lambda: tp.adam_newton_cg(0.05, policy=tp.switch_at(3)), marks=pytest.mark.slow
        ),
    ],
    ids=["adam_cg", "adam_lbfgs", "adam_newton_cg"],
)
def test_two_phase_with_aux_in_a_scan_compiles_once(preset, count_traces):
    opt = preset()

    @count_traces
    def body(carry, _):
        params, state = carry
        value, grad = jax.value_and_grad(scalar)(params)
        updates, state = opt.update(grad, state, params, value=value, value_fn=terms)
        return (optax.apply_updates(params, updates), state), tp.info(state).phase

    state = tp.prepare_aux(opt.init(PARAMS), terms, PARAMS)
    (params, state), phases = jax.lax.scan(body, (PARAMS, state), None, length=8)
    assert count_traces.counter["n"] == 1
    assert list(np.asarray(phases)) == [0, 0, 1, 1, 1, 1, 1, 1]
    expected = terms(params)[1]
    aux = tp.info(state).aux
    for key in expected:
        np.testing.assert_allclose(aux[key], expected[key], rtol=1e-10)

    # Same path as the scalar objective's.
    @jax.jit
    def ref_step(p, s):
        value, grad = jax.value_and_grad(scalar)(p)
        u, s = opt.update(grad, s, p, value=value, value_fn=scalar)
        return optax.apply_updates(p, u), s

    ref = PARAMS, opt.init(PARAMS)
    for _ in range(8):
        ref = ref_step(*ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9), params, ref[0])


def test_two_phase_without_prepare_aux_retraces_once_then_never(count_traces):
    opt = tp.adam_cg(0.05, policy=tp.switch_at(2))

    @jax.jit
    @count_traces
    def step(params, state):
        value, grad = jax.value_and_grad(scalar)(params)
        updates, state = opt.update(grad, state, params, value=value, value_fn=terms)
        return optax.apply_updates(params, updates), state

    params, state = PARAMS, opt.init(PARAMS)
    for _ in range(6):
        params, state = step(params, state)
    assert count_traces.counter["n"] == 2  # the aux field's structure is set by the first call
    assert int(tp.info(state).phase) == 1 and tp.info(state).aux is not None


def _wrong_gradient(f):
    """``f`` with the sign of its gradient flipped: every direction a second
    phase computes from it is uphill, so its line search finds no decrease."""

    @jax.custom_vjp
    def g(p):
        return f(p)

    def fwd(p):
        return f(p), p

    def bwd(p, ct):
        return (jax.tree.map(lambda x: -ct * x, jax.grad(f)(p)),)

    g.defvjp(fwd, bwd)
    return g


def test_returns_to_adam_keep_the_aux_structure():
    # A return re-initialises the second phase: its aux field must keep its
    # structure (lax.cond would reject a change). Every CG trial here stalls.
    wrong = _wrong_gradient(scalar)

    def bad_terms(p):
        return wrong(p), terms(p)[1]

    opt = tp.adam_cg(0.05, policy=tp.from_detector(tp.switch_at(2), fallback=1))
    params, state = PARAMS, tp.prepare_aux(opt.init(PARAMS), bad_terms, PARAMS)

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(scalar)(params)
        updates, state = opt.update(grad, state, params, value=value, value_fn=bad_terms)
        return optax.apply_updates(params, updates), state

    for _ in range(12):
        params, state = step(params, state)
    diagnostics = tp.info(state)
    assert int(diagnostics.fallbacks) >= 2
    assert int(diagnostics.zero_steps) >= int(diagnostics.fallbacks)
    assert set(diagnostics.aux) == {"fit", "penalty"}
    assert step._cache_size() == 1


@pytest.mark.parametrize("name", sorted(SECOND_PHASES))
def test_malformed_aux_is_rejected_at_trace_time(name):
    opt = SECOND_PHASES[name]()
    state = opt.init(PARAMS)
    with pytest.raises(ValueError, match="pytree of scalars"):
        opt.update(None, state, PARAMS, value_fn=lambda p: (scalar(p), {"r": p["w"]}))
    with pytest.raises(TypeError, match="scalar objective"):
        opt.update(None, state, PARAMS, value_fn=lambda p: (p["w"], scalar(p)))


@pytest.mark.parametrize("name", ["nonlinear_cg", "lbfgs"])
def test_zero_steps_are_counted_and_never_move_uphill(name):
    bad = _wrong_gradient(scalar)
    params, state = _run(SECOND_PHASES[name](), bad, 4)
    assert int(tp.info(state).linesearch_failures) >= 1
    assert int(tp.info(state).zero_steps) == int(tp.info(state).linesearch_failures)
    assert float(scalar(params)) <= float(scalar(PARAMS))


def test_zero_steps_are_counted_over_trials_in_two_phase():
    bad = _wrong_gradient(scalar)
    opt = tp.adam_lbfgs(0.05, policy=tp.from_detector(tp.switch_at(2), fallback=2))

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(scalar)(params)
        updates, state = opt.update(grad, state, params, value=value, value_fn=bad)
        return optax.apply_updates(params, updates), state

    params, state = PARAMS, opt.init(PARAMS)
    for _ in range(12):
        params, state = step(params, state)
    diagnostics = tp.info(state)
    assert int(diagnostics.fallbacks) >= 2  # each stall returned to Adam
    assert int(diagnostics.zero_steps) >= 2 * int(diagnostics.fallbacks)


# --- full_batch(has_aux=True) ------------------------------------------------------------


def chunk_terms(w, batch):
    x, y = batch
    r = x @ w - y
    return jnp.mean(r**2), {"mae": jnp.mean(jnp.abs(r)), "bias": jnp.mean(r)}


@pytest.mark.parametrize("batch_size", [None, 8, 7])
def test_full_batch_aux_is_the_exact_full_data_mean(batch_size):
    x = jax.random.normal(KEY[2], (30, 5), jnp.float64)
    y = x @ jnp.arange(5.0) + 1.0
    w = jnp.ones(5, jnp.float64)
    value_fn = tp.full_batch(chunk_terms, (x, y), batch_size=batch_size, has_aux=True)
    loss, aux = value_fn(w)
    ref_loss, ref_aux = chunk_terms(w, (x, y))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    for key in ref_aux:
        np.testing.assert_allclose(aux[key], ref_aux[key], rtol=1e-12)
    grad = jax.grad(lambda v: value_fn(v)[0])(w)
    np.testing.assert_allclose(grad, jax.grad(lambda v: chunk_terms(v, (x, y))[0])(w), rtol=1e-10)
    # And a second phase takes it as it is.
    moved, state = _run(tp.nonlinear_cg(), value_fn, 3, params=w)
    assert float(value_fn(moved)[0]) < float(loss)
    for key in ref_aux:
        np.testing.assert_allclose(tp.info(state).aux[key], value_fn(moved)[1][key], rtol=1e-10)


def test_full_batch_names_has_aux_when_the_output_disagrees():
    data = (jnp.ones((6, 2)), jnp.ones(6))
    with pytest.raises(TypeError, match="has_aux=True"):
        tp.full_batch(chunk_terms, data, batch_size=4)(jnp.ones(2))
    with pytest.raises(TypeError, match="has_aux=True"):
        tp.full_batch(lambda w, b: chunk_terms(w, b)[0], data, batch_size=4, has_aux=True)(
            jnp.ones(2)
        )
    with pytest.raises(ValueError, match="pytree of scalars"):
        tp.full_batch(lambda w, b: (chunk_terms(w, b)[0], {"r": b[0] @ w}), data, has_aux=True)(
            jnp.ones(2)
        )
    with pytest.raises(ValueError, match="has_aux"):
        tp.full_batch(chunk_terms, data, has_aux="yes")
