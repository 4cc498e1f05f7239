"""twophase.flax: nnx.Optimizer and linen TrainState drive the two-phase optimizer."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp

flax = pytest.importorskip("flax")
from flax import linen, nnx  # noqa: E402
from flax.training import train_state  # noqa: E402

import twophase.flax as tpf  # noqa: E402

N = 512
BATCH = 128
STEPS_PER_EPOCH = N // BATCH


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = jnp.asarray(x[:N] / 16.0, jnp.float32)
    y = jax.nn.one_hot(jnp.asarray(y[:N]), 10, dtype=jnp.float32)
    return {"x": x, "y": y}


def batches(data, epochs):
    for e in range(epochs):
        perm = np.random.default_rng(e).permutation(N)
        for b in range(STEPS_PER_EPOCH):
            idx = perm[b * BATCH : (b + 1) * BATCH]
            yield jax.tree.map(lambda a: a[idx], data)


# --------------------------------------------------------------------------- #
# nnx


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def nnx_loss(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def make_nnx_step(trace_counter: list):
    @nnx.jit
    def step(model, optimizer, batch, data):
        trace_counter.append(1)
        loss, grads = nnx.value_and_grad(nnx_loss)(model, batch)
        value_fn = tpf.nnx_value_fn(model, nnx_loss, data, batch_size=200)
        optimizer.update(model, grads, value=loss, value_fn=value_fn)
        return loss

    return step


def full_loss(model, data):
    return float(nnx_loss(model, data))


def test_nnx_value_fn_matches_loss_and_takes_optimizer_params(digits):
    model = MLP(nnx.Rngs(0))
    value_fn = tpf.nnx_value_fn(model, nnx_loss, digits, batch_size=100)
    params = nnx.as_pure(nnx.state(model, nnx.Param))  # what nnx.Optimizer passes
    assert isinstance(params, nnx.State)
    expected = nnx.jit(nnx_loss)(model, digits)
    np.testing.assert_allclose(jax.jit(value_fn)(params), expected, rtol=1e-5)
    # Variables (not only plain arrays) are accepted too.
    np.testing.assert_allclose(value_fn(nnx.state(model, nnx.Param)), expected, rtol=1e-5)
    grads = jax.jit(jax.grad(value_fn))(params)
    ref = nnx.jit(nnx.grad(nnx_loss))(model, digits)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
        grads,
        nnx.as_pure(ref),
    )


def test_nnx_phase0_equals_adam(digits):
    model_tp, model_adam = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
    opt_tp = nnx.Optimizer(model_tp, tp.adam_cg(1e-2, policy=tp.switch_at(100)), wrt=nnx.Param)
    opt_adam = nnx.Optimizer(model_adam, optax.adam(1e-2), wrt=nnx.Param)
    step = make_nnx_step([])

    @nnx.jit
    def adam_step(model, optimizer, batch):
        grads = nnx.grad(nnx_loss)(model, batch)
        optimizer.update(model, grads)

    for batch in batches(digits, 2):
        step(model_tp, opt_tp, batch, digits)
        adam_step(model_adam, opt_adam, batch)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        nnx.state(model_tp, nnx.Param),
        nnx.state(model_adam, nnx.Param),
    )
    assert int(tp.info(opt_tp.opt_state).phase) == 0


def test_nnx_switch_then_cg_decreases_full_batch_loss(digits):
    switch = 2 * STEPS_PER_EPOCH
    model = MLP(nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, tp.adam_cg(1e-2, policy=tp.switch_at(switch)), wrt=nnx.Param)
    traces: list = []
    step = make_nnx_step(traces)
    losses = [full_loss(model, digits)]
    phases = []
    for batch in batches(digits, 5):
        step(model, optimizer, batch, digits)
        losses.append(full_loss(model, digits))
        phases.append(int(tp.info(optimizer.opt_state).phase))
    assert len(traces) == 1  # compiled once, across the switch
    assert phases == [0] * (switch - 1) + [1] * (len(phases) - switch + 1)
    cg_losses = losses[switch:]  # losses[switch] is the point CG starts from
    assert all(b < a for a, b in itertools.pairwise(cg_losses)), cg_losses
    info = tp.info(optimizer.opt_state)
    assert isinstance(info.phase, jax.Array)  # nnx OptArray wrappers are seen through
    assert int(info.switch_step) == switch
    assert int(info.cg_iterations) == len(phases) - switch
    assert int(info.step) == len(phases)
    whole = tp.info(optimizer)
    assert int(whole.cg_iterations) == int(info.cg_iterations)
    np.testing.assert_allclose(float(info.value), losses[-1], rtol=1e-5)


def test_nnx_default_policy_epoch_window(digits):
    model = MLP(nnx.Rngs(2))
    optimizer = nnx.Optimizer(
        model, tp.adam_cg(3e-2, steps_per_epoch=STEPS_PER_EPOCH), wrt=nnx.Param
    )
    traces: list = []
    step = make_nnx_step(traces)
    losses = [full_loss(model, digits)]
    for batch in batches(digits, 40):
        step(model, optimizer, batch, digits)
        losses.append(full_loss(model, digits))
    assert len(traces) == 1
    info = tp.info(optimizer.opt_state)
    # safe_resort (no budget): a first trial after 3 epochs, inside nnx's Variables.
    assert int(info.switches) >= 1
    assert int(optimizer.opt_state.detector_state.epoch_steps.get_value()) == STEPS_PER_EPOCH
    assert losses[-1] < 0.5 * losses[0]
    if int(info.phase) == 1:
        cg_losses = losses[int(info.switch_step) :]
        assert all(b <= a for a, b in itertools.pairwise(cg_losses))


# --------------------------------------------------------------------------- #
# linen


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(10)(jnp.tanh(linen.Dense(32)(x)))


def linen_loss(outputs_fn, batch):
    return jnp.mean((outputs_fn(batch["x"]) - batch["y"]) ** 2)


def make_linen_state(tx):
    module = LinenMLP()
    params = module.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    return train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)


def test_linen_train_state_does_not_forward_kwargs(digits):
    state = make_linen_state(tp.adam_cg(1e-2))
    grads = jax.tree.map(jnp.zeros_like, state.params)
    with pytest.raises((TypeError, ValueError)):  # kwargs are dataclass fields there
        state.apply_gradients(grads=grads, value=jnp.zeros([]), value_fn=lambda p: 0.0)


def test_linen_apply_gradients_phase0_adam_then_cg(digits):
    switch = 2 * STEPS_PER_EPOCH
    state = make_linen_state(tp.adam_cg(1e-2, policy=tp.switch_at(switch)))
    adam_state = make_linen_state(optax.adam(1e-2))
    traces: list = []

    def batch_loss(params, apply_fn, batch):
        return linen_loss(lambda x: apply_fn({"params": params}, x), batch)

    @jax.jit
    def step(state, batch, data):
        traces.append(1)
        loss, grads = jax.value_and_grad(batch_loss)(state.params, state.apply_fn, batch)
        value_fn = tpf.linen_value_fn(state.apply_fn, linen_loss, data, batch_size=200)
        return tpf.linen_apply_gradients(state, grads, value=loss, value_fn=value_fn)

    @jax.jit
    def adam_step(state, batch):
        grads = jax.grad(batch_loss)(state.params, state.apply_fn, batch)
        return state.apply_gradients(grads=grads)

    def full(state):
        return float(batch_loss(state.params, state.apply_fn, digits))

    losses = [full(state)]
    for i, batch in enumerate(batches(digits, 4)):
        state = step(state, batch, digits)
        if i < switch:
            adam_state = adam_step(adam_state, batch)
        if i == switch - 1:
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                state.params,
                adam_state.params,
            )
        losses.append(full(state))
    assert len(traces) == 1
    assert int(state.step) == 4 * STEPS_PER_EPOCH
    cg_losses = losses[switch:]
    assert all(b < a for a, b in itertools.pairwise(cg_losses)), cg_losses
    assert int(tp.info(state.opt_state).phase) == 1
