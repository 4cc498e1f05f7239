"""The default switching policy: try the second phase, return when it loses.

:func:`safe_resort` *tries* the second phase, measures its progress and returns
to Adam when the trial loses, the paper's "safe resort" (Hrycej et al., KDIR
2025, on its own limitations) made into a rule. Every statistic lives in the
state; the decisions are ``jnp.where`` on scalars, so a jitted step compiles
once. Each stage is a module-level function of the state.

Costs are counted in epoch-equivalents: a mini-batch epoch, or one
full-batch value-and-gradient evaluation (a Hessian-vector product counts
:data:`twophase.second_phase.HVP_COST`), in an exact account
(:mod:`twophase.policy.clock`).

* **The clock.** At its first step the policy evaluates ``value_fn`` once:
  where the loss passed as ``value`` equals it, the loop is full-batch and a
  step costs one evaluation, whatever ``steps_per_epoch`` says. Otherwise a
  step costs ``1 / steps_per_epoch`` (:func:`twophase.train` sets it), or
  ``1 / config.assumed_steps_per_epoch`` when told nothing. In your own
  loop a second-phase step also costs one such step: the gradient the loop
  computed and the second phase ignored (``charges_incoming``; not under
  :func:`twophase.train`, which skips it).
* **Adam's pace**: the least-squares decrease of the epoch-mean loss per
  epoch over the last ``min(history, judge * budget)`` epochs (at least 3)
  since Adam last took over. No trial starts before it is defined (a
  trial compared with an undefined pace is never returned from).
* **Trials** start at an epoch's end once the cost reaches the next trial's
  time; after each return the wait grows by ``growth``. Trials returned
  from may spend ``explore`` of the budget (of the cost so far without
  one). Without a budget, a trial is also due after ``growth ** 2`` times
  as many phase-0 steps as preceded the previous one, so that a wrong
  epoch length slows the trials down but never ends them.
* **Judging**: every segment (:func:`segment_length`) the trial's gain since
  the switch point is compared with what Adam would have gained in the
  same cost (:func:`trial_gain`, :func:`adam_credit`); both depend only on
  differences of losses, so any loss offset (a negative log-likelihood, an
  energy) gives the same decisions. A trial behind returns to Adam, whose
  moments were kept: a return costs nothing (:func:`judge_trial`).
* **Late polish** (budget known): from ``polish`` of the budget the second
  phase runs to the end, judged like a trial where Adam's pace rests on at
  least ``history // 2`` epochs; after such a return only the final polish
  (:func:`final_reserve`) runs, unjudged.
* **Hopeless** (budget known): once two trials have been returned from and
  none gained ``hopeless`` of Adam's credit, exploration stops.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from twophase import auxiliary as _aux
from twophase._checks import check_budget, check_int, require_value
from twophase.policy import clock as _clock
from twophase.policy.base import Policy
from twophase.policy.config import SafeResortConfig, check_config

__all__ = [
    "SafeResortState",
    "adam_credit",
    "configure",
    "count_step",
    "end_epoch",
    "final_reserve",
    "initial_state",
    "judge_trial",
    "least_squares_pace",
    "pace_points",
    "rearm",
    "recognise_full_batch",
    "safe_resort",
    "segment_length",
    "start_trial",
    "steps_in_use",
    "trial_due",
    "trial_gain",
]

PyTree = Any
_F32 = jnp.float32
_UNSET = -1.0  # costs are >= 0: the state holds no NaN
# Relative difference under which the mini-batch loss and the full-batch one at
# the same point are taken as one computation (summation order only).
_SAME_VALUE = 1e-4
# A trial's transformed gain is capped: -log(1e-7) ~ 16, beyond any credit Adam
# can collect (its credit reaches 16 after e**15 times the run's age).
_GAIN_CAP = 1.0 - 1e-7
_REMOVED = {
    "window": "steps_per_epoch",
    "floor": None,
    "first_trial": None,
    **{name: f"config=SafeResortConfig({name}=...)" for name in SafeResortConfig._fields},
}


class SafeResortState(NamedTuple):
    """State of :func:`safe_resort` (scalars but ``values``).

    Costs are in epoch-equivalents (a mini-batch epoch, or a full-batch
    value-and-gradient evaluation).

    Attributes:
      budget: float32, the run's budget (0: unknown).
      budget_given: bool, ``budget`` was given to :func:`safe_resort`.
      epoch_steps: int32, phase-0 steps per epoch as given or set by
        :func:`twophase.train` (0: not told).
      epoch_steps_given: bool, ``epoch_steps`` was given to :func:`safe_resort`.
      full_batch: int32, 1 once the first phase-0 step was recognised as
        full-batch (its loss equals ``value_fn`` at the same point): a step then
        costs one evaluation whatever ``epoch_steps`` says; 0 when it was not;
        -1 before the first step.
      clock: :class:`twophase.policy.clock.Clock`, the exact cost account.
      cost: float32, its reading (both phases; for display and tests).
      loss_sum: float32, sum of the current epoch's mini-batch losses.
      values: float32 ``(history,)`` ring of epoch-mean losses since the last
        (re-)entry into phase 0.
      epochs: int32, entries pushed into ``values`` since then.
      adam_pace: float32, Adam's pace: the least-squares decrease of ``values``
        per epoch over the last epochs (0 until 3 epochs).
      next_trial: float32, cost from which the next trial may start.
      wait: float32, the wait before the trial after next (grows each return).
      wait_steps: int32, phase-0 steps after a return after which a trial is
        due whatever the cost account says (no budget; 0 before a trial).
      trial_start: float32, cost at the start of the current trial (-1: none).
      segment_cost: float32, cost at the trial's last judgement (-1 before its
        reference point is known).
      reference_cost: float32, cost at the trial's reference point: the
        switch, or its first accepted point (late polish, or no epoch mean yet).
      reference_value: float32, the loss there.
      trial_pace: float32, the trial's gain (:func:`trial_gain`) per
        epoch-equivalent since its reference point.
      trials: int32, trials started (switches).
      polish_after: float32, cost before which no late polish starts (set after
        a polish was returned from).
      trial_spent: float32, cost spent in trials that were returned from.
      best_gain_ratio: float32, the largest ratio, over the exploratory trials
        returned from, of a trial's gain to Adam's credit in its cost.
      exploring: bool, False once two trials have been returned from with none
        above ``hopeless`` (budget known).
      charges_incoming: bool, a second-phase step also costs one phase-0 step:
        the caller's loop computed the gradient that the second phase ignores
        (True by default; :func:`configure`, as :func:`twophase.train` calls
        it, sets False, since ``train`` skips that gradient in phase 1).
      iteration_cost: float32, the largest cost of one second-phase step so
        far (0 before one): a few evaluations for CG or L-BFGS with their line
        searches, ``JACOBIAN_COST`` and more for Levenberg-Marquardt (whose
        cheap steps reuse a Jacobian). It only grows, so a trial started as the
        final polish stays one.
    """

    budget: jax.Array
    budget_given: jax.Array
    epoch_steps: jax.Array
    epoch_steps_given: jax.Array
    full_batch: jax.Array
    clock: _clock.Clock
    cost: jax.Array
    loss_sum: jax.Array
    values: jax.Array
    epochs: jax.Array
    adam_pace: jax.Array
    next_trial: jax.Array
    wait: jax.Array
    wait_steps: jax.Array
    trial_start: jax.Array
    segment_cost: jax.Array
    reference_cost: jax.Array
    reference_value: jax.Array
    trial_pace: jax.Array
    trials: jax.Array
    polish_after: jax.Array
    trial_spent: jax.Array
    best_gain_ratio: jax.Array
    exploring: jax.Array
    charges_incoming: jax.Array
    iteration_cost: jax.Array


def initial_state(
    config: SafeResortConfig, steps_per_epoch: Any, budget: float | None, given: bool = True
) -> SafeResortState:
    """The state before the first step (``steps_per_epoch`` may be ``None``;
    ``given=False`` marks it as replaceable by :func:`configure`)."""
    zero = jnp.zeros([], _F32)
    unset = jnp.asarray(_UNSET, _F32)
    izero = jnp.zeros([], jnp.int32)
    return SafeResortState(
        budget=jnp.asarray(0.0 if budget is None else budget, _F32),
        budget_given=jnp.asarray(budget is not None),
        epoch_steps=jnp.asarray(0 if steps_per_epoch is None else steps_per_epoch, jnp.int32),
        epoch_steps_given=jnp.asarray(given and steps_per_epoch is not None),
        full_batch=jnp.full([], -1, jnp.int32),
        clock=_clock.start(),
        cost=zero,
        loss_sum=zero,
        values=jnp.zeros([config.history], _F32),
        epochs=izero,
        adam_pace=zero,
        next_trial=zero,
        wait=zero,
        wait_steps=izero,
        trial_start=unset,
        segment_cost=unset,
        reference_cost=unset,
        reference_value=zero,
        trial_pace=zero,
        trials=izero,
        polish_after=zero,
        trial_spent=zero,
        best_gain_ratio=zero,
        exploring=jnp.ones([], bool),
        charges_incoming=jnp.ones([], bool),
        iteration_cost=zero,
    )


def steps_in_use(state: SafeResortState, config: SafeResortConfig) -> jax.Array:
    """int32 phase-0 steps per epoch the account uses: 1 in a recognised
    full-batch loop, else as told, else ``config.assumed_steps_per_epoch``."""
    told = jnp.where(state.epoch_steps > 0, state.epoch_steps, config.assumed_steps_per_epoch)
    return jnp.where(state.full_batch == 1, 1, told).astype(jnp.int32)


def recognise_full_batch(
    state: SafeResortState, value: jax.Array, params: PyTree, value_fn: Any
) -> SafeResortState:
    """At the first phase-0 step, ``full_batch`` from one evaluation of
    ``value_fn`` at ``params``: a step whose loss ``value`` equals the full-batch
    objective there is a full-batch step, costing one evaluation. Later steps,
    and calls without ``params`` or ``value_fn``, leave the state as is."""
    if value_fn is None or params is None:
        return state
    objective = _aux.scalar_objective(value_fn)

    def measure(s):
        full = objective(params).astype(_F32)
        mini = jnp.reshape(jnp.asarray(value, _F32), ())
        size = jnp.maximum(jnp.maximum(jnp.abs(full), jnp.abs(mini)), jnp.finfo(_F32).tiny)
        same = jnp.abs(full - mini) <= _SAME_VALUE * size
        # A non-finite loss (a step that the switch skips) decides nothing.
        known = jnp.isfinite(full) & jnp.isfinite(mini)
        return s._replace(full_batch=jnp.where(known, same.astype(jnp.int32), s.full_batch))

    return lax.cond(state.full_batch < 0, measure, lambda s: s, state)


def least_squares_pace(values: jax.Array, epochs: jax.Array, points: jax.Array) -> jax.Array:
    """Least-squares decrease per epoch of the last ``min(epochs, points)``
    entries of the ring ``values`` (0 with fewer than 3)."""
    size = values.shape[0]
    slot = jnp.arange(size)
    age = jnp.mod(epochs - 1 - slot, size).astype(_F32)
    used = jnp.minimum(epochs, points)
    mask = (age < used.astype(_F32)).astype(_F32)
    count = jnp.maximum(mask.sum(), 1.0)
    x = -age
    # Centred on the newest entry so that a large loss offset costs no precision.
    y = values - values[jnp.mod(epochs - 1, size)]
    x_mean = (mask * x).sum() / count
    y_mean = (mask * y).sum() / count
    cov = (mask * (x - x_mean) * (y - y_mean)).sum()
    var = (mask * (x - x_mean) ** 2).sum()
    slope = cov / jnp.maximum(var, 1e-12)
    return jnp.where(used >= 3, -slope, 0.0)


def pace_points(budget: jax.Array, config: SafeResortConfig) -> jax.Array:
    """int32 epochs of Adam's pace: ``judge`` of a known budget, within
    ``[3, history]``; ``history`` without a budget."""
    known = jnp.clip(jnp.floor(config.judge * budget), 3, config.history)
    return jnp.where(budget > 0, known, config.history).astype(jnp.int32)


def end_epoch(state: SafeResortState, count: jax.Array, config: SafeResortConfig):
    """The epoch of ``count`` steps just ended: its mean loss pushed into
    ``values``, Adam's pace refitted."""
    mean = state.loss_sum / jnp.maximum(count, 1).astype(_F32)
    values = state.values.at[jnp.mod(state.epochs, config.history)].set(mean)
    epochs = state.epochs + 1
    pace = least_squares_pace(values, epochs, pace_points(state.budget, config))
    return state._replace(
        loss_sum=jnp.zeros([], _F32),
        values=values,
        epochs=epochs,
        adam_pace=jnp.where(jnp.isfinite(pace), pace, 0.0),
    )


