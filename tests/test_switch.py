"""Tests for twophase.switch: two_phase, adam_cg, adam_lbfgs."""

import itertools
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp

N, D, H = 256, 3, 6


def make_problem(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k[0], (N, D))
    teacher = {"w": jax.random.normal(k[1], (D, H)), "v": jax.random.normal(k[2], (H, 1))}
    y = jnp.tanh(x @ teacher["w"]) @ teacher["v"]
    params = {"w": 0.3 * jax.random.normal(k[3], (D, H)), "v": jnp.zeros((H, 1))}
    return x, y, params


def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2)


X, Y, PARAMS = make_problem()
FULL = lambda p: loss(p, X, Y)
BATCH = 32


def batches(epoch):
    perm = np.random.default_rng(epoch).permutation(N)
    for i in range(N // BATCH):
        idx = perm[i * BATCH : (i + 1) * BATCH]
        yield X[idx], Y[idx]


def make_step(opt):
    @jax.jit
    def step(p, s, x, y):
        value, grad = jax.value_and_grad(loss)(p, x, y)
        u, s = opt.update(grad, s, p, value=value, value_fn=FULL)
        return optax.apply_updates(p, u), s, u

    return step


def test_phase0_equals_optax_adam():
    opt = tp.adam_cg(1e-2, policy=tp.switch_at(10_000))
    ref = optax.adam(1e-2)
    p, s = PARAMS, opt.init(PARAMS)
    p_ref, s_ref = PARAMS, ref.init(PARAMS)
    update = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v, value_fn=FULL))
    ref_update = jax.jit(ref.update)
    for x, y in batches(0):
        g = jax.grad(loss)(p, x, y)
        u, s = update(g, s, p, loss(p, x, y))
        u_ref, s_ref = ref_update(jax.grad(loss)(p_ref, x, y), s_ref, p_ref)
        chex.assert_trees_all_close(u, u_ref, rtol=1e-6, atol=1e-9)
        p, p_ref = optax.apply_updates(p, u), optax.apply_updates(p_ref, u_ref)
    assert int(tp.info(s).phase) == 0


def test_switch_step_and_phase1_equals_nonlinear_cg():
    switch = 5
    opt = tp.adam_cg(1e-2, policy=tp.switch_at(switch))
    cg = tp.nonlinear_cg()
    step = make_step(opt)
    p, s = PARAMS, opt.init(PARAMS)
    it = iter([*batches(0), *batches(1)])
    for t in range(switch):
        x, y = next(it)
        p, s, _ = step(p, s, x, y)
        assert int(tp.info(s).phase) == (1 if t == switch - 1 else 0)
    assert int(tp.info(s).switch_step) == switch
    # From here on: exactly nonlinear_cg's updates, started at the switch point.
    p_cg, s_cg = p, cg.init(p)
    cg_step = jax.jit(lambda p, s: cg.update(p, s, p, value_fn=FULL))
    for _ in range(5):
        x, y = next(it)
        p, s, u = step(p, s, x, y)
        u_cg, s_cg = cg_step(p_cg, s_cg)
        chex.assert_trees_all_close(u, u_cg, rtol=1e-5, atol=1e-8)
        p_cg = optax.apply_updates(p_cg, u_cg)
    assert int(tp.info(s).cg_iterations) == 5


