"""Issue 28, fault 3: no state aliases a buffer, so donation works in every phase."""

import jax
import jax.numpy as jnp
import optax
import pytest

import twophase as tp

PARAMS = {"w": jnp.ones((3,)), "b": jnp.zeros((2,))}


def f(p):
    return jnp.sum((p["w"] - 2.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2)


def _lying(p):
    # A full-batch objective the second phase cannot lower: forces a return.
    return f(p) * 0 + 1.0


OPTIMIZERS = {
    "adam_cg": lambda: tp.adam_cg(0.1, policy=tp.from_detector(tp.switch_at(2), 1)),
    "adam_cg_precondition": lambda: tp.adam_cg(
        0.1, policy=tp.from_detector(tp.switch_at(2), 1), precondition=True
    ),
    "adam_lbfgs": lambda: tp.adam_lbfgs(0.1, policy=tp.from_detector(tp.switch_at(2), 1)),
    "adam_newton_cg": lambda: tp.adam_newton_cg(0.1, policy=tp.from_detector(tp.switch_at(2), 1)),
    "default_policy": lambda: tp.adam_cg(0.1, steps_per_epoch=2),
    "two_phase_optax_adam": lambda: tp.two_phase(
        optax.adam(0.1), tp.nonlinear_cg(), tp.switch_at(2), fallback=1
    ),
    "nonlinear_cg": tp.nonlinear_cg,
    "newton_cg": tp.newton_cg,
    "evaluating_lbfgs": lambda: tp.evaluating(optax.lbfgs()),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("value_fn", [f, _lying], ids=["switch", "return"])
def test_donated_step_from_a_fresh_init(name, value_fn):
    opt = OPTIMIZERS[name]()

    def step(params, state):
        u, state = opt.update(
            jax.grad(f)(params), state, params, value=f(params), value_fn=value_fn
        )
        return optax.apply_updates(params, u), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, PARAMS)
    state = opt.init(params)
    for _ in range(6):
        params, state = jitted(params, state)
    assert bool(jnp.isfinite(f(params)))


def test_nnx_optimizer_donates():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3,)))

    def loss(model):
        return jnp.sum((model.w[...] - 2.0) ** 2)

    model = Model()
    optimizer = nnx.Optimizer(model, tp.adam_cg(0.1, policy=tp.switch_at(2)), wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer):
        value, grads = nnx.value_and_grad(loss)(model)
        graphdef, _ = nnx.split(model)

        def value_fn(params):
            return loss(nnx.merge(graphdef, params))

        optimizer.update(model, grads, value=value, value_fn=value_fn)

    for _ in range(5):
        train_step(model, optimizer)
    assert float(loss(model)) < 1e-6
