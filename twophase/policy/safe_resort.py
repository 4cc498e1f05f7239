"""Switching policies: when to enter the second phase, and when to return from it.

A :class:`Policy` generalises a :class:`twophase.Detector`: it decides the
switch from phase 0 (Adam) to phase 1 (the second phase) *and* the return from
phase 1 to phase 0. :func:`twophase.two_phase` accepts either; a detector is a
one-way policy (with ``fallback=k``, it returns after ``k`` failed second-phase
iterations, :func:`from_detector`).

:func:`safe_resort` is the default of :func:`twophase.adam_cg` and
:func:`twophase.adam_lbfgs`: it *tries* the second phase, measures its pace and
returns to Adam when the trial loses, the paper's "safe resort" (Hrycej et al.,
KDIR 2025, on its own limitations) made into a rule. Every statistic lives in the state; the
decisions are ``jnp.where`` on scalars, so a jitted step compiles once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from twophase import detectors as _det
from twophase._checks import (
    check_budget,
    check_fraction,
    check_int,
    check_positive,
    concrete,
    require_value,
)

__all__ = ["Policy", "SafeResortState", "configure", "from_detector", "safe_resort"]

PyTree = Any


class Policy(NamedTuple):
    """A switching policy: three pure functions and a flag.

    Attributes:
      init: ``params -> state``.
      first: ``(state, *, grad, grad_norm, value, step, params, value_fn) ->
        (state, switch)`` after each phase-0 step (arguments as a
        :class:`twophase.Detector`'s ``update``); ``switch`` (bool scalar) makes
        the next step a second-phase step.
      second: ``(state, *, value, cost, failures, finite, params) -> (state,
        back)`` after each phase-1 step: ``value`` is the objective at the point
        the second phase accepted (its state's ``value``), ``cost`` the step's
        cost in epoch-equivalents (evaluations, Hessian-vector products at
        :data:`twophase.second_phase.HVP_COST`), ``failures`` the second phase's
        current run of failed iterations, ``finite`` whether the step was
        finite. ``back`` returns to phase 0 for the next step.
      rearm: ``(state, params) -> state`` applied at a return.
      needs_value: whether ``first`` requires the mini-batch loss ``value``.
    """

    init: Callable[[PyTree], Any]
    first: Callable[..., tuple[Any, jax.Array]]
    second: Callable[..., tuple[Any, jax.Array]]
    rearm: Callable[[Any, PyTree], Any]
    needs_value: bool = False


def from_detector(detector: _det.Detector, fallback: int | None = None) -> Policy:
    """The one-way policy of ``detector``: switch when it fires; with
    ``fallback=k``, return after ``k`` consecutive failed second-phase
    iterations, or a non-finite one, and re-arm the detector."""

    def second(state, *, value, cost, failures, finite, params):
        del value, cost, params
        if fallback is None:
            return state, jnp.zeros([], bool)
        return state, (failures >= fallback) | ~finite

    return Policy(
        detector.init,
        detector.update,
        second,
        lambda state, params: detector.init(params),
        detector.needs_value,
    )


class SafeResortState(NamedTuple):
    """State of :func:`safe_resort` (all scalars but ``log_losses``).

    Attributes:
      budget: float32, the run's budget in epoch-equivalents (0: unknown).
        :func:`twophase.train` sets it from ``cost_budget``.
      epoch_steps: float32, phase-0 steps per epoch (``window``; ``train`` sets
        it to its steps per epoch). A phase-0 step costs ``1 / epoch_steps``.
      cost: float32, epoch-equivalents spent so far (both phases).
      loss_sum: float32, sum of the current epoch's mini-batch losses.
      loss_count: float32, steps in the current epoch.
      log_losses: float32 ``(history,)`` ring of ``log(mean loss - floor)`` per
        epoch since the last (re-)entry into phase 0.
      epochs: int32, entries pushed into ``log_losses`` since then.
      adam_pace: float32, Adam's last pace: the least-squares decrease of
        ``log_losses`` per epoch over the last epochs; 0 (and unused) until 3
        epochs.
      next_trial: float32, cost from which the next trial may start.
      wait: float32, the wait before the trial after next (doubles each return).
      trial_start: float32, cost at the start of the current trial (-1: none).
      segment_cost: float32, cost at the trial's last judgement (-1 before its
        reference point is known).
      reference_cost: float32, cost at the trial's reference point: the switch,
        or its first accepted point when the switch point's loss is unknown or
        the trial is the late polish.
      reference_log_value: float32, ``log(value - floor)`` there.
      trial_pace: float32, the trial's pace: its decrease of ``log(value -
        floor)`` since the reference point per epoch-equivalent.
      trials: int32, trials started (switches).
      polish_after: float32, cost before which no late polish starts (set after
        a polish ended in failures).
      trial_spent: float32, cost spent in trials that were returned from.
      best_gain_ratio: float32, the largest ratio, over the exploratory trials
        returned from (those before the late polish), of a trial's gain to the
        gain Adam would have made in its cost (0 before any).
      exploring: bool, False once two trials have been returned from with none
        of them above ``hopeless`` (budget known): no exploratory trial starts
        any more, and no judged polish (the final polish still runs).
    """

    budget: jax.Array
    epoch_steps: jax.Array
    cost: jax.Array
    loss_sum: jax.Array
    loss_count: jax.Array
    log_losses: jax.Array
    epochs: jax.Array
    adam_pace: jax.Array
    next_trial: jax.Array
    wait: jax.Array
    trial_start: jax.Array
    segment_cost: jax.Array
    reference_cost: jax.Array
    reference_log_value: jax.Array
    trial_pace: jax.Array
    trials: jax.Array
    polish_after: jax.Array
    trial_spent: jax.Array
    best_gain_ratio: jax.Array
    exploring: jax.Array


def _pace(log_losses: jax.Array, epochs: jax.Array, points: jax.Array) -> jax.Array:
    """Least-squares decrease per epoch of the last ``min(epochs, points)``
    entries of the ring ``log_losses``; 0 with fewer than 3."""
    size = log_losses.shape[0]
    slot = jnp.arange(size)
    age = jnp.mod(epochs - 1 - slot, size).astype(jnp.float32)
    used = jnp.minimum(epochs, points)
    mask = (age < used.astype(jnp.float32)).astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    x = -age
    x_mean = (mask * x).sum() / count
    y_mean = (mask * log_losses).sum() / count
    cov = (mask * (x - x_mean) * (log_losses - y_mean)).sum()
    var = (mask * (x - x_mean) ** 2).sum()
    slope = cov / jnp.maximum(var, 1e-12)
    return jnp.where(used >= 3, -slope, 0.0)


def safe_resort(
    window: int = 100,
    *,
    budget: float | None = None,
    floor: float = 0.0,
    first_trial: float = 0.005,
    polish: float = 0.9,
    judge: float = 0.05,
    min_judge: float = 2.0,
    growth: float = 2.0,
    explore: float = 0.03,
    history: int = 32,
    max_failures: int = 2,
    min_steps: int = 0,
    hopeless: float = 0.1,
) -> Policy:
    """Try the second phase, keep it while it out-paces Adam, else return.

    Paces are compared in ``log(loss - floor)`` per epoch-equivalent, which is
    scale-free (a mini-batch epoch and a full-batch value-and-gradient
    evaluation cost one each):

    * **Adam's pace**: the least-squares decrease of the log of each epoch's
      mean mini-batch loss (``value``, required) per epoch, over the last
      ``min(history, 5% of the budget)`` epochs (at least 3) since Adam last
      took over (over 8 epochs the noise of the epoch means swamped a slow
      Adam's pace on mnist5k: it was measured negative at 90% of the budget).
      No trial starts before it is defined (a trial compared with an
      undefined pace is never returned from; ``SWITCHING.md``).
    * **Trials**: at the end of an epoch, once the cost reaches ``next_trial``.
      The first may start at ``first_trial`` of the budget (after 3 epochs
      without one); after each return the wait doubles (``growth``).
    * **Judging a trial**: every ``max(min_judge, judge * cost at the
      switch)`` epoch-equivalents (``judge`` of the cost left, for a switch in
      the last half of a known budget; a single step that costs more than two
      such segments is judged together with the next step) the trial's gain, the decrease of
      ``log(value - floor)`` (``value`` at the accepted point, full batch)
      since the switch point (whose loss is estimated from Adam's last epoch),
      is compared with what Adam would have gained in the same cost at its
      pace frozen at the switch, extrapolated linearly for as long as the run
      before the switch (its cost ``c0``) and as a power law beyond (the pace
      decaying as ``1 / cost``: ``c0 * (1 + log(spent / c0))`` epochs of
      pace for ``spent > c0``). A trial that is behind returns to Adam, whose
      moments were kept: a return costs nothing. A trial that is ahead goes on,
      until its slowing pace lets the extrapolated Adam catch up. (Judging the
      last segment as well lost teacher-student-small's early basin: its
      trial passes slow segments on the way down.)
    * **Failures**: a non-finite step ends a trial; so do ``max_failures``
      consecutive failed iterations while the trial is behind (ahead, they
      are taken as convergence to float resolution, and the phase stays).
    * **Late polish** (budget known): from ``polish`` of the budget the second
      phase is tried whatever ``explore`` allows, and runs to the end (only
      failures return), because measured at equal cost a final full-batch
      polish paid off wherever Adam had slowed (``benchmarks/RESULTS.md``);
      but where Adam's pace rests on at least ``history // 2`` epochs (budgets
      of 320 and more at the default) the polish is judged like a trial, but
      from its first accepted point (that first iteration removes the
      mini-batch noise Adam leaves, a one-off gain), and after a return the
      *final polish*, the last ``max(2 * min_judge, 0.5% of the budget)``, runs
      unjudged and collects that gain (on mnist5k the unjudged polish from 90%
      lost 6% to Adam).
    * **Hopeless** (budget known): once two trials have been returned from and
      none gained ``hopeless`` of what Adam would have gained in its cost, no
      more exploratory trials start, and where the polish would be judged (see
      above) only the final polish runs. On the CLI's problem (mlp, mnist5k)
      its first two trials gained -0.09 and 0.05 of Adam's gain, and the
      trials and the judged polish that followed took the run from 1.02x to
      1.10x Adam's final loss (``benchmarks/RESULTS.md`` section 8).
    * **Room**: no switch once less than ``min_judge`` of a known budget is
      left.

    With no budget (``budget=None`` and no ``cost_budget`` in
    :func:`twophase.train`) there is no late polish, the first trial comes
    after 3 epochs and later ones as ``explore`` of the cost so far allows.

    Args:
      window: phase-0 steps per epoch, ``>= 1`` (:func:`twophase.train` sets it
        to its own; injected with ``optax.inject_hyperparams``, it takes effect
        at the next update).
      budget: the run's budget in epoch-equivalents, or ``None``.
      floor: a lower bound of the loss (0 for squared errors and
        cross-entropy); paces are measured on ``log(loss - floor)``.
      first_trial: the first trial's earliest start, fraction of the budget.
      polish: fraction of the budget from which the second phase runs to the end.
      judge: a judged segment's length, fraction of the cost at the trial's start.
      min_judge: its minimum length in epoch-equivalents, ``> 0``.
      growth: factor by which the wait grows after each return, ``>= 1``.
      explore: fraction of the budget (of the cost so far, without one) that
        trials returned from may spend in all; a trial starts only while about
        ``1.5 * min_judge`` of it is left.
      history: epochs kept for Adam's pace, ``>= 3``.
      max_failures: consecutive failed second-phase iterations that end a trial.
      min_steps: no switch before this many phase-0 steps since (re-)arming.
      hopeless: gain ratio, in ``[0, 1)``, below which two trials end the
        exploration of a run with a known budget (0 disables it).

    Returns:
      A :class:`Policy` with ``needs_value=True`` and state
      :class:`SafeResortState`.

    Raises:
      ValueError: an argument out of its range (named in the message).
    """
    check_int("window", window, 1)
    check_int("history", history, 3)
    check_int("max_failures", max_failures, 1)
    check_int("min_steps", min_steps, 0)
    check_budget(budget)
    for name, value in (("first_trial", first_trial), ("judge", judge), ("explore", explore)):
        check_fraction(name, value)
    check_fraction("polish", polish, closed=True)
    checked_hopeless = concrete(hopeless)
    if checked_hopeless is not None and (
        isinstance(checked_hopeless, bool)
        or not isinstance(checked_hopeless, (int, float))
        or not 0 <= checked_hopeless < 1
    ):
        raise ValueError(f"`hopeless` must be a number in [0, 1), got {hopeless!r}.")
    check_positive("min_judge", min_judge)
    checked_growth = concrete(growth)
    if checked_growth is not None and (
        isinstance(checked_growth, bool)
        or not isinstance(checked_growth, (int, float))
        or not 1 <= checked_growth < math.inf
    ):
        raise ValueError(f"`growth` must be a finite number >= 1, got {growth!r}.")
    if isinstance(concrete(floor), bool) or not (
        concrete(floor) is None or math.isfinite(concrete(floor))
    ):
        raise ValueError(f"`floor` must be a finite number, got {floor!r}.")
    f32 = jnp.float32
    unset = jnp.asarray(-1.0, f32)  # costs are >= 0: the state holds no NaN

    def log_excess(x):
        # Finite for every finite loss (a loss at the floor counts as tiny above it).
        excess = jnp.asarray(x, f32) - jnp.asarray(floor, f32)
        return jnp.log(jnp.maximum(excess, jnp.finfo(f32).tiny))

    def pace_points(total):
        # Epochs of Adam's pace: 5% of a known budget, within [3, history].
        return jnp.where(total > 0, jnp.clip(jnp.floor(0.05 * total), 3, history), history).astype(
            jnp.int32
        )

    def adam_horizon(spent, age):
        # Epochs of Adam's pace that `spent` epoch-equivalents of a trial are worth.
        # Linear up to the run's age at the reference point; beyond, Adam's pace is
        # taken to decay as 1 / cost (a power law in the loss), since a pace measured
        # over at most `history` epochs says nothing of a stretch longer than the
        # whole run before it (on a PINN the linear extrapolation returned an L-BFGS
        # trial 5.6x below Adam's final loss; benchmarks/RESULTS.md section 7).
        age = jnp.maximum(age, 1.0)
        return jnp.where(spent <= age, spent, age * (1.0 + jnp.log(jnp.maximum(spent, age) / age)))

    def final_reserve(total):
        # The final polish: the last `2 * min_judge` epoch-equivalents, at least 0.5%.
        return jnp.maximum(2.0 * min_judge, 0.005 * total)

    def init(params):
        del params
        zero = jnp.zeros([], f32)
        total = jnp.asarray(0.0 if budget is None else budget, f32)
        return SafeResortState(
            budget=total,
            epoch_steps=jnp.asarray(window, f32),
            cost=zero,
            loss_sum=zero,
            loss_count=zero,
            log_losses=jnp.zeros([history], f32),
            epochs=jnp.zeros([], jnp.int32),
            adam_pace=jnp.zeros([], f32),
            next_trial=zero,
            wait=zero,
            trial_start=unset,
            segment_cost=unset,
            reference_cost=unset,
            reference_log_value=zero,
            trial_pace=zero,
            trials=jnp.zeros([], jnp.int32),
            polish_after=zero,
            trial_spent=zero,
            best_gain_ratio=zero,
            exploring=jnp.ones([], bool),
        )

    def end_epoch(state: SafeResortState) -> SafeResortState:
        mean_log = log_excess(state.loss_sum / state.loss_count)
        log_losses = state.log_losses.at[jnp.mod(state.epochs, history)].set(mean_log)
        epochs = state.epochs + 1
        pace = _pace(log_losses, epochs, pace_points(state.budget))
        return state._replace(
            loss_sum=jnp.zeros([], f32),
            loss_count=jnp.zeros([], f32),
            log_losses=log_losses,
            epochs=epochs,
            adam_pace=jnp.where(jnp.isfinite(pace), pace, 0.0),
        )

    def first(state, *, grad, grad_norm, value=None, step, params=None, value_fn=None):
        del grad, grad_norm, params, value_fn
        require_value(value, "safe_resort")
        # An injected `window` (an array under optax.inject_hyperparams) takes effect
        # at once; a static one was stored at init (or set by twophase.train).
        if isinstance(window, jax.Array):
            state = state._replace(epoch_steps=jnp.asarray(window, f32))
        state = state._replace(
            cost=state.cost + 1.0 / state.epoch_steps,
            loss_sum=state.loss_sum + jnp.reshape(jnp.asarray(value, f32), ()),
            loss_count=state.loss_count + 1.0,
        )
        epoch_end = state.loss_count >= state.epoch_steps
        state = lax.cond(epoch_end, end_epoch, lambda s: s, state)
        known = state.budget > 0
        polishing = (
            known & (state.cost >= polish * state.budget) & (state.cost >= state.polish_after)
        )
        earliest = jnp.where(known, first_trial * state.budget, 0.0)
        # Failed trials may spend at most `explore` of the budget (of the cost so
        # far without one); a trial costs about 3 epoch-equivalents to judge.
        scale = jnp.where(known, state.budget, state.cost)
        affordable = state.trial_spent + 1.5 * min_judge <= explore * scale
        affordable |= ~known & (state.trials == 0)  # without a budget, one early trial
        # In phase 0 every trial started has been returned from. Without a budget there
        # is no final polish to fall back on: trials go on at growing intervals.
        gave_up = known & (state.trials >= 2) & (state.best_gain_ratio < hopeless)
        affordable &= ~gave_up
        at_final = state.cost >= state.budget - final_reserve(state.budget)
        judged_polish = pace_points(state.budget) >= history // 2
        polishing &= ~(gave_up & judged_polish) | at_final
        due = ((state.epochs >= 3) & (state.cost >= state.next_trial) & affordable) | polishing
        # No switch without room for a judged trial: an iteration that does not fit
        # in the budget would be wasted (twophase.train discards it under a strict
        # budget, and the epochs Adam would have had are lost).
        room = ~known | (state.budget - state.cost >= min_judge)
        switch = epoch_end & due & room & (state.cost >= earliest) & (step + 1 >= min_steps)
        # The trial's first segment starts at the switch point, whose loss is
        # estimated from the last epoch's mean mini-batch loss: that mean sits half
        # an epoch behind the point, so half of Adam's pace is taken off.
        last = state.log_losses[jnp.mod(state.epochs - 1, history)]
        start_log = jnp.where(
            (state.epochs > 0) & epoch_end,
            last - 0.5 * state.adam_pace,
            0.0,
        )
        # A late polish is measured from its first accepted point instead: that first
        # iteration removes the mini-batch noise Adam leaves, a one-off gain that the
        # final polish collects anyway; counted in the polish's pace, it kept a polish
        # slower than Adam for 35 epoch-equivalents on the CLI's problem.
        in_polish = known & (state.cost >= polish * state.budget)
        known_start = (state.epochs > 0) & ~in_polish
        state = state._replace(
            exploring=~gave_up,
            trial_start=jnp.where(switch, state.cost, state.trial_start),
            segment_cost=jnp.where(
                switch, jnp.where(known_start, state.cost, unset), state.segment_cost
            ),
            reference_cost=jnp.where(
                switch, jnp.where(known_start, state.cost, unset), state.reference_cost
            ),
            reference_log_value=jnp.where(switch, start_log, state.reference_log_value),
            trials=state.trials + switch.astype(jnp.int32),
            wait=jnp.where(switch & (state.wait == 0), jnp.maximum(state.cost, 1.0), state.wait),
        )
        return state, switch

    def second(state, *, value, cost, failures, finite, params):
        del params
        cost_now = state.cost + jnp.asarray(cost, f32)
        log_value = log_excess(value)
        known = state.budget > 0
        started = state.segment_cost >= 0
        # Until the reference point is known, this step's point becomes it.
        reference_cost = jnp.where(started, state.reference_cost, cost_now)
        reference_log = jnp.where(started, state.reference_log_value, log_value)
        # A segment is `judge` of the cost at the start (of the cost left, for a trial
        # that starts in the last half of a known budget: the late polish).
        horizon = jnp.where(
            known,
            jnp.minimum(state.trial_start, state.budget - state.trial_start),
            state.trial_start,
        )
        length = jnp.maximum(min_judge, judge * horizon)
        # A step that costs more than two segments is judged with the next one: it
        # carries a one-off cost (a Nystrom sketch of 60 products, 90 evaluations, in
        # Newton-CG's first step) that the steps after it amortise; judged on that step
        # alone such a trial was returned from every time. (Requiring two steps in every
        # segment cost the small suite's CG trials gain: benchmarks/RESULTS.md, section 8.)
        lone_costly = (state.cost <= state.segment_cost) & (cost_now - state.cost > 2 * length)
        judged = started & ~lone_costly & (cost_now - state.segment_cost >= length)
        spent = cost_now - reference_cost
        pace = (reference_log - log_value) / jnp.maximum(spent, 1e-12)
        # Behind: the trial has gained less since its reference point than Adam
        # would have at its pace from the switch.
        behind = ~(
            reference_log - log_value >= state.adam_pace * adam_horizon(spent, reference_cost)
        )
        polishing = known & (cost_now >= polish * state.budget)
        final = known & (state.trial_start >= state.budget - final_reserve(state.budget))
        # A polish is judged only on a pace measured over at least half of `history`
        # epochs: over fewer, the noise of the epoch means swamps a slow Adam's pace.
        reliable = jnp.minimum(state.epochs, pace_points(state.budget)) >= history // 2
        exempt = final | (polishing & ~reliable)
        loses = judged & behind & ~exempt
        # Failures of a trial that is ahead are taken as convergence: it stays.
        failed = ~finite | ~jnp.isfinite(log_value) | ((failures >= max_failures) & behind)
        back = loses | failed
        usable = jnp.isfinite(log_value)  # else `failed`: nothing non-finite is stored
        # The trial's gain as a fraction of Adam's in the same cost (1 where Adam's
        # extrapolated gain is not positive: no evidence against the trial).
        adam_gain = state.adam_pace * adam_horizon(spent, reference_cost)
        gain_ratio = jnp.where(
            adam_gain > 0, (reference_log - log_value) / jnp.maximum(adam_gain, 1e-30), 1.0
        )
        exploratory = ~known | (state.trial_start < polish * state.budget)
        best_gain_ratio = jnp.where(
            back & usable & exploratory,
            jnp.maximum(state.best_gain_ratio, gain_ratio),
            state.best_gain_ratio,
        )
        state = state._replace(
            cost=cost_now,
            segment_cost=jnp.where(~started | judged, cost_now, state.segment_cost),
            reference_cost=reference_cost,
            reference_log_value=jnp.where(usable, reference_log, state.reference_log_value),
            trial_pace=jnp.where(started & usable, pace, state.trial_pace),
            best_gain_ratio=best_gain_ratio,
        )
        return state, back

    def rearm(state, params):
        del params
        in_polish = (state.budget > 0) & (state.cost >= polish * state.budget)
        # After a polish returned, the next one is the final polish (or none once
        # that failed).
        final_start = state.budget - final_reserve(state.budget)
        after = jnp.where(state.cost < final_start, final_start, state.cost + state.wait)
        return state._replace(
            polish_after=jnp.where(in_polish, after, state.polish_after),
            trial_spent=state.trial_spent + state.cost - state.trial_start,
            loss_sum=jnp.zeros([], f32),
            loss_count=jnp.zeros([], f32),
            epochs=jnp.zeros([], jnp.int32),
            adam_pace=jnp.zeros([], f32),
            next_trial=state.cost + state.wait,
            wait=state.wait * growth,
            trial_start=unset,
            segment_cost=unset,
            reference_cost=unset,
            reference_log_value=jnp.zeros([], f32),
        )

    return Policy(init, first, second, rearm, needs_value=True)


def configure(state: PyTree, *, budget: float | None, steps_per_epoch: int) -> PyTree:
    """``state`` with every :class:`SafeResortState` in it told the run's budget
    and epoch length (what :func:`twophase.train` does with ``cost_budget``).

    Args:
      state: an optimizer state (any nesting).
      budget: ``cost_budget`` in epoch-equivalents, or ``None`` (unchanged).
      steps_per_epoch: mini-batch steps per epoch.

    Returns:
      The state with ``budget`` and ``epoch_steps`` set.

    Raises:
      ValueError: the policy was built with a different ``budget``.
    """

    def is_policy_state(node):
        return isinstance(node, SafeResortState)

    def set_fields(node):
        if not is_policy_state(node):
            return node
        own = float(node.budget)
        if budget is not None and own > 0 and not math.isclose(own, budget):
            raise ValueError(
                f"the optimizer's `budget` ({own:g}) contradicts train's `cost_budget` "
                f"({budget:g}); pass one of them, or the same value."
            )
        return node._replace(
            budget=node.budget if budget is None else jnp.asarray(budget, jnp.float32),
            epoch_steps=jnp.asarray(steps_per_epoch, jnp.float32),
        )

    return jax.tree.map(set_fields, state, is_leaf=is_policy_state)