def test_training_switches_compiles_once_and_cg_lowers_full_loss_every_iteration(count_traces):
    detector = tp.norm_loss_slope(window=N // BATCH, estimator="exact")
    opt = tp.adam_cg(5e-3, policy=detector)
    traced = count_traces(
        lambda p, s, x, y: opt.update(
            jax.grad(loss)(p, x, y), s, p, value=loss(p, x, y), value_fn=FULL
        )
    )
    step = jax.jit(traced)
    p, s = PARAMS, opt.init(PARAMS)
    cg_losses = []
    for epoch in range(30):
        for x, y in batches(epoch):
            u, s = step(p, s, x, y)
            p = optax.apply_updates(p, u)
            if int(tp.info(s).phase) == 1:
                cg_losses.append(float(FULL(p)))
    info = tp.info(s)
    assert int(info.phase) == 1 and int(info.switch_step) > 0
    assert len(cg_losses) > 10
    assert all(b <= a + 1e-7 * abs(a) for a, b in itertools.pairwise(cg_losses))
    assert cg_losses[-1] < 0.5 * cg_losses[0]
    assert count_traces.counter["n"] == 1


def _train_epochs(opt, epochs, stop_after_cg=None):
    step = make_step(opt)
    p, s = PARAMS, opt.init(PARAMS)
    adam_losses, cg_losses = [], []
    for epoch in range(epochs):
        for x, y in batches(epoch):
            p, s, _ = step(p, s, x, y)
            if int(tp.info(s).phase) == 1:
                cg_losses.append(float(FULL(p)))
        if int(tp.info(s).phase) == 0:
            adam_losses.append(float(FULL(p)))
        if stop_after_cg and len(cg_losses) >= stop_after_cg:
            break
    return s, adam_losses, cg_losses


def _plateau(window):
    """The previous default detector of adam_cg (now passed explicitly)."""
    return tp.loss_plateau(window, patience=5, history=10, z_score=1.0)


@pytest.mark.slow  # ~11 s
def test_loss_plateau_waits_while_adam_progresses_and_fires_when_it_stalls():
    # lr 5e-3: the full-batch loss falls steadily for 40 epochs; no switch, no
    # full-batch evaluation (the detector is free).
    w = N // BATCH
    s, adam_losses, _ = _train_epochs(tp.adam_cg(5e-3, policy=_plateau(w)), 40)
    info = tp.info(s)
    assert int(info.phase) == 0 and int(info.value_and_grad_evals) == 0
    assert adam_losses[-1] < 0.2 * adam_losses[10]
    # lr 0.1: Adam stalls at its noise floor (around epoch 150 here); the detector
    # fires (at the earliest after history 10 + patience 5 - 1 windows) and CG
    # then lowers the full-batch loss at every iteration, well below Adam's.
    s, adam_losses, cg_losses = _train_epochs(tp.adam_cg(0.1, policy=_plateau(w)), 400, 20)
    info = tp.info(s)
    assert int(info.phase) == 1
    assert int(info.switch_step) >= 14 * (N // BATCH)
    assert all(b <= a + 1e-7 * abs(a) for a, b in itertools.pairwise(cg_losses))
    assert cg_losses[-1] < 0.7 * adam_losses[-1]


def test_nonfinite_minibatch_gradient_is_skipped_and_counted():
    opt = tp.adam_cg(1e-2, steps_per_epoch=4)
    s = opt.init(PARAMS)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), PARAMS)
    u, s2 = opt.update(bad, s, PARAMS, value=jnp.asarray(1.0), value_fn=FULL)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, PARAMS))
    assert int(tp.info(s2).skipped_steps) == 1
    chex.assert_trees_all_equal(s2.first_state, s.first_state)
    chex.assert_trees_all_equal(s2.detector_state, s.detector_state)
    u, s3 = opt.update(PARAMS, s, PARAMS, value=jnp.asarray(jnp.inf), value_fn=FULL)
    assert int(tp.info(s3).skipped_steps) == 1


def test_after_gradient_clipping_in_a_chain_and_info_finds_state():
    opt = optax.chain(optax.clip_by_global_norm(1.0), tp.adam_cg(1e-2, policy=tp.switch_at(3)))
    step = make_step(opt)
    p, s = PARAMS, opt.init(PARAMS)
    for x, y in list(batches(0))[:6]:
        p, s, _ = step(p, s, x, y)
    info = tp.info(s)
    assert int(info.phase) == 1 and int(info.cg_iterations) == 3


