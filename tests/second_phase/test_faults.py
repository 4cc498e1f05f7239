"""Regression tests of second-phase faults (issue 28): scaled objectives in float32,
empty parameter trees, buffer donation and eager compilation."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp

SECOND_PHASES = {
    "nonlinear_cg": lambda: tp.nonlinear_cg(),
    "newton_cg": lambda: tp.newton_cg(),
    "newton_cg_nystrom": lambda: tp.newton_cg(preconditioner="nystrom", sketch_size=3),
    "lbfgs": lambda: tp.evaluating(optax.lbfgs()),
}


def scaled_least_squares(scale, dtype=jnp.float32):
    """``scale * ||A x - b||^2`` with a well-conditioned 8 x 5 ``A``; its closed-form
    minimiser (independent of ``scale``)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((8, 5)) + 3 * np.eye(8, 5)
    b = rng.standard_normal(8)
    x_star = np.linalg.lstsq(a, b, rcond=None)[0]
    a_j, b_j = jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    def f(x):
        return jnp.asarray(scale, dtype) * jnp.sum(jnp.square(a_j @ x - b_j))

    return f, x_star


def run(opt, f, x0, steps):
    state = opt.init(x0)

    @jax.jit
    def step(x, state):
        updates, state = opt.update(x, state, x, value_fn=f)
        return optax.apply_updates(x, updates), state

    x = x0
    for _ in range(steps):
        x, state = step(x, state)
    return x, state


# ------------------------------------------------------------------ fault 5: scaled objectives


@pytest.mark.parametrize("scale", [2.0**40, 1e-12])
@pytest.mark.parametrize("name", ["nonlinear_cg", "newton_cg", "newton_cg_nystrom"])
def test_float32_scaled_least_squares_converges_to_the_closed_form(name, scale):
    f, x_star = scaled_least_squares(scale)
    x, state = run(SECOND_PHASES[name](), f, jnp.zeros(5, jnp.float32), 40)
    np.testing.assert_allclose(np.asarray(x), x_star, rtol=0, atol=2e-4)
    info = tp.info(state)
    assert int(info.nonfinite_events) == 0
    if name.startswith("newton_cg"):
        # A convex quadratic has no negative curvature, at any scale.
        assert int(state.negative_curvature) == 0


# ------------------------------------------------------------------ fault 10: empty trees


def _assert_no_op(opt, params, value_fn):
    state = opt.init(params)
    updates, _new_state = opt.update(params, state, params, value_fn=value_fn)
    assert jax.tree.leaves(updates) == []
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    # Jitted, the same.
    jax.jit(lambda s: opt.update(params, s, params, value_fn=value_fn))(state)


@pytest.mark.parametrize("name", sorted(SECOND_PHASES))
def test_an_empty_parameter_tree_is_a_no_op(name):
    _assert_no_op(SECOND_PHASES[name](), {}, lambda p: jnp.zeros([]))


@pytest.mark.parametrize("name", sorted(SECOND_PHASES))
def test_a_partition_label_that_owns_no_leaf_is_a_no_op(name):
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    labels = {"a": "adam", "b": "adam"}

    def loss(p):
        return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2)

    opt = optax.partition({"adam": optax.adam(0.1), "second": SECOND_PHASES[name]()}, labels)
    state = opt.init(params)
    updates, _ = opt.update(params, state, params, value_fn=loss)
    expected, _ = optax.adam(0.1).update(params, optax.adam(0.1).init(params), params)
    np.testing.assert_allclose(updates["a"], expected["a"], rtol=1e-6)


# ------------------------------------------------------------------ fault 3: donation


@pytest.mark.parametrize("name", sorted(SECOND_PHASES))
def test_a_fresh_state_can_be_donated(name):
    opt = SECOND_PHASES[name]()
    params = {"w": jnp.ones(4), "b": jnp.zeros(2)}

    def loss(p):
        return jnp.sum((p["w"] - 2.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2)

    def step(params, state):
        updates, state = opt.update(params, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    leaves = jax.tree.leaves(state)
    pointers = [x.unsafe_buffer_pointer() for x in leaves if isinstance(x, jax.Array)]
    assert len(set(pointers)) == len(pointers), "two state fields share one buffer"
    donated = jax.jit(step, donate_argnums=(0, 1))
    new_params, state = donated(jax.tree.map(jnp.copy, params), state)
    new_params, state = donated(new_params, state)
    assert float(loss(new_params)) < float(loss(params))


# ------------------------------------------------------------------ fault 4: eager compiles


class _CountCompiles(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if "Compiling" in record.getMessage():
            self.count += 1


def count_compilations(fn):
    handler = _CountCompiles()
    logger = logging.getLogger("jax")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return handler.count


@pytest.mark.parametrize("name", sorted(SECOND_PHASES))
def test_eager_update_compiles_once_per_shape(name):
    opt = SECOND_PHASES[name]()
    params = {"w": jnp.ones(4), "b": jnp.zeros(2)}

    def loss(p):
        return jnp.sum((p["w"] - 2.0) ** 2 * jnp.arange(1.0, 5.0)) + jnp.sum((p["b"] + 1.0) ** 2)

    state = opt.init(params)
    box = {"params": params, "state": state}

    def one_call():
        updates, box["state"] = opt.update(
            box["params"], box["state"], box["params"], value_fn=loss
        )
        box["params"] = optax.apply_updates(box["params"], updates)

    one_call()  # compiles
    later = count_compilations(lambda: [one_call() for _ in range(3)])
    assert later == 0, f"{later} compilations in 3 eager calls after the first"