def count_step(state: SafeResortState, value: jax.Array, config: SafeResortConfig):
    """One phase-0 step on the account: ``(state, epoch_end)``."""
    steps = steps_in_use(state, config)
    count = state.clock.steps + 1
    clock, epoch_end = _clock.tick(state.clock, steps)
    state = state._replace(
        clock=clock,
        cost=_clock.elapsed(clock, steps),
        loss_sum=state.loss_sum + jnp.reshape(jnp.asarray(value, _F32), ()),
    )
    state = lax.cond(epoch_end, lambda s: end_epoch(s, count, config), lambda s: s, state)
    return state, epoch_end


def final_reserve(state: SafeResortState, config: SafeResortConfig) -> jax.Array:
    """The final polish's share of a known budget (see :class:`SafeResortConfig`),
    and at least two second-phase iterations: a polish shorter than one
    iteration of an expensive second phase (Levenberg-Marquardt) would end past
    the budget, where a strict budget discards it."""
    share = jnp.maximum(2.0 * config.min_judge, 0.1 * config.judge * state.budget)
    return jnp.maximum(share, 2.0 * state.iteration_cost)


def trial_due(state: SafeResortState, step: jax.Array, config: SafeResortConfig):
    """``(due, gave_up)`` at an epoch's end: whether a trial (or the late
    polish) may start, and whether two hopeless trials ended the exploration."""
    known = state.budget > 0
    cost = state.cost
    polishing = known & (cost >= config.polish * state.budget) & (cost >= state.polish_after)
    # Failed trials spend at most `explore` of the budget (of the cost so far
    # without one); a trial costs about 1.5 segments to judge.
    scale = jnp.where(known, state.budget, cost)
    affordable = state.trial_spent + 1.5 * config.min_judge <= config.explore * scale
    affordable |= ~known & (state.trials == 0)  # without a budget, one early trial
    # Without a budget, also after geometrically growing runs of phase-0 steps:
    # a wrong epoch length (a wrong cost account) cannot end the trials.
    affordable |= ~known & (state.wait_steps > 0) & (step + 1 >= state.wait_steps)
    gave_up = known & (state.trials >= 2) & (state.best_gain_ratio < config.hopeless)
    affordable &= ~gave_up
    at_final = (
        _clock.elapsed_since(
            state.clock,
            steps_in_use(state, config),
            state.budget - final_reserve(state, config),
        )
        >= 0
    )
    judged_polish = pace_points(state.budget, config) >= config.history // 2
    polishing &= ~(gave_up & judged_polish) | at_final
    due = ((state.epochs >= 3) & (cost >= state.next_trial) & affordable) | polishing
    # No switch without room for a judged segment and one iteration: an
    # iteration past the budget is wasted (a strict budget discards it).
    needed = jnp.maximum(config.min_judge, state.iteration_cost)
    room = ~known | (state.budget - cost >= needed)
    return due & room, gave_up