def test_inject_hyperparams_learning_rate():
    opt = optax.inject_hyperparams(tp.adam_cg)(learning_rate=1e-2)
    ref = optax.adam(1e-2)
    s, s_ref = opt.init(PARAMS), ref.init(PARAMS)
    g = jax.grad(loss)(PARAMS, X, Y)
    u, s = opt.update(g, s, PARAMS, value=FULL(PARAMS), value_fn=FULL)
    u_ref, _ = ref.update(g, s_ref, PARAMS)
    chex.assert_trees_all_close(u, u_ref, rtol=1e-6)
    s.hyperparams["learning_rate"] = jnp.asarray(1e-3)
    u2, _ = opt.update(g, s, PARAMS, value=FULL(PARAMS), value_fn=FULL)
    assert float(jnp.abs(u2["v"]).max()) < 0.2 * float(jnp.abs(u["v"]).max())
    assert int(tp.info(s).phase) == 0


def test_inject_hyperparams_adam_constants_match_optax_adam():
    """Injected b1, b2, eps reach the fused Adam step as traced scalars."""
    hyper = dict(learning_rate=1e-2, b1=0.8, b2=0.95, eps=1e-6)

    def adam_cg(learning_rate, b1, b2, eps):
        adam = tp.gated_adam(learning_rate, b1, b2, eps)
        return tp.two_phase(adam, tp.nonlinear_cg(), tp.switch_at(100))

    opt = optax.inject_hyperparams(adam_cg)(**hyper)
    ref = optax.inject_hyperparams(optax.adam)(**hyper)
    step = jax.jit(lambda p, s: opt.update(jax.grad(FULL)(p), s, p, value=FULL(p), value_fn=FULL))
    p, s, p_ref, s_ref = PARAMS, opt.init(PARAMS), PARAMS, ref.init(PARAMS)
    for _ in range(5):
        u, s = step(p, s)
        u_ref, s_ref = ref.update(jax.grad(FULL)(p_ref), s_ref, p_ref)
        chex.assert_trees_all_close(u, u_ref, rtol=1e-6, atol=1e-9)
        p, p_ref = optax.apply_updates(p, u), optax.apply_updates(p_ref, u_ref)
    assert isinstance(s.hyperparams["b1"], jax.Array)  # injected, not a Python constant


def test_vmap_over_an_ensemble_matches_separate_runs():
    opt = tp.adam_cg(1e-2, policy=tp.switch_at(3))
    members = [make_problem(seed)[2] for seed in range(3)]
    ensemble = jax.tree.map(lambda *a: jnp.stack(a), *members)

    def one_step(p, s):
        g = jax.grad(FULL)(p)
        u, s = opt.update(g, s, p, value=FULL(p), value_fn=FULL)
        return optax.apply_updates(p, u), s

    vstep = jax.jit(jax.vmap(one_step))
    p, s = ensemble, jax.vmap(opt.init)(ensemble)
    for _ in range(6):
        p, s = vstep(p, s)
    for i, member in enumerate(members):
        q, t = member, opt.init(member)
        for _ in range(6):
            q, t = jax.jit(one_step)(q, t)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], p), q, rtol=2e-4, atol=1e-6)


def _lying_objective():
    """FULL with a gradient that points uphill: every CG line search fails."""

    @jax.custom_vjp
    def lying(p):
        return FULL(p)

    lying.defvjp(
        lambda p: (FULL(p), p),
        lambda p, ct: (jax.tree.map(lambda g: -ct * g, jax.grad(FULL)(p)),),
    )
    return lying


