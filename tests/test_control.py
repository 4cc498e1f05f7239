"""Tests for twophase._control.run_if."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from twophase._control import run_if

N = 100_000


def _update(tree):
    a, (b, c) = tree
    return a * 0.5 + 1.0, (b + 1, c)


@pytest.mark.parametrize("pred", [True, False])
def test_matches_lax_cond(pred):
    tree = (jnp.arange(5.0), (jnp.arange(3, dtype=jnp.int32), jnp.ones((2, 2), jnp.float32)))
    expected = lax.cond(pred, _update, lambda t: t, tree)
    got = jax.jit(lambda p, t: run_if(p, _update, t))(jnp.asarray(pred), tree)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_body_runs_at_most_once():
    count = run_if(jnp.asarray(True), lambda n: n + 1, jnp.zeros([], jnp.int32))
    assert int(count) == 1


def test_batched_predicate_under_vmap_selects_per_member():
    preds = jnp.array([True, False, True])
    xs = jnp.arange(3.0)
    got = jax.vmap(lambda p, x: run_if(p, lambda v: v + 10.0, x))(preds, xs)
    np.testing.assert_array_equal(got, [10.0, 1.0, 12.0])


def _first(s):
    return s[0] * 0.9 + 1.0, s[1], s[2]


def _second(s):
    return s[0], s[1] + 1.0, s[2] * 2.0


def _parameter_sized_copies(step) -> int:
    state = tuple(jnp.ones(N, jnp.float32) for _ in range(3))
    hlo = jax.jit(step, donate_argnums=1).lower(jnp.asarray(True), state).compile().as_text()
    return sum(1 for line in hlo.splitlines() if f"f32[{N}]" in line and " copy(" in line)


def test_two_phases_without_copies():
    # The reason run_if exists. Two phases that update different buffers: lax.cond
    # copies the buffers the taken branch passes through; run_if copies nothing.
    def with_cond(pred, state):
        return lax.cond(pred, _first, _second, state)

    def with_run_if(pred, state):
        return run_if(~pred, _second, run_if(pred, _first, state))

    state = (jnp.arange(3.0), jnp.arange(3.0), jnp.arange(3.0))
    for pred in (True, False):
        for x, y in zip(with_cond(pred, state), with_run_if(jnp.asarray(pred), state), strict=True):
            np.testing.assert_array_equal(x, y)
    assert _parameter_sized_copies(with_cond) > 0
    assert _parameter_sized_copies(with_run_if) == 0