def start_trial(state, switch, gave_up, step, config: SafeResortConfig) -> SafeResortState:
    """The state after a phase-0 step that ``switch``-es (or not)."""
    known = state.budget > 0
    # The switch point's loss is estimated from the last epoch's mean, which
    # sits half an epoch behind it (half of Adam's pace is taken off); a
    # full-batch step's loss is the one before its update, a whole step behind.
    last = state.values[jnp.mod(state.epochs - 1, config.history)]
    lag = jnp.where(state.full_batch == 1, 1.0, 0.5)
    start_value = last - lag * state.adam_pace
    # A late polish is measured from its first accepted point instead: its first
    # iteration removes the mini-batch noise Adam leaves, a one-off gain that the
    # final polish collects anyway.
    in_polish = known & (state.cost >= config.polish * state.budget)
    known_start = (state.epochs > 0) & ~in_polish
    reference = jnp.where(known_start, state.cost, _UNSET)
    growth2 = config.growth * config.growth
    waited = jnp.maximum(state.wait_steps, step + 1).astype(_F32) * growth2
    return state._replace(
        exploring=~gave_up,
        trial_start=jnp.where(switch, state.cost, state.trial_start),
        segment_cost=jnp.where(switch, reference, state.segment_cost),
        reference_cost=jnp.where(switch, reference, state.reference_cost),
        reference_value=jnp.where(switch, start_value, state.reference_value),
        trials=state.trials + switch.astype(jnp.int32),
        wait=jnp.where(switch & (state.wait == 0), jnp.maximum(state.cost, 1.0), state.wait),
        wait_steps=jnp.where(
            switch, jnp.minimum(waited, 2.0**30).astype(jnp.int32), state.wait_steps
        ),
    )