def test_fallback_returns_to_phase0_after_consecutive_failures():
    lying = _lying_objective()
    opt = tp.adam_cg(1e-2, policy=tp.from_detector(tp.switch_at(2), fallback=3))
    step = jax.jit(lambda p, s: opt.update(jax.grad(FULL)(p), s, p, value=FULL(p), value_fn=lying))
    p, s = PARAMS, opt.init(PARAMS)
    phases = []
    for _ in range(8):
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
        phases.append(int(tp.info(s).phase))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
    # Phase after each step: Adam at steps 0-1 (the switch fires at step 1), CG
    # failing at steps 2-4, back to a re-armed Adam at steps 5-6, CG again at 7.
    assert phases == [0, 1, 1, 1, 0, 0, 1, 1]
    assert int(tp.info(s).fallbacks) == 1
    assert int(tp.info(s).switch_step) == 7
    assert int(tp.info(s).linesearch_failures) == 1


def _counting(fn):
    """``fn`` and a dict whose ``"n"`` counts its executed calls (also under jit)."""
    calls = {"n": 0}

    def count():
        calls["n"] += 1

    def counted(p):
        jax.debug.callback(count)
        return fn(p)

    return counted, calls


def test_adam_lbfgs_reuses_stored_value_and_grad():
    counted, calls = _counting(FULL)
    opt = tp.adam_lbfgs(1e-2, policy=tp.switch_at(1))
    step = jax.jit(
        lambda p, s: opt.update(jax.grad(FULL)(p), s, p, value=FULL(p), value_fn=counted)
    )
    p, s = PARAMS, opt.init(PARAMS)
    losses = []
    for _ in range(10):
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
        losses.append(float(FULL(p)))
    jax.effects_barrier()
    linesearch_steps = 0
    # 9 L-BFGS steps; only the first evaluates at its starting point, each
    # evaluates at its line-search trial points (counted by optax in its info).
    assert losses[-1] < 0.2 * losses[0]
    lbfgs_state = s.second_state
    linesearch_steps = int(optax.tree.get(lbfgs_state, "info").num_linesearch_steps)
    assert calls["n"] <= 1 + 9 * max(linesearch_steps, 1) + 9
    # info counts exactly the evaluations that ran (tp.train charges them as cost).
    assert int(tp.info(s).value_and_grad_evals) == calls["n"]
    assert int(s.second_phase_evals) == calls["n"]


def test_info_sums_the_evaluations_of_every_combined_detector():
    counted, calls = _counting(FULL)
    detector = tp.any_of(tp.grad_norm_peak(window=2), tp.norm_loss_slope(window=3))
    opt = tp.adam_cg(1e-2, policy=detector)
    step = jax.jit(
        lambda p, s: opt.update(jax.grad(FULL)(p), s, p, value=FULL(p), value_fn=counted)
    )
    p, s = PARAMS, opt.init(PARAMS)
    for _ in range(12):
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
    jax.effects_barrier()
    members = [int(d.value_and_grad_evals) for d in s.detector_state]
    assert all(n > 0 for n in members), members  # both detectors evaluated
    assert int(tp.info(s).value_and_grad_evals) == sum(members) + int(
        s.second_state.value_and_grad_evals
    )
    assert int(tp.info(s).value_and_grad_evals) == calls["n"]


def test_precondition_hands_adam_second_moments_to_cg():
    opt = tp.adam_cg(1e-2, policy=tp.switch_at(3), precondition=True)
    step = make_step(opt)
    p, s = PARAMS, opt.init(PARAMS)
    for x, y in list(batches(0))[:3]:
        p, s, _ = step(p, s, x, y)
    assert int(tp.info(s).phase) == 1
    nu = s.first_state[0].nu
    pre = s.second_state.preconditioner
    ratio = jax.tree.map(lambda a, v: a * (jnp.sqrt(v) + 1e-12), pre, nu)
    leaves = jnp.concatenate([r.ravel() for r in jax.tree.leaves(ratio)])
    assert float(jnp.std(leaves) / jnp.mean(leaves)) < 1e-2  # P proportional to 1/sqrt(nu)


def test_missing_value_fn_is_a_type_error():
    opt = tp.adam_cg()
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS, value=jnp.asarray(1.0))


