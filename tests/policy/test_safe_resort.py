"""Tests for twophase.policy: safe_resort, from_detector, configure."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp
from twophase.policy import SafeResortConfig, clock
from twophase.policy.safe_resort import (
    configure,
    final_reserve,
    least_squares_pace,
    safe_resort,
)

N, D = 256, 4
STEPS = 8  # mini-batch steps per epoch
KEY = jax.random.split(jax.random.PRNGKey(0), 3)
X = jax.random.normal(KEY[0], (N, D))
W_TRUE = jax.random.normal(KEY[1], (D, 1))
Y = X @ W_TRUE + 0.1 * jax.random.normal(KEY[2], (N, 1))
PARAMS = {"w": jnp.zeros((D, 1)), "b": jnp.zeros((1,))}


def loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


FULL = lambda p: loss(p, X, Y)


def slow_second_phase(rate=1e-4):
    """A second phase honouring the contract by field names: one full-batch
    gradient step of size ``rate`` per update (far slower than Adam)."""

    class SlowState(tuple):
        pass

    from typing import NamedTuple

    class State(NamedTuple):
        value: jax.Array
        value_and_grad_evals: jax.Array
        consecutive_failures: jax.Array

    def init(params):
        return State(jnp.asarray(jnp.inf), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, value_fn, **extra):
        grad = jax.grad(value_fn)(params)
        step = jax.tree.map(lambda g: -rate * g, grad)
        new_value = value_fn(optax.apply_updates(params, step))
        return step, State(new_value, state.value_and_grad_evals + 2, jnp.zeros([], jnp.int32))

    return optax.GradientTransformationExtraArgs(init, update)


def run(opt, epochs, value_fn=FULL, jit=True):
    step = lambda p, s, x, y: _step(opt, value_fn, p, s, x, y)
    step = jax.jit(step) if jit else step
    p, s = PARAMS, opt.init(PARAMS)
    states = []
    for epoch in range(epochs):
        perm = np.random.default_rng(epoch).permutation(N)
        if int(s.phase) == 1:  # a phase-1 epoch is one second-phase iteration
            p, s = step(p, s, X[:1], Y[:1])
            states.append(s)
            continue
        for i in range(STEPS):
            idx = perm[i * (N // STEPS) : (i + 1) * (N // STEPS)]
            p, s = step(p, s, X[idx], Y[idx])
            states.append(s)
            if int(s.phase) == 1:
                break
    return p, s, states


def _step(opt, value_fn, p, s, x, y):
    value, grad = jax.value_and_grad(loss)(p, x, y)
    u, s = opt.update(grad, s, p, value=value, value_fn=value_fn)
    return optax.apply_updates(p, u), s


def test_pace_is_the_least_squares_decrease_over_the_last_points():
    ring = jnp.zeros([8])
    logs = 5.0 - 0.3 * jnp.arange(11.0)  # decreasing by 0.3 per epoch
    for i, v in enumerate(logs):
        ring = ring.at[i % 8].set(v)
    # The last 5 points of a straight line: pace 0.3, whatever the ring's wrap.
    np.testing.assert_allclose(
        least_squares_pace(ring, jnp.int32(11), jnp.int32(5)), 0.3, rtol=1e-5
    )
    noisy = ring.at[(10 - 6) % 8].set(100.0)  # outside the last 5: ignored
    np.testing.assert_allclose(
        least_squares_pace(noisy, jnp.int32(11), jnp.int32(5)), 0.3, rtol=1e-5
    )
    assert (
        float(least_squares_pace(ring, jnp.int32(2), jnp.int32(5))) == 0.0
    )  # fewer than 3 points: unused


def test_a_slow_second_phase_is_tried_and_returned_from_with_adam_state_kept():
    policy = safe_resort(steps_per_epoch=STEPS, config=SafeResortConfig(explore=0.2))
    opt = tp.two_phase(optax.adam(1e-2), slow_second_phase(), policy)
    _, s, states = run(opt, 60)
    info = tp.info(s)
    assert int(info.switches) >= 2
    assert int(info.fallbacks) >= 2  # every trial lost and was returned from
    assert int(info.return_step) > int(info.switch_step) > 0
    # Adam's moments are kept across a trial: the first-phase state right after
    # a return equals the one at the switch.
    for before, after in itertools.pairwise(states):
        if int(before.phase) == 0 and int(after.phase) == 1:
            at_switch = after.first_state
        if int(before.phase) == 1 and int(after.phase) == 0:
            jax.tree.map(np.testing.assert_array_equal, after.first_state, at_switch)
    # Without a budget, failed trials spend at most `explore` of the cost so
    # far, plus the one trial that may start while it is within limits.
    policy_state = s.detector_state
    assert float(policy_state.trial_spent) <= 0.2 * float(policy_state.cost) + 4.0


def test_a_fast_second_phase_is_kept():
    # CG on a linear least-squares problem converges in a few iterations: far
    # faster than Adam's pace, so the first trial is kept to the end.
    opt = tp.adam_cg(1e-3, steps_per_epoch=STEPS)
    p, s, _ = run(opt, 25)
    info = tp.info(s)
    assert int(info.switches) == 1 and int(info.fallbacks) == 0
    assert int(info.phase) == 1
    exact = np.linalg.lstsq(
        np.concatenate([np.asarray(X), np.ones((N, 1))], 1), np.asarray(Y), rcond=None
    )[0]
    np.testing.assert_allclose(np.asarray(p["w"]), exact[:D], atol=1e-5)


def test_late_polish_keeps_a_slow_second_phase_to_the_end_of_the_budget():
    budget = 20.0
    opt = tp.two_phase(optax.adam(1e-2), slow_second_phase(), safe_resort(STEPS, budget=budget))
    _, _, states = run(opt, 40)
    costs = [float(x.detector_state.cost) for x in states]
    phases = [int(x.phase) for x in states]
    # From 90% of the budget on, phase 1 is never left.
    polish = [i for i, c in enumerate(costs) if c >= 0.9 * budget]
    first = polish[0]
    assert all(p == 1 for p in phases[first + 1 :])


def test_trial_with_nonfinite_values_returns_and_never_moves_parameters_to_nan():
    def poisoned(p):  # finite for Adam's mini-batches, NaN for the full batch
        return loss(p, X, Y) + jnp.nan

    opt = tp.adam_cg(1e-2, steps_per_epoch=STEPS)
    p, s, _ = run(opt, 15, value_fn=poisoned)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p))
    info = tp.info(s)
    assert int(info.switches) >= 1 and int(info.fallbacks) == int(info.switches) - int(info.phase)


def test_compiles_once_across_switches_and_returns(count_traces):
    opt = tp.two_phase(
        optax.adam(1e-2),
        slow_second_phase(),
        safe_resort(steps_per_epoch=STEPS, config=SafeResortConfig(explore=0.2)),
    )
    traced = count_traces(lambda p, s, x, y: _step(opt, FULL, p, s, x, y))
    step = jax.jit(traced)
    p, s = PARAMS, opt.init(PARAMS)
    for _ in range(40):
        for i in range(STEPS):
            idx = slice(i * 32, (i + 1) * 32)
            p, s = step(p, s, X[idx], Y[idx])
    assert int(tp.info(s).fallbacks) >= 1
    assert count_traces.counter["n"] == 1


def test_train_hands_its_budget_and_epoch_length_to_the_policy():
    result = tp.train(
        lambda p, b: loss(p, *b),
        PARAMS,
        (X, Y),
        tp.adam_cg(1e-2),
        batch_size=32,
        cost_budget=12,
        strict_budget=True,
        progress=False,
    )
    policy_state = result.opt_state.detector_state
    assert float(policy_state.budget) == 12.0
    assert float(policy_state.epoch_steps) == N // 32
    assert result.history[-1]["cost"] <= 12.0
    # The optimizer's own cost account agrees with train's.
    np.testing.assert_allclose(float(policy_state.cost), result.history[-1]["cost"], rtol=1e-6)


def test_budget_contradicting_cost_budget_is_rejected_naming_both():
    with pytest.raises(ValueError, match=r"`budget`.*`cost_budget`"):
        tp.train(
            lambda p, b: loss(p, *b),
            PARAMS,
            (X, Y),
            tp.adam_cg(1e-2, budget=50),
            batch_size=32,
            cost_budget=12,
            progress=False,
        )


@pytest.mark.parametrize("budget", [0, -3, float("inf"), float("nan"), "10", True])
def test_bad_budget_is_rejected(budget):
    with pytest.raises(ValueError, match="budget"):
        tp.adam_cg(1e-2, budget=budget)
    with pytest.raises(ValueError, match="budget"):
        tp.adam_lbfgs(1e-2, budget=budget)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"polish": 0},
        {"polish": 1.5},
        {"judge": 1.0},
        {"explore": 0},
        {"min_judge": 0},
        {"growth": 0.5},
        {"history": 2},
        {"hopeless": 1.0},
        {"hopeless": -0.1},
        {"hopeless": True},
        {"assumed_steps_per_epoch": 0},
    ],
)
def test_bad_policy_constants_are_rejected_naming_them(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"`{name}`"):
        safe_resort(config=SafeResortConfig(**kwargs))


@pytest.mark.parametrize(
    "kwargs", [{"steps_per_epoch": 0}, {"steps_per_epoch": 2.5}, {"max_failures": 0}]
)
def test_bad_policy_arguments_are_rejected_naming_them(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"`{name}`"):
        safe_resort(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "new"),
    [
        ({"window": 8}, "steps_per_epoch"),
        ({"explore": 0.1}, r"config=SafeResortConfig\(explore=...\)"),
        ({"floor": -5.0}, "no loss floor"),
    ],
)
def test_removed_arguments_name_their_new_spelling(kwargs, new):
    with pytest.raises(TypeError, match=new):
        safe_resort(**kwargs)


def test_budget_with_a_detector_and_fallback_with_a_policy_are_rejected():
    with pytest.raises(ValueError, match="budget"):
        tp.adam_cg(1e-2, policy=tp.switch_at(3), budget=10)
    with pytest.raises(ValueError, match="fallback"):
        tp.two_phase(optax.adam(1e-2), tp.nonlinear_cg(), safe_resort(4), fallback=2)


def test_policy_needs_value_at_trace_time():
    opt = tp.adam_cg(1e-2)
    s = opt.init(PARAMS)
    with pytest.raises(TypeError, match="value"):
        opt.update(jax.grad(FULL)(PARAMS), s, PARAMS, value_fn=FULL)


def test_ratio_is_removed_naming_its_new_spelling():
    with pytest.raises(TypeError, match=r"ratio.*grad_norm_peak"):
        tp.adam_cg(1e-2, ratio=0.9)
    with pytest.raises(TypeError, match="ratio"):
        tp.adam_cg(1e-2, ratio=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.adam_cg(1e-2)  # no warning by default


def test_configure_leaves_other_states_alone():
    state = optax.adam(1e-2).init(PARAMS)
    assert configure(state, budget=10, steps_per_epoch=3) is not None
    configured = configure(tp.adam_cg(1e-2).init(PARAMS), budget=None, steps_per_epoch=3)
    assert float(configured.detector_state.budget) == 0.0  # unknown
    assert float(configured.detector_state.epoch_steps) == 3.0


def _at_cost(cost):
    """The fields of a safe_resort state whose account reads ``cost`` (whole
    epochs plus a second-phase remainder)."""
    whole = int(np.floor(cost))
    return {
        "clock": clock.Clock(jnp.int32(whole), jnp.int32(0), jnp.float32(cost - whole)),
        "cost": jnp.float32(cost),
    }


def _judging(budget=1000.0, trial_start=200.0, adam_pace=0.01, epochs=40):
    """safe_resort's state inside a trial: the switch at ``trial_start`` with the
    switch point's loss 1 (log 0), Adam's pace frozen at ``adam_pace``."""
    policy = safe_resort(STEPS, budget=budget)
    # tp.train's account (no caller's gradient in phase 1; test_clock.py tests that charge).
    state = policy.init(PARAMS)._replace(
        charges_incoming=jnp.asarray(False),
        **_at_cost(trial_start),
        epochs=jnp.int32(epochs),
        adam_pace=jnp.float32(adam_pace),
        trial_start=jnp.float32(trial_start),
        segment_cost=jnp.float32(trial_start),
        reference_cost=jnp.float32(trial_start),
        reference_value=jnp.float32(1.0),
        trials=jnp.int32(1),
        wait=jnp.float32(8.0),
    )
    return policy, state


def _trial(policy, state, log_values, cost=10.0, raw=False):
    """Feeds the trial steps of ``cost`` each with losses ``exp(log_values)``
    (``log_values`` themselves with ``raw``)."""
    backs = []
    for v in log_values:
        state, back = policy.second(
            state,
            value=jnp.float32(v) if raw else jnp.exp(jnp.float32(v)),
            cost=jnp.float32(cost),
            failures=jnp.int32(0),
            finite=jnp.bool_(True),
            params=PARAMS,
        )
        backs.append(bool(back))
    return state, backs


def test_a_trial_is_judged_on_its_total_gain_since_the_switch():
    # Segments of 0.05 * 200 = 10. At Adam's pace 0.01 per epoch-equivalent a slow
    # second segment (0.05 against Adam's 0.1) stays while the total is ahead
    # (0.55 in 20 against 0.2): early-basin trials pass such segments.
    policy, state = _judging(adam_pace=0.01)
    _, backs = _trial(policy, state, [-0.5, -0.55, -0.6])
    assert backs == [False, False, False]
    # At 0.03 the total falls behind at the second judgement (0.55 < 0.6).
    policy, state = _judging(adam_pace=0.03)
    _, backs = _trial(policy, state, [-0.5, -0.55])
    assert backs == [False, True]


def test_a_costly_first_step_is_not_judged_alone():
    # Segments of 10. A first step of cost 95 (Newton-CG's Nystrom sketch of 60 products
    # at 1.5 evaluations each, plus its iteration) that gained 0.3 is behind Adam's 0.95
    # for that cost; judged alone, the trial would return. The second step, cheap and
    # far down, is judged with it: 2.0 in 100 against Adam's 1.0 is ahead.
    policy, state = _judging(trial_start=200.0, adam_pace=0.01)
    state, backs = _trial(policy, state, [-0.3], cost=95.0)
    assert backs == [False]
    state, backs = _trial(policy, state, [-2.0], cost=5.0)
    assert backs == [False]
    # A second step that stays behind returns.
    policy, state = _judging(trial_start=200.0, adam_pace=0.01)
    state, _ = _trial(policy, state, [-0.3], cost=95.0)
    _, backs = _trial(policy, state, [-0.35], cost=5.0)
    assert backs == [True]
    # A first step of up to two segments is judged alone (a CG step with a long line
    # search): 0.1 in 20 against Adam's 0.2.
    policy, state = _judging(trial_start=200.0, adam_pace=0.01)
    _, backs = _trial(policy, state, [-0.1], cost=20.0)
    assert backs == [True]


def test_polish_is_judged_on_a_reliable_pace_and_the_final_polish_is_not():
    # At 900 of 1000 a segment is 0.05 * 100 = 5. A polish slower than Adam returns
    # when Adam's pace rests on >= 16 epochs, and the next polish is the final one.
    policy, state = _judging(trial_start=900.0, adam_pace=0.01, epochs=40)
    state, backs = _trial(policy, state, [-0.01], cost=6.0)
    assert backs == [True]
    rearmed = policy.rearm(state, PARAMS)
    # The final polish: max(2 * min_judge, 0.5%, two iterations of cost 6) left.
    assert float(rearmed.polish_after) == 1000.0 - 12.0
    # On a pace of 5 epochs the polish stays (the late polish of small budgets).
    policy, state = _judging(trial_start=900.0, adam_pace=0.01, epochs=5)
    _, backs = _trial(policy, state, [-0.01], cost=6.0)
    assert backs == [False]
    # The final polish runs to the end whatever its pace.
    policy, state = _judging(trial_start=995.0, adam_pace=0.01, epochs=40)
    _, backs = _trial(policy, state, [-0.001, -0.002], cost=2.0)
    assert backs == [False, False]


def test_a_final_polish_that_fails_is_not_retried():
    policy, state = _judging(trial_start=995.0, epochs=40)
    state = state._replace(**_at_cost(997.0))
    rearmed = policy.rearm(state, PARAMS)
    assert float(rearmed.polish_after) > 1000.0


def test_adam_is_extrapolated_linearly_only_as_long_as_the_run_before_the_trial():
    # Switch at cost 20 with Adam's pace 0.05 per epoch. A trial fast at first and
    # slowing down (gain G log(1 + s / 20) / log(11) after s) is ahead of Adam at every
    # judgement for G = 5: after 200 it has gained 5, where linear extrapolation
    # would credit Adam 10 (and return it, like the PINN trial of RESULTS section 7),
    # but beyond the run's age (20) Adam's pace decays as 1 / cost:
    # 0.05 * 20 * (1 + log(200 / 20)) = 3.30.
    spent = 10.0 * np.arange(1, 21)
    shape = np.log1p(spent / 20.0) / np.log(11.0)
    policy, state = _judging(budget=1000.0, trial_start=20.0, adam_pace=0.05, epochs=10)
    _, backs = _trial(policy, state, list(-5.0 * shape), cost=10.0)
    assert not any(backs)
    # For G = 3 it falls behind within the run's age (0.87 < 0.05 * 20 after 20).
    policy, state = _judging(budget=1000.0, trial_start=20.0, adam_pace=0.05, epochs=10)
    _, backs = _trial(policy, state, list(-3.0 * shape[:2]), cost=10.0)
    assert backs == [False, True]


def _end_epoch(policy, state, cost, adam_pace=0.01):
    """``policy.first`` at the last step of the epoch that reaches ``cost``, Adam's
    pace ``adam_pace`` over 32 epochs (a loss falling by ``adam_pace`` per epoch
    from 1, negative by the end at the larger paces); returns the state, the
    switch and the loss of that epoch."""
    ring = 1.0 - adam_pace * np.arange(32, dtype=np.float32)  # epoch means, oldest first
    value = jnp.float32(ring[-1] - adam_pace)
    whole = int(cost) - 1
    state = state._replace(
        clock=clock.Clock(jnp.int32(whole), jnp.int32(STEPS - 1), jnp.float32(0.0)),
        cost=jnp.float32(cost - 1.0 / STEPS),
        epochs=jnp.int32(32),
        values=jnp.asarray(ring),
        loss_sum=jnp.float32((STEPS - 1) * value),
    )
    state, switch = policy.first(
        state, grad=None, grad_norm=None, value=value, step=jnp.int32(10**4)
    )
    return state, bool(switch), float(value)


def _polish_switch(trial_start=900.0, adam_pace=0.01):
    """safe_resort at budget 1000 switched by its own ``first`` at ``trial_start``."""
    policy = safe_resort(STEPS, budget=1000.0)
    state = policy.init(PARAMS)._replace(wait=jnp.float32(8.0))
    state, switch, last = _end_epoch(policy, state, trial_start, adam_pace)
    assert switch
    return policy, state, last


def test_a_judged_polish_is_measured_from_its_first_accepted_point():
    # The polish's first iteration gains 0.1 in log-loss (the mini-batch noise Adam
    # left); then 0.005 per step of cost 2. Adam's pace is 0.01 per epoch, a segment
    # 0.05 * 100 = 5. Counted from the switch the polish would look ahead (0.115 in 6
    # against 0.06); from its first point it gained 0.015 in 6, against 0.06: it returns.
    policy, state, last = _polish_switch(900.0, adam_pace=0.01)
    assert float(state.reference_cost) == -1.0  # set by the first accepted point
    gains = [0.1, 0.105, 0.11, 0.115]
    _, backs = _trial(policy, state, [last - g for g in gains], cost=2.0, raw=True)
    assert backs == [False, False, False, True]
    # A trial before the polish keeps the switch point as its reference.
    policy, state, _ = _polish_switch(200.0, adam_pace=0.01)
    assert float(state.reference_cost) == pytest.approx(200.0)


def _two_trials(hopeless, gains):
    """safe_resort at budget 1000 after two trials from costs 20 and 40 (Adam's pace
    0.05 per epoch-equivalent, each trial one step of 4 epoch-equivalents that gains
    ``gains`` in loss since the switch point), each returned from."""
    policy = safe_resort(STEPS, budget=1000.0, config=SafeResortConfig(hopeless=hopeless))
    state = policy.init(PARAMS)._replace(wait=jnp.float32(8.0), charges_incoming=jnp.asarray(False))
    for start, gain in zip((20.0, 40.0), gains, strict=True):
        state, switch, _ = _end_epoch(policy, state, start, adam_pace=0.05)
        assert switch
        reference = float(state.reference_value)
        state, backs = _trial(policy, state, [reference - gain], cost=4.0, raw=True)
        assert backs == [True]  # each gained less than Adam's 0.2
        state = policy.rearm(state, PARAMS)
    return policy, state


@pytest.mark.parametrize("hopeless", [0.1, 0.0])
def test_two_hopeless_trials_end_the_exploration_and_the_judged_polish(hopeless):
    # Gains of 0.004 and 0.01 against Adam's 4 / 20 and 4 / 40: ratios of about
    # 0.02 and 0.05 (the second: -log(1 - 0.01 / (0.05 * 40)) / 0.1).
    policy, state = _two_trials(hopeless, gains=[0.004, 0.01])
    assert float(state.best_gain_ratio) == pytest.approx(-np.log1p(-0.005) / 0.1, rel=1e-3)
    gave_up = hopeless > 0
    # A third trial would be due at 300 (3% of the budget not yet spent)...
    after, switch, _ = _end_epoch(policy, state, 300.0)
    assert switch is not gave_up
    assert bool(after.exploring) is not gave_up
    # ...a judged polish at 900 (Adam's pace on 32 epochs)...
    _, switch, _ = _end_epoch(policy, state, 900.0)
    assert switch is not gave_up
    # ...and the final polish (the last 5 epoch-equivalents) runs either way.
    _, switch, _ = _end_epoch(policy, state, 996.0)
    assert switch


def test_an_expensive_second_phase_gets_two_iterations_of_final_polish_within_the_budget():
    # Iterations of cost 18 (Levenberg-Marquardt: a Jacobian is about 17 evaluations).
    # The final polish is two of them (the last 36 of 1000, not the last 5, shorter
    # than one iteration), and nothing starts with less than one iteration left: an
    # iteration past the budget is discarded under a strict budget.
    policy = safe_resort(STEPS, budget=1000.0)
    state = policy.init(PARAMS)._replace(wait=jnp.float32(8.0), charges_incoming=jnp.asarray(False))
    state, switch, _ = _end_epoch(policy, state, 20.0, adam_pace=0.05)
    assert switch
    worse = float(state.reference_value) + 0.5
    state, backs = _trial(policy, state, [worse, worse], cost=18.0, raw=True)
    assert backs == [False, True]  # a costly first step is judged with the next
    assert float(state.iteration_cost) == pytest.approx(18.0)
    state = policy.rearm(state, PARAMS)
    assert float(final_reserve(state, SafeResortConfig())) == pytest.approx(36.0)
    _, switch, _ = _end_epoch(policy, state, 966.0)
    assert switch  # the final polish, two iterations before the end
    _, switch, _ = _end_epoch(policy, state, 990.0)
    assert not switch  # 10 left: not one iteration


def test_one_trial_above_hopeless_keeps_the_exploration():
    # 0.03 from the switch at 40: -log(1 - 0.03 / (0.05 * 40)) / 0.1 = 0.151 > 0.1.
    policy, state = _two_trials(0.1, gains=[0.004, 0.03])
    assert float(state.best_gain_ratio) == pytest.approx(-np.log1p(-0.015) / 0.1, rel=1e-3)
    _, switch, _ = _end_epoch(policy, state, 300.0)
    assert switch


@pytest.mark.parametrize("budget", [1000.0, None])
def test_the_hopeless_gate_needs_a_budget(budget):
    # Two hopeless trials on record; the cost so far allows another trial.
    policy = safe_resort(STEPS, budget=budget)
    state = policy.init(PARAMS)._replace(trials=jnp.int32(2), wait=jnp.float32(8.0))
    after, switch, _ = _end_epoch(policy, state, 400.0)
    # Without a budget there is no final polish to fall back on: trials go on.
    assert switch is (budget is None)
    assert bool(after.exploring) is (budget is None)


# --------------------------------------------------------------------------- #
# The user's own full-batch loop (the PINN pattern), no optional argument


def full_batch_run(opt, evaluations, value_fn=FULL, shift=0.0):
    """Full-batch steps until ``evaluations`` are spent (an Adam step costs one,
    a second-phase step its evaluations, as tp.info counts them)."""
    objective = lambda p: value_fn(p) + shift

    @jax.jit
    def step(p, s):
        value, grad = jax.value_and_grad(objective)(p)
        u, s = opt.update(grad, s, p, value=value, value_fn=objective)
        return optax.apply_updates(p, u), s

    p, s = PARAMS, opt.init(PARAMS)
    adam_steps, phases = 0, []
    # A converged second phase may step at no cost: at most `evaluations` updates.
    while len(phases) < evaluations and adam_steps + _second_cost(s) < evaluations:
        phases.append(int(s.phase) if hasattr(s, "phase") else 0)
        p, s = step(p, s)
        adam_steps += phases[-1] == 0
    return p, s, phases


def _second_cost(state):
    """The second phase's evaluations in a two-phase state (0 for Adam's)."""
    if not hasattr(state, "phase"):
        return 0
    hvps = int(state.second_phase_hvps)
    return int(state.second_phase_evals) + tp.HVP_COST * hvps


def test_full_batch_loop_without_arguments_keeps_a_winning_second_phase():
    # CG solves the least-squares problem in a few iterations. Told no epoch length
    # (the presets' positional 100 is only an assumption), the policy recognises the
    # full-batch loop and counts a step as one evaluation: it switches within the
    # first tens of evaluations and ends in CG at the exact solution. (With 100 steps
    # to an epoch it would not have tried once in 300 evaluations.)
    opt = tp.adam_cg(1e-3)
    p, s, phases = full_batch_run(opt, 300)
    info = tp.info(s)
    assert int(s.detector_state.full_batch) == 1
    assert int(info.phase) == 1 and phases.index(1) < 30
    exact = np.linalg.lstsq(
        np.concatenate([np.asarray(X), np.ones((N, 1))], 1), np.asarray(Y), rcond=None
    )[0]
    np.testing.assert_allclose(np.asarray(p["w"]), exact[:D], atol=1e-4)


def test_full_batch_loop_with_a_losing_second_phase_keeps_trying_and_does_no_harm():
    # A second phase far slower than Adam: trials are returned from, again and again
    # (never "one early trial and never again"), and the run ends within 3% of Adam's
    # loss at the same number of evaluations.
    opt = tp.two_phase(optax.adam(1e-2), slow_second_phase(), safe_resort())
    p, s, _ = full_batch_run(opt, 600)
    adam, _, _ = full_batch_run(optax.adam(1e-2), 600)
    info = tp.info(s)
    assert int(info.switches) >= 3 and int(info.fallbacks) >= 3
    assert float(FULL(p)) <= 1.03 * float(FULL(adam))


def test_a_wrong_epoch_length_in_a_full_batch_loop_is_overruled():
    policy = safe_resort(steps_per_epoch=100)
    opt = tp.two_phase(optax.adam(1e-2), slow_second_phase(), policy)
    _, s, _ = full_batch_run(opt, 600)
    assert int(s.detector_state.full_batch) == 1
    assert int(tp.info(s).switches) >= 3  # trials at growing intervals


def test_a_mini_batch_loop_is_not_taken_for_a_full_batch_one():
    _, s, _ = run(tp.adam_cg(1e-2), 2)
    assert int(s.detector_state.full_batch) == 0


# --------------------------------------------------------------------------- #
# Any loss offset


@pytest.mark.parametrize("second", [pytest.param("slow", marks=pytest.mark.slow), "cg"])
def test_a_shifted_loss_gives_the_same_decisions(second):
    """A loss shifted by -5 (negative: a log-likelihood, an energy) switches and
    returns at the same steps as the unshifted one."""
    histories = []
    for shift in (0.0, -5.0):
        shifted_loss = lambda p, x, y, shift=shift: loss(p, x, y) + shift
        full = lambda p, shift=shift: FULL(p) + shift
        make = slow_second_phase if second == "slow" else tp.nonlinear_cg
        config = SafeResortConfig(explore=0.2)
        opt = tp.two_phase(
            optax.adam(1e-2), make(), safe_resort(steps_per_epoch=STEPS, config=config)
        )
        step = jax.jit(
            lambda p, s, x, y, opt=opt, sl=shifted_loss, full=full: _shifted_step(
                opt, sl, full, p, s, x, y
            )
        )
        p, s, phases = PARAMS, opt.init(PARAMS), []
        for _ in range(24):
            for i in range(STEPS):
                idx = slice(i * 32, (i + 1) * 32)
                p, s = step(p, s, X[idx], Y[idx])
                phases.append(int(s.phase))
        histories.append(phases)
        assert int(tp.info(s).switches) >= 1
    assert histories[0] == histories[1]


def _shifted_step(opt, batch_loss, full, p, s, x, y):
    value, grad = jax.value_and_grad(batch_loss)(p, x, y)
    u, s = opt.update(grad, s, p, value=value, value_fn=full)
    return optax.apply_updates(p, u), s


# --------------------------------------------------------------------------- #
# Configuration: one writer, contradictions named


def test_a_given_epoch_length_contradicting_train_is_rejected_naming_both():
    opt = tp.two_phase(optax.adam(1e-2), tp.nonlinear_cg(), safe_resort(steps_per_epoch=5))
    with pytest.raises(ValueError, match=r"`steps_per_epoch` \(5\).*8 steps per epoch"):
        tp.train(lambda p, b: loss(p, *b), PARAMS, (X, Y), opt, batch_size=32, progress=False)


def test_configure_replaces_what_an_earlier_configure_set():
    # A restored state holds the old run's budget and epoch length: a new run's
    # configure replaces them (they were not given to the policy).
    state = configure(safe_resort().init(None), budget=10, steps_per_epoch=3)
    state = configure(state, budget=30, steps_per_epoch=4)
    assert float(state.budget) == 30.0 and int(state.epoch_steps) == 4
    given = safe_resort(steps_per_epoch=3, budget=10).init(None)
    assert int(configure(given, budget=10, steps_per_epoch=3).epoch_steps) == 3
    with pytest.raises(ValueError, match=r"`budget`.*`cost_budget`"):
        configure(given, budget=30, steps_per_epoch=3)