def trial_gain(reference_value: jax.Array, value: jax.Array, scale: jax.Array) -> jax.Array:
    """A trial's gain from ``reference_value`` to ``value``, in units that
    depend on no loss offset or scale.

    ``scale`` is Adam's pace times the run's age at the reference point (its
    cost): were Adam's loss a power law ``c / cost`` above an unknown floor,
    ``scale`` would be its gap to that floor. The gain is ``-log(1 - g /
    scale)`` for the decrease ``g``: to first order ``g / scale``, and beyond
    any credit once the trial goes below the floor so estimated (capped at
    about 16). With ``scale <= 0`` (Adam was not descending) it is ``g``, whose
    sign alone counts.
    """
    decrease = reference_value - value
    ratio = jnp.minimum(decrease / jnp.where(scale > 0, scale, 1.0), _GAIN_CAP)
    return jnp.where(scale > 0, -jnp.log1p(-ratio), decrease)


def adam_credit(spent: jax.Array, age: jax.Array, pace: jax.Array) -> jax.Array:
    """What Adam would have gained in ``spent`` epoch-equivalents after a run
    of ``age``, in :func:`trial_gain`'s units: ``spent / age`` up to the run's
    age (its pace held), and ``1 + log(spent / age)`` beyond it (its pace
    decaying as ``1 / cost``: a pace measured over the last epochs says nothing
    of a stretch longer than the whole run before it). 0 where ``pace <= 0``."""
    age = jnp.maximum(age, 1.0)
    spent = jnp.maximum(spent, 0.0)
    horizon = jnp.where(spent <= age, spent / age, 1.0 + jnp.log(jnp.maximum(spent, age) / age))
    return jnp.where(pace > 0, horizon, 0.0)