def test_detector_that_needs_value_is_a_type_error_without_it():
    opt = tp.adam_cg(policy=tp.norm_loss_slope(estimator="minibatch"))
    with pytest.raises(TypeError, match="value"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS, value_fn=FULL)
    # So does the default detector (loss_plateau, on the mini-batch losses) ...
    opt = tp.adam_cg()
    with pytest.raises(TypeError, match="value"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS, value_fn=FULL)
    # ... but not one that evaluates the full-batch loss itself.
    opt = tp.adam_cg(policy=tp.norm_loss_slope(estimator="exact"))
    u, _ = opt.update(PARAMS, opt.init(PARAMS), PARAMS, value_fn=FULL)
    chex.assert_trees_all_equal_structs(u, PARAMS)


def _from_detector(**kwargs):
    return tp.adam_cg(policy=tp.from_detector(tp.switch_at(1), **kwargs))


@pytest.mark.parametrize(
    "make,kwargs,name",
    [
        (tp.grad_norm_peak, dict(ratio=0.0), "ratio"),
        (tp.grad_norm_peak, dict(ratio=1.1), "ratio"),
        (tp.adam_cg, dict(steps_per_epoch=0), "steps_per_epoch"),
        (tp.safe_resort, dict(min_steps=-1), "min_steps"),
        (tp.adam_cg, dict(policy="peak"), "policy"),
        (
            tp.two_phase,
            dict(
                first=optax.adam(1.0), second=optax.sgd(1.0), detector=tp.switch_at(1), fallback=0
            ),
            "fallback",
        ),
        (
            tp.two_phase,
            dict(
                first=optax.adam(1.0), second=optax.sgd(1.0), detector=tp.switch_at(1), fallback=2.0
            ),
            "fallback",
        ),
        (tp.nonlinear_cg, dict(beta="nope"), "beta"),
        (tp.adam_cg, dict(learning_rate=-1e-3), "learning_rate"),
        (tp.adam_cg, dict(learning_rate="fast"), "learning_rate"),
        (tp.adam_cg, dict(learning_rate=None), "learning_rate"),
        (tp.gated_adam, dict(b1=1.0), "b1"),
        (tp.gated_adam, dict(b2=-0.1), "b2"),
        (tp.gated_adam, dict(eps=-1.0), "eps"),
        (tp.gated_adam, dict(eps=float("nan")), "eps"),
        (tp.adam_cg, dict(precondition="yes"), "precondition"),
    ],
)
def test_bad_arguments(make, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make(**kwargs)


def test_bad_two_phase_and_adam_lbfgs_arguments():
    cg = tp.nonlinear_cg()
    with pytest.raises(ValueError, match="`first`"):
        tp.two_phase(None, cg, tp.switch_at(1))
    with pytest.raises(ValueError, match="`second`"):
        tp.two_phase(optax.adam(1e-3), tp.nonlinear_cg, tp.switch_at(1))
    with pytest.raises(ValueError, match="`handover`"):
        tp.two_phase(optax.adam(1e-3), cg, tp.switch_at(1), handover=3)
    with pytest.raises(TypeError, match="`memory_size`"):
        tp.adam_lbfgs(memory_size=0)
    with pytest.raises(ValueError, match="`learning_rate`"):
        tp.adam_lbfgs(-1.0)


def test_numpy_and_injected_integer_arguments_are_accepted():
    # NumPy scalars (e.g. computed from array sizes) and injected hyperparameters (0-d
    # arrays) pass the same checks as Python numbers.
    tp.adam_cg(policy=tp.safe_resort(max_failures=np.int64(2)), steps_per_epoch=None)
    tp.adam_cg(steps_per_epoch=np.int32(5))
    tp.gated_adam(b1=np.float32(0.9))

    def adam_cg(learning_rate, fallback, detector):
        return tp.adam_cg(learning_rate, policy=tp.from_detector(detector, fallback))

    opt = optax.inject_hyperparams(adam_cg, static_args=("detector",))(
        learning_rate=1e-2, fallback=3, detector=tp.switch_at(2)
    )
    p, s = PARAMS, opt.init(PARAMS)
    for _ in range(3):
        u, s = opt.update(jax.grad(FULL)(p), s, p, value=FULL(p), value_fn=FULL)
        p = optax.apply_updates(p, u)
    assert int(tp.info(s).phase) == 1 and int(tp.info(s).cg_iterations) == 1


def test_per_example_value_is_a_value_error():
    opt = tp.adam_cg(policy=tp.switch_at(5))
    per_example = jnp.ones(8)
    with pytest.raises(ValueError, match="`value`"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS, value=per_example, value_fn=FULL)


def test_adam_lbfgs_accepts_optax_lbfgs_grad_keyword():
    opt = tp.adam_lbfgs(1e-2, policy=tp.switch_at(1))
    p, s = PARAMS, opt.init(PARAMS)
    for _ in range(3):
        g = jax.grad(FULL)(p)
        u, s = opt.update(g, s, p, value=FULL(p), grad=g, value_fn=FULL)
        p = optax.apply_updates(p, u)
    assert float(FULL(p)) < float(FULL(PARAMS))


@pytest.mark.parametrize(
    "kwargs, value_fn",
    [
        (dict(), FULL),
        # ~8 s each: the plain and fallback cases stay in the fast suite.
        pytest.param(dict(precondition=True), FULL, marks=pytest.mark.slow),
        pytest.param(
            dict(learning_rate=optax.linear_schedule(1e-2, 1e-3, 6)), FULL, marks=pytest.mark.slow
        ),
        (dict(fallback=2), _lying_objective()),
        pytest.param(dict(lbfgs=True), FULL, marks=pytest.mark.slow),
    ],
    ids=["plain", "precondition", "schedule", "fallback", "adam_lbfgs"],
)
def test_adam_cg_fused_adam_equals_generic_two_phase(kwargs, value_fn):
    """adam_cg and adam_lbfgs run Adam in a fused, scalar-gated pass: same
    updates and states as two_phase(optax.adam, ...) through a skipped step,
    the switch, second-phase steps and a fallback."""
    kwargs = dict(kwargs)
    lr = kwargs.pop("learning_rate", 1e-2)
    precondition = kwargs.get("precondition", False)
    if kwargs.pop("lbfgs", False):
        fused = tp.adam_lbfgs(lr, policy=tp.switch_at(4))
        generic = tp.two_phase(optax.adam(lr), optax.lbfgs(), tp.switch_at(4))
    else:
        fallback = kwargs.pop("fallback", None)
        fused = tp.adam_cg(lr, policy=tp.from_detector(tp.switch_at(4), fallback), **kwargs)
        generic = tp.two_phase(
            optax.adam(lr),
            tp.nonlinear_cg(preconditioner="state" if precondition else None),
            tp.switch_at(4),
            fallback=fallback,
            handover=tp.adam_second_moment_preconditioner if precondition else None,
        )

    def run(opt):
        @jax.jit
        def step(p, s, g):
            u, s = opt.update(g, s, p, value=FULL(p), value_fn=value_fn)
            return optax.apply_updates(p, u), s, u

        p, s, out = PARAMS, opt.init(PARAMS), []
        for t in range(11):
            g = jax.grad(FULL)(p)
            if t == 1:
                g = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), g)
            p, s, u = step(p, s, g)
            out.append((u, int(tp.info(s).phase)))
        return out, s

    fused_out, fused_state = run(fused)
    generic_out, generic_state = run(generic)
    assert [ph for _, ph in fused_out] == [ph for _, ph in generic_out]
    assert 1 in [ph for _, ph in fused_out]
    for (u, _), (v, _) in zip(fused_out, generic_out, strict=True):
        chex.assert_trees_all_close(u, v, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_close(fused_state, generic_state, rtol=1e-5, atol=1e-8)
    assert int(tp.info(fused_state).skipped_steps) == 1
    if "fallback" in kwargs:
        assert int(tp.info(fused_state).fallbacks) >= 1


def test_adam_newton_cg_equals_two_phase_with_newton_cg_and_counts_hvps():
    fused = tp.adam_newton_cg(1e-2, policy=tp.switch_at(12))
    generic = tp.two_phase(optax.adam(1e-2), tp.newton_cg(), tp.switch_at(12))
    runs = []
    for opt in (fused, generic):
        step = jax.jit(
            lambda p, s, opt=opt: opt.update(jax.grad(FULL)(p), s, p, value=FULL(p), value_fn=FULL)
        )
        p, s = PARAMS, opt.init(PARAMS)
        for _ in range(20):
            u, s = step(p, s)
            p = optax.apply_updates(p, u)
        runs.append((p, tp.info(s)))
    (p1, i1), (p2, i2) = runs
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), p1, p2)
    assert int(i1.phase) == 1 and int(i1.hessian_vector_products) > 0
    assert int(i1.hessian_vector_products) == int(i2.hessian_vector_products)
    np.testing.assert_allclose(
        float(i1.cost),
        int(i1.value_and_grad_evals) + tp.HVP_COST * int(i1.hessian_vector_products),
    )
    assert float(FULL(p1)) < 0.05 * float(FULL(PARAMS))


