"""Tests for twophase.info: info and info_all read second phases by field name."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp

PARAMS = {"w": jnp.zeros((3, 1))}


@pytest.mark.parametrize(
    "make", [tp.nonlinear_cg, tp.newton_cg, lambda: tp.evaluating(optax.lbfgs())]
)
def test_bare_second_phase_states_are_found_by_their_fields(make):
    state = make().init(PARAMS)
    (found,) = tp.info_all(state)
    assert found.phase is None and int(found.value_and_grad_evals) == 0
    assert float(tp.info(state).cost) == 0.0
    # Nested in an optax chain state, the same.
    assert len(tp.info_all((optax.scale(1.0).init(PARAMS), state))) == 1


def test_info_all_counts_every_optimizer_and_info_names_it():
    labels = {"a": "x", "b": "y"}
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    state = optax.partition({"x": tp.adam_cg(1e-2), "y": tp.adam_cg(1e-2)}, labels).init(params)
    assert len(tp.info_all(state)) == 2
    with pytest.raises(ValueError, match="info_all"):
        tp.info(state)


def test_train_runs_a_bare_nonlinear_cg_in_phase_1_epochs():
    x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    y = x @ np.ones((3, 1), np.float32)
    result = tp.train(
        lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2), PARAMS, (x, y), tp.nonlinear_cg(),
        batch_size=16, cost_budget=10, strict_budget=True, progress=False, max_epochs=30,
    )  # fmt: skip
    assert all(r["phase"] == 1 for r in result.history)
    assert result.history[-1]["cost"] == float(tp.info(result.opt_state).cost) <= 10