def segment_length(state: SafeResortState, config: SafeResortConfig) -> jax.Array:
    """A judged segment: ``judge`` of the cost at the trial's start (of the cost
    left, for a trial in the last half of a known budget), at least ``min_judge``."""
    horizon = jnp.where(
        state.budget > 0,
        jnp.minimum(state.trial_start, state.budget - state.trial_start),
        state.trial_start,
    )
    return jnp.maximum(config.min_judge, config.judge * horizon)


def judge_trial(state, *, value, cost, failures, finite, config, max_failures):
    """One second-phase step of ``cost`` reaching ``value``: ``(state, back)``.

    At each segment's end the trial's total gain since its reference point
    (:func:`trial_gain`) is compared with Adam's credit for the same cost
    (:func:`adam_credit`); behind, it returns. A step that costs more than two
    segments (a one-off such as a Nystrom sketch) is judged with the next one.
    Failures (``max_failures`` in a row) return only a trial that is behind:
    ahead, they are taken as convergence to float resolution. A non-finite step
    returns. The final polish, and a late polish on a pace of fewer than
    ``history // 2`` epochs (too noisy to judge by), are never judged.
    """
    steps = steps_in_use(state, config)
    incoming = jnp.where(state.charges_incoming, 1.0 / steps.astype(_F32), 0.0)
    clock = _clock.spend(state.clock, cost + incoming)
    cost_now = _clock.elapsed(clock, steps)
    value = jnp.reshape(jnp.asarray(value, _F32), ())
    usable = jnp.isfinite(value)
    known = state.budget > 0
    started = state.segment_cost >= 0
    # Until the reference point is known, this step's point becomes it.
    reference_cost = jnp.where(started, state.reference_cost, cost_now)
    reference_value = jnp.where(started, state.reference_value, value)
    length = segment_length(state, config)
    lone_costly = (state.cost <= state.segment_cost) & (cost_now - state.cost > 2 * length)
    judged = started & ~lone_costly & (cost_now - state.segment_cost >= length)
    spent = cost_now - reference_cost
    scale = state.adam_pace * jnp.maximum(reference_cost, 1.0)
    gain = trial_gain(reference_value, value, scale)
    credit = adam_credit(spent, reference_cost, state.adam_pace)
    behind = ~(gain >= credit)
    polishing = known & (cost_now >= config.polish * state.budget)
    final = known & (state.trial_start >= state.budget - final_reserve(state, config))
    reliable = jnp.minimum(state.epochs, pace_points(state.budget, config)) >= config.history // 2
    loses = judged & behind & ~(final | (polishing & ~reliable))
    back = loses | ~finite | ~usable | ((failures >= max_failures) & behind)
    gain_ratio = jnp.where(credit > 0, gain / jnp.maximum(credit, 1e-30), 1.0)
    exploratory = ~known | (state.trial_start < config.polish * state.budget)
    best = jnp.where(
        back & usable & exploratory,
        jnp.maximum(state.best_gain_ratio, gain_ratio),
        state.best_gain_ratio,
    )
    state = state._replace(
        clock=clock,
        cost=cost_now,
        iteration_cost=jnp.maximum(state.iteration_cost, cost_now - state.cost),
        segment_cost=jnp.where(~started | judged, cost_now, state.segment_cost),
        reference_cost=reference_cost,
        reference_value=jnp.where(usable, reference_value, state.reference_value),
        trial_pace=jnp.where(started & usable, gain / jnp.maximum(spent, 1e-12), state.trial_pace),
        best_gain_ratio=best,
    )
    return state, back


