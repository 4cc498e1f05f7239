"""The policy's cost account is exact at the paper's scale and beyond."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from twophase.policy import SafeResortConfig, clock, safe_resort
from twophase.policy.safe_resort import configure, count_step, judge_trial

SPE, EPOCHS = 937, 1000  # the paper's mnist run: 937 steps per epoch, 1000 epochs


def test_a_million_phase0_steps_count_exactly_1000_epochs():
    def body(_, carry):
        c, ends, naive = carry
        c, end = clock.tick(c, jnp.int32(SPE))
        return c, ends + end.astype(jnp.int32), naive + jnp.float32(1.0 / SPE)

    start = (clock.start(), jnp.int32(0), jnp.float32(0.0))
    c, ends, naive = jax.jit(lambda s: lax.fori_loop(0, SPE * EPOCHS, body, s))(start)
    assert int(c.whole) == EPOCHS and int(c.steps) == 0 and int(ends) == EPOCHS
    assert float(clock.elapsed(c, jnp.int32(SPE))) == EPOCHS
    # The float32 sum the account replaces drifts by whole epochs (the fault).
    assert abs(float(naive) - EPOCHS) > 1.0


def test_elapsed_since_a_mark_is_exact_near_the_end_of_a_long_run():
    c = clock.Clock(jnp.int32(10**9 - 3), jnp.int32(468), jnp.float32(0.25))
    left = clock.elapsed_since(c, jnp.int32(SPE), jnp.float32(1e9))
    np.testing.assert_allclose(float(left), -3 + 468 / SPE + 0.25, rtol=1e-6)


def test_the_policy_account_equals_train_s_count_over_1000_epochs_with_trials():
    """The policy's own stages (count_step in phase 0, judge_trial in phase 1)
    against tp.train's count: an epoch of steps costs 1, a second-phase step its
    evaluations plus 1.5 per Hessian-vector product (rational sums)."""
    config = SafeResortConfig()
    # As tp.train configures it: no gradient of the caller's in phase 1.
    policy_state = (
        safe_resort(steps_per_epoch=SPE).init(None)._replace(charges_incoming=jnp.asarray(False))
    )
    trial_costs = jnp.asarray([3.0, 1.5, 2.0, 4.5, 1.0], jnp.float32)  # every 10th epoch

    def phase0_epoch(state):
        def body(_, s):
            return count_step(s, jnp.float32(1.0), config)[0]

        return lax.fori_loop(0, SPE, body, state)

    def trial_step(state, cost):
        # A step far ahead (value 0 from an epoch mean 1): never a return, only counting.
        state, _ = judge_trial(
            state,
            value=jnp.float32(-1.0),
            cost=cost,
            failures=jnp.int32(0),
            finite=jnp.bool_(True),
            config=config,
            max_failures=2,
        )
        return state

    def epoch(i, state):
        state = phase0_epoch(state)
        return lax.cond(
            i % 10 == 9, lambda s: trial_step(s, trial_costs[(i // 10) % 5]), lambda s: s, state
        )

    state = jax.jit(lambda s: lax.fori_loop(0, EPOCHS, epoch, s))(policy_state)
    train_count = Fraction(EPOCHS) + sum(
        Fraction(float(trial_costs[(i // 10) % 5])) for i in range(EPOCHS) if i % 10 == 9
    )
    whole = int(state.clock.whole) + Fraction(float(state.clock.remainder))
    assert whole == train_count and int(state.clock.steps) == 0
    assert int(state.epochs) == EPOCHS  # every epoch's end was seen
    np.testing.assert_allclose(float(state.cost), float(train_count), rtol=1e-7)


def test_in_your_own_loop_a_second_phase_step_also_costs_the_callers_gradient():
    """Your own loop computes the (mini-batch or full-batch) gradient at every
    step, also in phase 1 where the second phase ignores it: the policy charges
    one phase-0 step for it on top of the second phase's evaluations; under
    tp.train (configure) it does not."""
    config = SafeResortConfig()
    for told, charged in ((None, 1.0 / SPE), (SPE, 0.0)):
        state = safe_resort(steps_per_epoch=SPE).init(None)
        if told is not None:
            state = configure(state, budget=None, steps_per_epoch=told)
        new, _ = judge_trial(
            state,
            value=jnp.float32(1.0),
            cost=jnp.float32(2.0),
            failures=jnp.int32(0),
            finite=jnp.bool_(True),
            config=config,
            max_failures=2,
        )
        np.testing.assert_allclose(float(new.cost) - float(state.cost), 2.0 + charged, rtol=1e-6)