def test_train_charges_newton_cg_hessian_vector_products():
    result = tp.train(
        lambda p, b: loss(p, *b), PARAMS, (X, Y),
        tp.adam_newton_cg(1e-2, policy=tp.switch_at(2 * (N // 32))),
        batch_size=32, cost_budget=100, progress=False,
    )  # fmt: skip
    info = tp.info(result.opt_state)
    assert int(info.switches) >= 1 and int(info.hessian_vector_products) > 0
    phase1 = sum(r["epoch_cost"] for r in result.history if r["phase"] == 1)
    np.testing.assert_allclose(phase1, float(info.cost), rtol=1e-6)
    assert float(info.cost) > int(info.value_and_grad_evals)  # HVPs are charged


def test_a_first_phase_resume_is_applied_at_every_return():
    """A first phase with ``resume`` (optax.adam with
    twophase.first_phase.reset_momentum): at a return its state passes through
    it (first moment zero, second moment and count as at the switch); without
    ``resume`` Adam's state comes back as it was."""
    adam = optax.adam(1e-2)
    resuming = SimpleNamespace(
        init=adam.init, update=adam.update, resume=tp.first_phase.reset_momentum
    )
    lying = _lying_objective()
    for first, reset in ((resuming, True), (adam, False)):
        opt = tp.two_phase(first, tp.nonlinear_cg(), tp.switch_at(2), fallback=1)

        @jax.jit
        def step(p, s, opt=opt):
            u, s = opt.update(jax.grad(FULL)(p), s, p, value=FULL(p), value_fn=lying)
            return optax.apply_updates(p, u), s

        p, s = PARAMS, opt.init(PARAMS)
        at_switch = None
        while int(s.fallbacks) == 0 and int(s.step) < 20:
            p, s = step(p, s)
            if int(s.phase) == 1 and at_switch is None:
                at_switch = s.first_state[0]
        assert int(s.fallbacks) == 1 and at_switch is not None
        back = s.first_state[0]
        chex.assert_trees_all_equal(back.nu, at_switch.nu)
        chex.assert_trees_all_equal(back.count, at_switch.count)
        moved = any(float(jnp.max(jnp.abs(m))) > 0 for m in jax.tree.leaves(at_switch.mu))
        assert moved
        if reset:
            assert all(float(jnp.max(jnp.abs(m))) == 0 for m in jax.tree.leaves(back.mu))
        else:
            chex.assert_trees_all_equal(back.mu, at_switch.mu)