def rearm(state: SafeResortState, config: SafeResortConfig) -> SafeResortState:
    """The state at a return to Adam: the trial's cost booked, Adam's pace
    restarted, the next trial after the (grown) wait; after a late polish, the
    next polish is the final one (none once that was returned from)."""
    unset = jnp.asarray(_UNSET, _F32)
    in_polish = (state.budget > 0) & (state.cost >= config.polish * state.budget)
    final_start = state.budget - final_reserve(state, config)
    after = jnp.where(state.cost < final_start, final_start, state.cost + state.wait)
    return state._replace(
        polish_after=jnp.where(in_polish, after, state.polish_after),
        trial_spent=state.trial_spent + state.cost - state.trial_start,
        loss_sum=jnp.zeros([], _F32),
        epochs=jnp.zeros([], jnp.int32),
        adam_pace=jnp.zeros([], _F32),
        next_trial=state.cost + state.wait,
        wait=state.wait * config.growth,
        trial_start=unset,
        segment_cost=unset,
        reference_cost=unset,
        reference_value=jnp.zeros([], _F32),
    )


def _check_arguments(legacy, steps_per_epoch, budget, max_failures, min_steps, removed):
    """TypeError for removed or surplus arguments, ValueError for bad ones."""
    for name in removed:
        if name not in _REMOVED:
            raise TypeError(f"safe_resort() got an unexpected keyword argument {name!r}.")
        new = _REMOVED[name]
        if new is None:
            raise TypeError(
                f"safe_resort's `{name}` was removed: the policy now needs no loss floor "
                "and no first-trial fraction (its paces do not depend on the loss offset)."
            )
        raise TypeError(f"safe_resort's `{name}` was removed: pass `{new}` instead.")
    if len(legacy) > 1:
        raise TypeError("safe_resort takes at most one positional argument.")
    if legacy:
        check_int("steps_per_epoch", legacy[0], 1)
    if steps_per_epoch is not None and not isinstance(steps_per_epoch, jax.Array):
        check_int("steps_per_epoch", steps_per_epoch, 1)
    check_int("max_failures", max_failures, 1)
    check_int("min_steps", min_steps, 0)
    check_budget(budget)


