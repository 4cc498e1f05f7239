"""Tests for twophase.first_phase: optax.adam switched by a scalar."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from twophase.first_phase import AdamConstants, gated_adam_update

PARAMS = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,), jnp.bfloat16)}


def gradients(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), PARAMS)
        for _ in range(n)
    ]


LEARNING_RATES = {
    "constant": 1e-2,
    "array": jnp.asarray(1e-2),
    "schedule": optax.linear_schedule(1e-2, 1e-3, 5),
}


@pytest.mark.parametrize("lr", LEARNING_RATES.values(), ids=LEARNING_RATES.keys())
def test_active_steps_equal_optax_adam(lr):
    ref = optax.adam(lr, b1=0.8, b2=0.99, eps=1e-7)
    constants = AdamConstants(lr, 0.8, 0.99, 1e-7)
    state = ref_state = ref.init(PARAMS)
    on, off = jnp.array(True), jnp.array(False)
    step = jax.jit(lambda g, s: gated_adam_update(constants, g, s, on, off))
    for g in gradients(6):
        updates, state = step(g, state)
        ref_updates, ref_state = ref.update(g, ref_state)
        chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6, atol=1e-9)
        chex.assert_trees_all_close(state, ref_state, rtol=1e-6, atol=1e-9)
        chex.assert_trees_all_equal_dtypes(updates, ref_updates)


@pytest.mark.parametrize("pass_slot", [False, True])
@pytest.mark.parametrize("lr", LEARNING_RATES.values(), ids=LEARNING_RATES.keys())
def test_inactive_steps_leave_the_state_unchanged(lr, pass_slot):
    ref = optax.adam(lr)
    constants = AdamConstants(lr, 0.9, 0.999, 1e-8)
    _, state = ref.update(gradients(1)[0], ref.init(PARAMS))
    slot = gradients(1, seed=1)[0]
    slot["w"] = slot["w"].at[0, 0].set(jnp.nan)
    updates, new_state = jax.jit(lambda *a: gated_adam_update(constants, *a))(
        slot, state, jnp.array(False), jnp.array(pass_slot)
    )
    chex.assert_trees_all_equal(new_state, state)
    expected = slot if pass_slot else jax.tree.map(jnp.zeros_like, slot)
    chex.assert_trees_all_equal(updates, expected)


def test_inactive_first_step_is_finite_and_a_later_active_step_matches_adam():
    """A skipped first step (count 0) must not divide by a zero bias correction."""
    ref = optax.adam(1e-2)
    constants = AdamConstants(1e-2, 0.9, 0.999, 1e-8)
    g = gradients(1)[0]
    updates, state = gated_adam_update(
        constants, g, ref.init(PARAMS), jnp.array(False), jnp.array(False)
    )
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    updates, state = gated_adam_update(constants, g, state, jnp.array(True), jnp.array(False))
    ref_updates, ref_state = ref.update(g, ref.init(PARAMS))
    chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6)
    chex.assert_trees_all_close(state, ref_state, rtol=1e-6)


def test_batched_flags_under_vmap_select_per_member():
    ref = optax.adam(1e-2)
    constants = AdamConstants(1e-2, 0.9, 0.999, 1e-8)
    g = gradients(1)[0]
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), (g, ref.init(PARAMS)))
    active = jnp.array([True, False])
    updates, state = jax.vmap(lambda s, st, a: gated_adam_update(constants, s, st, a, ~a))(
        stacked[0], stacked[1], active
    )
    ref_updates, ref_state = ref.update(g, ref.init(PARAMS))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], updates), ref_updates, rtol=1e-6)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1], updates), g)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1], state), ref.init(PARAMS))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], state), ref_state, rtol=1e-6)
