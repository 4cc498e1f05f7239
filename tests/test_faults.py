"""Regression tests for issue 17 (composability and numerics faults), items 2-6,
and further situations of the same kinds met as a demanding optax/Flax user."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp
from twophase._numerics import finite_and_norm

F32 = jnp.float32


def _least_squares(scale: float, b_scale: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(20, 5)), F32)
    b = jnp.asarray(rng.normal(size=20) * b_scale, F32)

    def f(x):
        return scale * 0.5 * jnp.sum((a @ x - b) ** 2)

    x_star = jnp.asarray(np.linalg.lstsq(np.asarray(a, float), np.asarray(b, float))[0], F32)
    return f, x_star


def _run_cg(opt, f, x, steps):
    state = opt.init(x)
    step = jax.jit(lambda x, s: opt.update(x, s, x, value_fn=f))
    for _ in range(steps):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
    return x, state


# --------------------------------------------------------------------------- #
# Item 2: finite but huge (or tiny) values are not non-finite.


@pytest.mark.parametrize(
    "x",
    [
        [3e20, 4e20],  # squares overflow float32
        [3e-25, 4e-25],  # squares underflow float32
        [3.0, 4.0],
    ],
)
def test_norm_neither_overflows_nor_underflows(x):
    finite, norm = finite_and_norm({"a": jnp.asarray(x, F32), "b": jnp.zeros(3, F32)})
    assert bool(finite)
    np.testing.assert_allclose(float(norm), 5 * x[0] / 3, rtol=1e-6)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_finiteness_is_per_element(bad):
    finite, _ = finite_and_norm({"a": jnp.asarray([1.0, bad], F32)})
    assert not bool(finite)


def test_norm_float16_leaves_do_not_overflow():
    _, norm = finite_and_norm(jnp.asarray([3e3, 4e3], jnp.float16))
    np.testing.assert_allclose(float(norm), 5e3, rtol=1e-3)


@pytest.mark.parametrize("beta", sorted(tp.BETA_RULES))
def test_cg_moves_with_gradients_beyond_float32_squares(beta):
    # 1e12 * 0.5 ||Ax - b||^2: gradient entries ~7e19, squared norm beyond float32.
    f, x_star = _least_squares(1e12, b_scale=1e7)
    x0 = jnp.zeros(5, F32)
    assert float(jnp.max(jnp.abs(jax.grad(f)(x0)))) > 1e19
    x, state = _run_cg(tp.nonlinear_cg(beta), f, x0, 15)
    info = tp.info(state)
    assert np.isfinite(float(info.value)) and np.isfinite(float(info.grad_norm))
    assert int(info.nonfinite_events) == 0
    np.testing.assert_allclose(float(f(x)), float(f(x_star)), rtol=1e-4)


def test_cg_moves_with_gradients_below_float32_squares():
    f, x_star = _least_squares(1e-30)
    x0 = jnp.zeros(5, F32)
    assert float(jnp.max(jnp.abs(jax.grad(f)(x0)))) < 1e-20
    x, state = _run_cg(tp.nonlinear_cg(), f, x0, 15)
    assert float(tp.info(state).grad_norm) > 0
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_star), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_adam_phase_takes_huge_finite_steps_like_optax_adam(fused):
    if fused:
        opt = tp.adam_cg(1e-2, policy=tp.switch_at(100))
    else:
        opt = tp.two_phase(optax.adam(1e-2), tp.nonlinear_cg(), tp.switch_at(100))
    ref = optax.adam(1e-2)
    x = {"w": jnp.ones(4, F32)}
    state, ref_state = opt.init(x), ref.init(x)
    for k in range(3):
        g = {"w": jnp.asarray([4e19, -1e20, 1.0, 0.0], F32) * (k + 1)}
        u, state = opt.update(
            g, state, x, value=jnp.asarray(1.0, F32), value_fn=lambda p: jnp.sum(p["w"])
        )
        r, ref_state = ref.update(g, ref_state, x)
        np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(r["w"]), rtol=1e-6)
    assert int(tp.info(state).skipped_steps) == 0


def test_exact_norm_detector_reports_huge_finite_norm():
    f, _ = _least_squares(1e12, b_scale=1e7)
    opt = tp.two_phase(optax.adam(1e-3), tp.nonlinear_cg(), tp.grad_norm_peak(0.9, window=1))
    x = jnp.zeros(5, F32)
    state = opt.init(x)
    _, state = opt.update(jax.grad(f)(x), state, x, value_fn=f)
    stat = float(tp.info(state).grad_norm_stat)
    assert np.isfinite(stat) and stat > 1e19


# --------------------------------------------------------------------------- #
# Item 3: what a chain means across the switch.


def _regression_data(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(64, 3)), F32)
    y = x @ jnp.asarray([1.0, -2.0, 0.5], F32) + 0.3
    return x, y


def _loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["emb"][0] - y) ** 2)


PARAMS = {"w": jnp.zeros(3, F32), "emb": jnp.ones(2, F32)}


@pytest.mark.parametrize(
    "before",
    [
        optax.masked(optax.set_to_zero(), {"w": False, "emb": True}),
        optax.add_decayed_weights(0.5),
        optax.clip_by_global_norm(1.0),
    ],
)
def test_train_rejects_transformations_chained_before_a_two_phase_optimizer(before):
    opt = optax.chain(before, tp.adam_cg(0.05, policy=tp.switch_at(8)))
    with pytest.raises(ValueError, match=r"partition.*with_weight_decay"):
        tp.train(_loss, PARAMS, _regression_data(), opt, progress=False)


def test_train_rejects_transformations_chained_after_cg():
    opt = optax.chain(tp.nonlinear_cg(), optax.scale(0.5))
    with pytest.raises(ValueError, match="chains a twophase optimizer"):
        tp.train(_loss, PARAMS, _regression_data(), opt, progress=False)


def test_frozen_leaf_stays_frozen_in_both_phases_with_partition():
    opt = optax.partition(
        {"train": tp.adam_cg(0.05, policy=tp.switch_at(8)), "frozen": optax.set_to_zero()},
        {"w": "train", "emb": "frozen"},
    )
    result = tp.train(
        _loss, PARAMS, _regression_data(), opt, batch_size=16, max_epochs=6, progress=False
    )
    assert [r["phase"] for r in result.history] == [0, 0, 1, 1, 1, 1]
    assert int(tp.info(result.opt_state).cg_iterations) == 4
    np.testing.assert_array_equal(np.asarray(result.params["emb"]), np.ones(2))
    # CG solved for w with the bias held at emb[0] = 1.
    x, y = _regression_data()
    w_star = np.linalg.lstsq(np.asarray(x, float), np.asarray(y - 1.0, float), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(result.params["w"]), w_star, rtol=1e-3, atol=1e-4)


def test_frozen_leaf_stays_frozen_in_own_loop_with_partition_and_fill_masked():
    data = _regression_data()
    opt = optax.partition(
        {"train": tp.adam_cg(0.05, policy=tp.switch_at(3)), "frozen": optax.set_to_zero()},
        {"w": "train", "emb": "frozen"},
    )
    full = tp.full_batch(_loss, data)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(_loss)(params, data)
        updates, state = opt.update(
            grads, state, params, value=loss, value_fn=tp.fill_masked(full, params)
        )
        return optax.apply_updates(params, updates), state

    params, state = PARAMS, opt.init(PARAMS)
    for _ in range(6):
        params, state = step(params, state)
    assert int(tp.info(state).cg_iterations) == 3
    np.testing.assert_array_equal(np.asarray(params["emb"]), np.ones(2))


def test_masked_tree_without_fill_masked_names_the_fix():
    data = _regression_data()
    opt = optax.masked(tp.adam_cg(0.05, policy=tp.switch_at(1)), {"w": True, "emb": False})
    state = opt.init(PARAMS)
    loss, grads = jax.value_and_grad(_loss)(PARAMS, data)
    with pytest.raises(TypeError, match="fill_masked"):
        opt.update(grads, state, PARAMS, value=loss, value_fn=tp.full_batch(_loss, data))


@pytest.mark.slow  # ~8 s
def test_weight_decay_in_the_loss_reaches_the_regularised_optimum_across_the_switch():
    data = _regression_data()
    wd = 0.5
    loss = tp.with_weight_decay(_loss, wd, mask={"w": True, "emb": False})
    params = {"w": jnp.zeros(3, F32), "emb": jnp.zeros(1, F32)}
    opt = tp.adam_cg(0.05, policy=tp.switch_at(16))
    result = tp.train(loss, params, data, opt, batch_size=16, max_epochs=12, progress=False)
    assert result.history[-1]["phase"] == 1
    # Closed form of mean((x w + c - y)^2) + wd/2 ||w||^2.
    x, y = (np.asarray(a, float) for a in data)
    design = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.diag([wd / 2] * 3 + [0.0]) * len(x)
    solution = np.linalg.solve(design.T @ design + penalty, design.T @ y)
    np.testing.assert_allclose(np.asarray(result.params["w"]), solution[:3], rtol=1e-3)
    np.testing.assert_allclose(float(result.params["emb"][0]), solution[3], rtol=1e-3)
    assert not np.allclose(solution[:3], [1.0, -2.0, 0.5], rtol=1e-2)  # not unregularised


def test_with_weight_decay_gradient_matches_add_decayed_weights():
    params = {"a": jnp.asarray([1.0, -2.0], F32), "b": jnp.asarray([3.0], F32)}
    mask = {"a": True, "b": False}
    grads = jax.grad(
        tp.with_weight_decay(lambda p: jnp.sum(p["a"]) + p["b"][0] ** 2, 0.1, mask=mask)
    )(params)
    plain = {"a": jnp.ones(2, F32), "b": jnp.asarray([6.0], F32)}
    decay = optax.add_decayed_weights(0.1, mask)
    expected, _ = decay.update(plain, decay.init(params), params)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6), grads, expected)


@pytest.mark.parametrize("weight_decay", [-1.0, float("nan"), True])
def test_with_weight_decay_rejects_bad_weight_decay(weight_decay):
    with pytest.raises(ValueError, match="weight_decay"):
        tp.with_weight_decay(_loss, weight_decay)


# --------------------------------------------------------------------------- #
# Item 4: injected hyperparameters take effect, or are static and say so.


def _adam_cg_plateau(learning_rate, window, min_steps=0):
    """adam_cg with the loss_plateau detector built from the (injected) window."""
    detector = tp.loss_plateau(window, patience=5, history=10, z_score=1.0, min_steps=min_steps)
    return tp.adam_cg(learning_rate, policy=detector)


def _switch_step_with_window(window_at_init, window_after, steps=40, name="window", **kwargs):
    kwargs = {"learning_rate": 0.1, name: window_at_init, **kwargs}
    opt = optax.inject_hyperparams(_adam_cg_plateau)(**kwargs)
    x = jnp.zeros(3, F32)
    state = opt.init(x)
    state.hyperparams[name] = jnp.asarray(window_after)

    def f(x):
        return jnp.sum((x - 1.0) ** 2)

    # A flat mini-batch loss: loss_plateau fires after history + patience - 1 windows.
    step = jax.jit(
        lambda x, s: opt.update(jax.grad(f)(x), s, x, value=jnp.asarray(1.0, F32), value_fn=f)
    )
    for _ in range(steps):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
    return int(tp.info(state).switch_step)


@pytest.mark.parametrize(
    ("window_at_init", "window_after", "switch_step"),
    [(1, 1, 14), (1, 10**6, -1), (10**6, 1, 14), (10**6, 10**6, -1)],
)
def test_injected_window_takes_effect_after_init(window_at_init, window_after, switch_step):
    assert _switch_step_with_window(window_at_init, window_after) == switch_step


@pytest.mark.parametrize(("at_init", "after", "switch_step"), [(0, 30, 30), (30, 0, 14)])
def test_injected_min_steps_takes_effect_after_init(at_init, after, switch_step):
    assert _switch_step_with_window(at_init, after, name="min_steps", window=1) == switch_step


def test_injected_window_sets_the_default_policys_epoch_length():
    opt = optax.inject_hyperparams(tp.adam_cg)(learning_rate=0.1, steps_per_epoch=1)
    x = jnp.zeros(3, F32)
    state = opt.init(x)
    state.hyperparams["steps_per_epoch"] = jnp.asarray(4)
    step = jax.jit(
        lambda x, s: opt.update(2 * (x - 1.0), s, x, value=jnp.asarray(1.0, F32), value_fn=jnp.sum)
    )
    for _ in range(10):
        _, state = step(x, state)
    policy_state = state.inner_state.detector_state
    # 10 steps of an epoch of 4 steps: 2.5 epoch-equivalents, 2 epochs ended.
    np.testing.assert_allclose(float(policy_state.cost), 2.5, rtol=1e-6)
    assert int(policy_state.epochs) == 2


def test_injected_memory_size_fails_clearly_and_static_works():
    x = jnp.zeros(3, F32)
    opt = optax.inject_hyperparams(tp.adam_lbfgs)(learning_rate=0.1, memory_size=3)
    with pytest.raises(TypeError, match=r"memory_size.*second=optax.lbfgs"):
        opt.init(x)
    static = optax.inject_hyperparams(tp.adam_lbfgs, static_args=("second",))(
        learning_rate=0.1, second=optax.lbfgs(memory_size=3)
    )
    state = jax.jit(static.init)(x)
    jax.jit(lambda s: static.update(x, s, x, value=jnp.sum(x), value_fn=jnp.sum))(state)


def test_jit_init_of_injected_adam_cg():
    # optax#412: integer hyperparameters traced by jit(init).
    def adam_cg(learning_rate, steps_per_epoch, min_steps):
        policy = tp.safe_resort(steps_per_epoch, min_steps=min_steps)
        return tp.adam_cg(learning_rate, policy=policy)

    opt = optax.inject_hyperparams(adam_cg)(learning_rate=0.1, steps_per_epoch=3, min_steps=2)
    x = jnp.zeros(3, F32)
    state = jax.jit(opt.init)(x)
    _, state = jax.jit(lambda s: opt.update(x, s, x, value=jnp.sum(x), value_fn=jnp.sum))(state)
    assert int(tp.info(state).step) == 1


def test_injected_b1_change_after_init_matches_optax_adam():
    def adam_cg(learning_rate, b1, b2, eps):
        adam = tp.gated_adam(learning_rate, b1, b2, eps)
        return tp.two_phase(adam, tp.nonlinear_cg(), tp.safe_resort())

    hyper = dict(learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8)  # all injected, as optax's
    opt = optax.inject_hyperparams(adam_cg)(**hyper)
    ref = optax.inject_hyperparams(optax.adam)(**hyper)
    x = jnp.ones(3, F32)
    state, ref_state = opt.init(x), ref.init(x)
    state.hyperparams["b1"] = ref_state.hyperparams["b1"] = jnp.asarray(0.5, F32)
    for k in range(3):
        g = jnp.asarray([1.0, -2.0, 3.0], F32) * (k + 1)
        u, state = opt.update(g, state, x, value=jnp.asarray(1.0, F32), value_fn=jnp.sum)
        r, ref_state = ref.update(g, ref_state, x)
        np.testing.assert_allclose(np.asarray(u), np.asarray(r), rtol=1e-6)


def test_injected_precondition_flag_is_static():
    # bools are static in inject_hyperparams: precondition=True builds and runs.
    opt = optax.inject_hyperparams(tp.adam_cg)(
        learning_rate=0.1, precondition=True, policy=tp.switch_at(1)
    )
    x = jnp.ones(3, F32)
    state = opt.init(x)
    for _ in range(3):
        u, state = opt.update(x, state, x, value=jnp.sum(x**2), value_fn=lambda p: jnp.sum(p**2))
        x = optax.apply_updates(x, u)
    assert int(tp.info(state).phase) == 1
    assert float(jnp.sum(x**2)) < 1e-6


# --------------------------------------------------------------------------- #
# Item 5: train and info with the optax wrappers.


def test_info_with_two_two_phase_states_names_info_all():
    opt = optax.partition(
        {"a": tp.adam_cg(), "b": tp.adam_cg(policy=tp.switch_at(2))}, {"w": "a", "emb": "b"}
    )
    state = opt.init(PARAMS)
    with pytest.raises(ValueError, match="info_all"):
        tp.info(state)
    infos = tp.info_all(state)
    assert len(infos) == 2 and all(int(i.phase) == 0 for i in infos)
    assert tp.info_all(optax.adam(1e-3).init(PARAMS)) == ()


def test_train_with_two_two_phase_optimizers_in_a_partition():
    opt = optax.partition(
        {
            "a": tp.adam_cg(0.05, policy=tp.switch_at(8)),
            "b": tp.adam_cg(0.05, policy=tp.switch_at(4)),
        },
        {"w": "a", "emb": "b"},
    )
    result = tp.train(
        _loss, PARAMS, _regression_data(), opt, batch_size=16, max_epochs=4, progress=False
    )
    infos = tp.info_all(result.opt_state)
    assert [int(i.phase) for i in infos] == [1, 1]
    evals = sum(int(i.value_and_grad_evals) for i in infos)
    steps = sum(r["steps"] for r in result.history)
    assert result.history[-1]["cost"] == pytest.approx(steps / 4 + evals)


@pytest.mark.parametrize(
    "wrap",
    [
        # ~8 s each: the plain case stays in the fast suite.
        pytest.param(lambda o: optax.MultiSteps(o, every_k_schedule=1), marks=pytest.mark.slow),
        pytest.param(lambda o: optax.masked(o, {"w": True, "emb": True}), marks=pytest.mark.slow),
        lambda o: o,
    ],
    ids=["multisteps", "masked", "plain"],
)
def test_train_with_wrapped_adam_cg_switches_and_runs_cg(wrap):
    opt = wrap(tp.adam_cg(0.05, policy=tp.switch_at(8)))
    result = tp.train(
        _loss, PARAMS, _regression_data(), opt, batch_size=16, max_epochs=4, progress=False
    )
    assert [r["phase"] for r in result.history] == [0, 0, 1, 1]
    assert int(tp.info(result.opt_state).cg_iterations) == 2


def test_train_with_injected_adam_cg():
    opt = optax.inject_hyperparams(tp.adam_cg, static_args=("policy",))(
        learning_rate=0.05, policy=tp.switch_at(8)
    )
    result = tp.train(
        _loss, PARAMS, _regression_data(), opt, batch_size=16, max_epochs=4, progress=False
    )
    assert [r["phase"] for r in result.history] == [0, 0, 1, 1]


# --------------------------------------------------------------------------- #
# Item 6: what optax.adam supports in phase 0 (differentiation, vmap, jit).


def _quadratic():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(20, 5)), F32)
    b = jnp.asarray(rng.normal(size=20), F32)
    return lambda x: 0.5 * jnp.mean((a @ x - b) ** 2)


def _meta_loss(lr, make, f, steps=3, jit_step=False):
    opt = optax.inject_hyperparams(make)(learning_rate=lr)
    x = jnp.ones(5, F32)
    state = opt.init(x)

    def step(x, state):
        value, grad = jax.value_and_grad(f)(x)
        updates, state = opt.update(grad, state, x, value=value, value_fn=f)
        return optax.apply_updates(x, updates), state

    if jit_step:
        step = jax.jit(step)
    for _ in range(steps):
        x, state = step(x, state)
    return f(x)


def _generic(learning_rate):
    return tp.two_phase(optax.adam(learning_rate), tp.nonlinear_cg(), tp.switch_at(100))


@pytest.mark.slow
@pytest.mark.parametrize("make", [tp.adam_cg, _generic], ids=["adam_cg", "two_phase"])
@pytest.mark.parametrize("jit_step", [False, True], ids=["eager", "jit-inside-grad"])
def test_meta_gradient_wrt_learning_rate_matches_optax_adam(make, jit_step):
    f = _quadratic()
    expected = jax.grad(_meta_loss)(jnp.asarray(0.01, F32), optax.adam, f)
    got = jax.grad(_meta_loss)(jnp.asarray(0.01, F32), make, f, jit_step=jit_step)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-4)
    jitted = jax.jit(jax.grad(_meta_loss), static_argnums=(1, 2))(jnp.asarray(0.01, F32), make, f)
    np.testing.assert_allclose(float(jitted), float(expected), rtol=1e-4)


def test_forward_mode_derivative_wrt_learning_rate_matches_optax_adam():
    f = _quadratic()
    lr = jnp.asarray(0.01, F32)
    _, expected = jax.jvp(lambda lr: _meta_loss(lr, optax.adam, f), (lr,), (jnp.ones_like(lr),))
    _, got = jax.jvp(lambda lr: _meta_loss(lr, tp.adam_cg, f), (lr,), (jnp.ones_like(lr),))
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-4)


def test_derivative_through_a_cg_step_is_nan_not_wrong():
    f = _quadratic()

    def make(learning_rate):
        return tp.adam_cg(learning_rate, policy=tp.switch_at(1))

    got = jax.grad(_meta_loss)(jnp.asarray(0.01, F32), make, f)
    assert np.isnan(float(got))


@pytest.mark.slow
def test_vmap_over_learning_rates_matches_optax_adam():
    f = _quadratic()
    lrs = jnp.asarray([1e-3, 1e-2, 1e-1], F32)
    expected = jax.jit(jax.vmap(lambda lr: _meta_loss(lr, optax.adam, f)))(lrs)
    got = jax.jit(jax.vmap(lambda lr: _meta_loss(lr, tp.adam_cg, f)))(lrs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5)
    grads = jax.jit(jax.vmap(jax.grad(lambda lr: _meta_loss(lr, tp.adam_cg, f))))(lrs)
    expected_grads = jax.jit(jax.vmap(jax.grad(lambda lr: _meta_loss(lr, optax.adam, f))))(lrs)
    np.testing.assert_allclose(np.asarray(grads), np.asarray(expected_grads), rtol=1e-4)


@pytest.mark.parametrize("order", ["vmap(jit)", "jit(vmap)"])
def test_vmap_over_an_ensemble_of_params_matches_optax_adam(order):
    f = _quadratic()
    xs = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), F32)
    opt, ref = tp.adam_cg(1e-2, policy=tp.switch_at(100)), optax.adam(1e-2)

    def step(opt, x, state):
        value, grad = jax.value_and_grad(f)(x)
        updates, state = opt.update(grad, state, x, value=value, value_fn=f)
        return optax.apply_updates(x, updates), state

    def batched(fn):
        return jax.vmap(jax.jit(fn)) if order == "vmap(jit)" else jax.jit(jax.vmap(fn))

    run, run_ref = batched(lambda x, s: step(opt, x, s)), batched(lambda x, s: step(ref, x, s))
    x, state = xs, jax.vmap(opt.init)(xs)
    x_ref, ref_state = xs, jax.vmap(ref.init)(xs)
    for _ in range(3):
        x, state = run(x, state)
        x_ref, ref_state = run_ref(x_ref, ref_state)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_ref), rtol=1e-6)


# --------------------------------------------------------------------------- #
# Second pass: further situations of these kinds.


def test_apply_if_finite_around_adam_cg_runs_both_phases():
    f = _quadratic()
    opt = optax.apply_if_finite(tp.adam_cg(0.1, policy=tp.switch_at(2)), 3)
    x = jnp.ones(5, F32)
    state = opt.init(x)
    step = jax.jit(lambda x, s: opt.update(jax.grad(f)(x), s, x, value=f(x), value_fn=f))
    for _ in range(4):
        u, state = step(x, state)
        x = optax.apply_updates(x, u)
    assert int(tp.info(state).cg_iterations) == 2


@pytest.mark.parametrize(("name", "value"), [("learning_rate", 0.01), ("b1", 0.9), ("eps", 0.1)])
def test_meta_gradient_through_scanned_steps_matches_optax_adam(name, value):
    f = _quadratic()

    def meta(h, make):
        # Phase 0 only (a fixed late switch): a full-batch loop like this one makes
        # the default policy try CG within these 5 steps.
        kwargs = {"learning_rate": 0.01, name: h}
        opt = optax.inject_hyperparams(make)(**kwargs)
        x = jnp.ones(5, F32)

        def body(carry, _):
            x, state = carry
            v, g = jax.value_and_grad(f)(x)
            u, state = opt.update(g, state, x, value=v, value_fn=f)
            return (optax.apply_updates(x, u), state), None

        (x, _), _ = jax.lax.scan(body, (x, opt.init(x)), None, length=5)
        return f(x)

    def adam_cg_with_constants(learning_rate, b1=0.9, b2=0.999, eps=1e-8):
        # adam_cg's phases with its Adam constants spelled out (injectable).
        first = tp.gated_adam(learning_rate, b1, b2, eps)
        return tp.two_phase(first, tp.nonlinear_cg(), tp.switch_at(100))

    h = jnp.asarray(value, F32)
    expected = jax.grad(meta)(h, optax.adam)
    got = jax.grad(meta)(h, adam_cg_with_constants)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-4)


def test_gradient_wrt_initial_params_through_rematerialised_steps():
    # MAML-style: differentiate the loss after a few inner steps w.r.t. the start.
    f = _quadratic()

    def inner(opt, x0):
        state, x = opt.init(x0), x0

        def step(x, state):
            value, grad = jax.value_and_grad(f)(x)
            return opt.update(grad, state, x, value=value, value_fn=f)

        step = jax.checkpoint(step)
        for _ in range(3):
            u, state = step(x, state)
            x = optax.apply_updates(x, u)
        return f(x)

    x0 = jnp.ones(5, F32)
    got = jax.grad(lambda x: inner(tp.adam_cg(0.01), x))(x0)
    expected = jax.grad(lambda x: inner(optax.adam(0.01), x))(x0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-7)


def test_bfloat16_params_with_huge_finite_gradients_step_like_optax_adam():
    opt, ref = tp.adam_cg(1e-2, policy=tp.switch_at(100)), optax.adam(1e-2)
    x = jnp.ones(3, jnp.bfloat16)
    g = jnp.asarray([1e20, -3e19, 1.0], jnp.bfloat16)
    u, state = opt.update(
        g, opt.init(x), x, value=jnp.asarray(1.0, F32), value_fn=lambda p: jnp.sum(p)
    )
    r, _ = ref.update(g, ref.init(x), x)
    np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(r, np.float32))
    assert int(tp.info(state).skipped_steps) == 0


def test_info_through_multisteps_around_a_partition():
    opt = optax.MultiSteps(
        optax.partition({"a": tp.adam_cg(), "b": optax.adam(1e-3)}, {"w": "a", "emb": "b"}), 2
    )
    state = opt.init(PARAMS)
    assert int(tp.info(state).phase) == 0
    assert len(tp.info_all(state)) == 1