def safe_resort(
    *legacy: int,
    steps_per_epoch: int | None = None,
    budget: float | None = None,
    max_failures: int = 2,
    min_steps: int = 0,
    config: SafeResortConfig | None = None,
    **removed: Any,
) -> Policy:
    """Try the second phase, keep it while it out-paces Adam, else return.

    How it decides (the clock, Adam's pace, trials, judging, the late polish,
    hopeless runs) is described in the module docstring of
    :mod:`twophase.policy.safe_resort`.

    Args:
      steps_per_epoch: phase-0 steps per epoch, ``>= 1``, or ``None`` (not
        told). :func:`twophase.train` sets it; a value that contradicts
        train's raises there. Injected with ``optax.inject_hyperparams``, it
        takes effect at the next update. (A positional value, the presets'
        former ``window``, is used the same way but ``twophase.train``
        replaces it silently.)
      budget: the run's budget in epoch-equivalents, or ``None``.
      max_failures: consecutive failed second-phase iterations that end a trial
        that is behind.
      min_steps: no switch before this many phase-0 steps since (re-)arming.
      config: the tuned constants (:class:`SafeResortConfig`; its defaults
        when ``None``).

    Returns:
      A :class:`Policy` with ``needs_value=True`` and state
      :class:`SafeResortState`.

    Raises:
      TypeError: a removed argument (``window``: ``steps_per_epoch``; the
        constants: ``config=SafeResortConfig(...)``; ``floor``, ``first_trial``).
      ValueError: an argument out of its range (named in the message).
    """
    _check_arguments(legacy, steps_per_epoch, budget, max_failures, min_steps, removed)
    config = SafeResortConfig() if config is None else config
    check_config(config)
    injected = isinstance(steps_per_epoch, jax.Array)
    told = legacy[0] if steps_per_epoch is None and legacy else steps_per_epoch

    def init(params):
        del params
        return initial_state(config, told, budget, given=steps_per_epoch is not None)

    def first(state, *, grad, grad_norm, value=None, step, params=None, value_fn=None):
        del grad, grad_norm
        require_value(value, "safe_resort")
        if injected:
            state = state._replace(epoch_steps=jnp.asarray(steps_per_epoch, jnp.int32))
        del params, value_fn
        state, epoch_end = count_step(state, value, config)
        due, gave_up = trial_due(state, step, config)
        switch = epoch_end & due & (step + 1 >= min_steps)
        return start_trial(state, switch, gave_up, step, config), switch

    def second(state, *, value, cost, failures, finite, params):
        del params
        return judge_trial(
            state,
            value=value,
            cost=cost,
            failures=failures,
            finite=finite,
            config=config,
            max_failures=max_failures,
        )

    def probe(state, *, value=None, params=None, value_fn=None):
        if value is None:
            return state
        return recognise_full_batch(state, value, params, value_fn)

    return Policy(
        init, first, second, lambda state, params: rearm(state, config), True, probe=probe
    )


def _configured(node: SafeResortState, budget: float | None, steps_per_epoch: int):
    """``node`` told the run's budget and epoch length (see :func:`configure`)."""
    if budget is not None and bool(node.budget_given):
        own = float(node.budget)
        if not math.isclose(own, budget):
            raise ValueError(
                f"the optimizer's `budget` ({own:g}) contradicts train's `cost_budget` "
                f"({budget:g}); pass one of them, or the same value."
            )
    if bool(node.epoch_steps_given) and int(node.epoch_steps) != steps_per_epoch:
        raise ValueError(
            f"the optimizer's `steps_per_epoch` ({int(node.epoch_steps)}) contradicts the "
            f"{steps_per_epoch} steps per epoch that train takes (examples // batch_size); "
            "leave `steps_per_epoch` out under twophase.train, or pass the same value."
        )
    return node._replace(
        budget=node.budget if budget is None else jnp.asarray(budget, _F32),
        epoch_steps=jnp.asarray(steps_per_epoch, jnp.int32),
        charges_incoming=jnp.zeros([], bool),
    )


def configure(state: PyTree, *, budget: float | None, steps_per_epoch: int) -> PyTree:
    """``state`` with every :class:`SafeResortState` in it told the run's budget
    and epoch length (what :func:`twophase.train` does with ``cost_budget``),
    and that the caller computes no gradient in phase 1 (as ``train``).

    A value the policy was built with (``safe_resort(budget=...,
    steps_per_epoch=...)``) must agree; one set by an earlier ``configure`` (a
    restored checkpoint) is replaced.

    Args:
      state: an optimizer state (any nesting).
      budget: ``cost_budget`` in epoch-equivalents, or ``None`` (unchanged).
      steps_per_epoch: mini-batch steps per epoch.

    Returns:
      The state with ``budget`` and ``epoch_steps`` set.

    Raises:
      ValueError: the policy was built with a different ``budget`` or
        ``steps_per_epoch`` (both values named).
    """

    def is_policy_state(node):
        return isinstance(node, SafeResortState)

    def set_fields(node):
        return _configured(node, budget, steps_per_epoch) if is_policy_state(node) else node

    return jax.tree.map(set_fields, state, is_leaf=is_policy_state)
