"""Switch detectors: when has the optimisation path entered the convex basin?

Hrycej et al. (KDIR 2025) observe that along a training path the gradient norm
first grows while the loss falls (non-convex region), peaks, then shrinks with
the loss (convex region), where a second-order method pays off. A detector
watches the first phase and says when to switch.

**Protocol.** A detector is a :class:`Detector` record of two pure functions::

    state = detector.init(params)
    state, fire = detector.update(state, grad=g, grad_norm=n, value=v, step=t,
                                  params=p, value_fn=f)

``grad`` is the incoming mini-batch gradient (pytree), ``grad_norm`` its
Euclidean norm (float32 scalar), ``value`` the mini-batch loss (scalar or
``None``), ``step`` the int32 count of phase-0 steps already seen before this
one, ``params`` the current parameters and ``value_fn`` the full-batch
objective. ``fire`` is a bool scalar, a level rather than an event: it says
whether the switching condition holds after this step (so combinators can
intersect conditions that become true at different steps). The state is a pytree (a ``NamedTuple``),
updated with ``jnp.where``/``lax.cond`` only: no Python control flow on traced
values. A detector that needs ``value`` sets ``needs_value=True`` and raises a
``TypeError`` at trace time when it is missing. State fields named
``grad_norm_stat``, ``grad_norm_max`` and ``value_and_grad_evals`` are reported
by :func:`twophase.info`.

The presets' default is no detector but the policy :func:`twophase.safe_resort`
(trials and returns); a detector given as ``detector=`` makes a one-way switch.
In a detector, ``window`` is a detection window in phase-0 steps (the policy's
epoch length is ``steps_per_epoch``, a different thing).

Detectors here: :func:`loss_plateau` (free, fires once Adam's mini-batch loss
has stopped falling at the run's own time scale),
:func:`grad_norm_peak` (the paper's Algorithm 1), :func:`norm_loss_slope` (the
paper's "norm falls with the loss"), :func:`switch_at`, and the combinators
:func:`any_of` / :func:`all_of`.

Why the gradient-norm detectors measure the *exact* full-batch norm by default,
once per window: the mean of mini-batch gradient norms converges to the
sampling-noise floor, not to the full-batch norm, and hides the paper's peak
late in training; and any estimate built from the optimiser's own stream of
mini-batch gradients (e.g. the window-sum estimate, unbiased for independent
draws) measures the path's displacement rather than the gradient at a point,
and collapses (see ``benchmarks/RESULTS.md``). A frozen point, evaluated in
full, is what works, at one full-batch evaluation per window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax.tree
from jax import lax

from twophase._checks import check_fraction, check_int, check_one_of, check_positive, require_value
from twophase._numerics import safe_norm
from twophase.objectives import as_value_and_grad

__all__ = [
    "ESTIMATORS",
    "Detector",
    "DetectorUpdate",
    "GradNormPeakState",
    "LossPlateauState",
    "NormLossSlopeState",
    "SwitchAtState",
    "all_of",
    "any_of",
    "grad_norm_peak",
    "loss_plateau",
    "norm_loss_slope",
    "switch_at",
]

PyTree = Any


class DetectorUpdate(Protocol):
    """A detector's ``update``: one phase-0 step seen, and whether to switch.

    Args:
      state: the detector's state.
      grad: the incoming (mini-batch) gradient, a pytree like the parameters.
      grad_norm: float32 ``()``, its Euclidean norm.
      value: ``()`` the mini-batch loss, or ``None`` when the caller has none
        (a detector with ``needs_value`` then raises ``TypeError``).
      step: int32 ``()``, phase-0 steps seen before this one (0-based).
      params: the parameters, or ``None``.
      value_fn: ``params -> ()`` full-batch objective, or ``None``.

    Returns:
      ``(new_state, fire)``, ``fire`` a bool ``()``: switch after this step.
    """

    def __call__(
        self,
        state: Any,
        *,
        grad: PyTree,
        grad_norm: jax.Array,
        value: jax.Array | None = None,
        step: jax.Array,
        params: PyTree = None,
        value_fn: Callable[[PyTree], jax.Array] | None = None,
    ) -> tuple[Any, jax.Array]: ...


class Detector(NamedTuple):
    """A switch detector; see the module docstring for the protocol.

    Attributes:
      init: ``params -> state``.
      update: a :class:`DetectorUpdate`, ``(state, *, grad, grad_norm, value,
        step, params, value_fn) -> (state, fire)``.
      needs_value: whether ``update`` requires the mini-batch loss ``value``.
    """

    init: Callable[[PyTree], Any]
    update: DetectorUpdate
    needs_value: bool = False


def _reached(step: jax.Array, steps: Any) -> jax.Array:
    """bool ``()``: ``steps`` phase-0 steps are done once the one with 0-based
    index ``step`` is (the ``min_steps`` test, and :func:`switch_at`'s)."""
    return step + 1 >= steps


# --------------------------------------------------------------------------- #
# Window accumulation of a gradient-norm statistic.

ESTIMATORS = ("exact", "minibatch", "window")


class _Window(NamedTuple):
    grad_sum: PyTree  # float32 sum of the window's gradients ("window" estimator only)
    sq_norm_sum: jax.Array  # float32 sum of squared mini-batch gradient norms
    value_sum: jax.Array  # float32 sum of mini-batch losses
    count: jax.Array  # int32 steps in the current window; 0 = sums are stale


def _window_init(params, estimator: str) -> _Window:
    grad_sum = None
    if estimator == "window":
        grad_sum = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
    zero = jnp.zeros([], jnp.float32)
    return _Window(grad_sum, zero, zero, jnp.zeros([], jnp.int32))


def _add_step(value_sum, sq_norm_sum, count, grad_norm, value):
    """``(value_sum, sq_norm_sum, count)`` of a window after one more step: the
    float32 sums of the mini-batch losses (0 for ``value=None``) and squared
    gradient norms, and the int32 step count. The sums are reset lazily by the
    first step of a window (``count == 0``), so that closing a window touches
    scalars only."""
    fresh = count == 0
    value_f32 = jnp.zeros([], jnp.float32) if value is None else jnp.asarray(value, jnp.float32)
    return (
        jnp.where(fresh, 0.0, value_sum) + jnp.reshape(value_f32, ()),
        jnp.where(fresh, 0.0, sq_norm_sum) + jnp.square(grad_norm.astype(jnp.float32)),
        count + 1,
    )


def _window_means(value_sum, sq_norm_sum, count) -> tuple[jax.Array, jax.Array]:
    """``(mean loss, RMS gradient norm)`` of a window's steps (float32 ``()``)."""
    steps = jnp.maximum(count.astype(jnp.float32), 1.0)
    return value_sum / steps, jnp.sqrt(sq_norm_sum / steps)


def _window_add(w: _Window, grad, grad_norm, value) -> _Window:
    grad_sum = w.grad_sum
    if grad_sum is not None:
        grad_sum = jax.tree.map(
            lambda s, g: jnp.where(w.count == 0, 0.0, s) + g.astype(jnp.float32), grad_sum, grad
        )
    value_sum, sq_norm_sum, count = _add_step(w.value_sum, w.sq_norm_sum, w.count, grad_norm, value)
    return _Window(grad_sum, sq_norm_sum, value_sum, count)


def _window_sum_estimate(w: _Window) -> jax.Array:
    """``sqrt((||S||^2 - Q) / (m (m - 1)))`` over a complete window (one step: its norm).

    Unbiased for the full-batch norm only if the window's mini-batch gradients were
    independent draws at one point. Along an optimiser's own path they are not:
    for SGD ``S = -(theta_end - theta_start) / lr`` exactly, so ``||S||`` measures
    the window's net displacement, and once the optimiser hovers at its noise
    level the estimate collapses to 0 (measured in ``benchmarks/switching.py``).
    """
    m = w.count.astype(jnp.float32)
    s_sq = jnp.asarray(optax.tree.vdot(w.grad_sum, w.grad_sum)).astype(jnp.float32)
    unbiased = (s_sq - w.sq_norm_sum) / jnp.maximum(m * (m - 1.0), 1.0)
    return jnp.sqrt(jnp.maximum(jnp.where(m > 1, unbiased, w.sq_norm_sum), 0.0))


def _on_window_end(w: _Window, window, params, value_fn, estimator: str):
    """Closes the window when complete: ``(done, window, norm, loss, evaluations)``.

    The statistic is computed under ``lax.cond``, so ``"exact"`` costs one
    full-batch value-and-gradient evaluation per window and nothing in between;
    only scalars leave the branch. ``loss`` is the full-batch loss (``"exact"``)
    or the window's mean mini-batch loss.
    """
    done = w.count >= window
    if estimator == "exact" and value_fn is None:
        raise TypeError("a detector with estimator='exact' needs `value_fn` at every update.")

    def close(w):
        mean_value, rms_norm = _window_means(w.value_sum, w.sq_norm_sum, w.count)
        if estimator == "exact":
            value, grad = as_value_and_grad(value_fn, params)(params)
            norm = jnp.asarray(safe_norm(grad)).astype(jnp.float32)
            return norm, value.astype(jnp.float32), jnp.ones([], jnp.int32)
        norm = rms_norm if estimator == "minibatch" else _window_sum_estimate(w)
        return norm, mean_value, jnp.zeros([], jnp.int32)

    def keep(w):
        zero = jnp.zeros([], jnp.float32)
        return zero, zero, jnp.zeros([], jnp.int32)

    norm, loss, evals = lax.cond(done, close, keep, w)
    return done, w._replace(count=jnp.where(done, 0, w.count)), norm, loss, evals


# --------------------------------------------------------------------------- #
# The paper's rule.


class GradNormPeakState(NamedTuple):
    """State of :func:`grad_norm_peak`.

    Attributes:
      window: running sums of the current window.
      grad_norm_stat: float32, the last complete window's gradient-norm statistic.
      grad_norm_max: float32, the largest ``grad_norm_stat`` so far.
      windows: int32, complete windows seen.
      value_and_grad_evals: int32, full-batch evaluations made (``"exact"``).
    """

    window: _Window
    grad_norm_stat: jax.Array
    grad_norm_max: jax.Array
    windows: jax.Array
    value_and_grad_evals: jax.Array


_ESTIMATOR_DOC = """
    Estimators of the gradient norm at a window's end (``estimator``):

    * ``"exact"`` (default): the full-batch gradient norm, and the full-batch
      loss, evaluated through ``value_fn`` at the current parameters: one
      full-batch value-and-gradient evaluation per window (counted in
      ``twophase.info(state).value_and_grad_evals``; with ``window`` = steps per
      epoch it adds one epoch-equivalent per epoch, so use a window of several
      epochs to keep it cheap). No parameter-sized buffer, no per-step work
      beyond a counter.
    * ``"minibatch"``: the RMS of the window's mini-batch gradient norms. Free,
      but biased upwards by sampling noise: late in training it sits at the
      noise floor rather than at the full-batch norm.
    * ``"window"``: ``sqrt((||S||^2 - Q) / (m (m - 1)))`` from the window's summed
      gradient ``S`` and summed squared norms ``Q``, unbiased for independent
      draws at one point. Measured along Adam's own path it collapses to 0 once
      Adam hovers at its noise level (the window sum measures the net
      displacement: for SGD, ``S = -(theta_end - theta_start) / lr``), on every
      problem of ``benchmarks/switching.py``. Kept for study; one parameter-sized
      float32 buffer.
"""


def grad_norm_peak(
    ratio: float = 0.9,
    window: int = 100,
    min_steps: int = 0,
    *,
    estimator: str = "exact",
) -> Detector:
    """The paper's rule (Hrycej et al. 2025, Algorithm 1) on a gradient-norm statistic.

    At the end of every window of ``window`` steps the gradient norm is measured
    (see the estimators below). The detector fires when that statistic has
    fallen to ``ratio`` times its running maximum or below, once at least
    ``min_steps`` steps were seen. With ``window`` = steps per epoch and the
    default ``"exact"`` estimator this is Algorithm 1 exactly.

    Caveat, measured: the full-batch norm often *falls* during a start-up
    transient (epoch 1 to 2), and fluctuates by tens of percent from epoch to
    epoch, so this rule fires at epoch 2 on every problem of
    ``benchmarks/switching.py`` and loses badly at equal cost there. Use
    ``min_steps``, or :func:`norm_loss_slope`.
    {estimators}
    Args:
      ratio: the paper's tolerance ``gnfact`` in ``(0, 1]``.
      window: steps per statistic (typically steps per epoch), ``>= 1``.
      min_steps: never fire before this many phase-0 steps, ``>= 0``.
      estimator: ``"exact"``, ``"minibatch"`` or ``"window"``.

    Returns:
      A :class:`Detector`.

    Raises:
      ValueError: ``ratio`` not in ``(0, 1]``, ``window`` not an int ``>= 1``,
        ``min_steps`` not an int ``>= 0``, or an unknown ``estimator``.
      TypeError: at trace time, ``update`` without ``value_fn`` for the
        ``"exact"`` estimator.
    """
    check_fraction("ratio", ratio, closed=True)
    check_int("window", window, 1)
    check_int("min_steps", min_steps, 0)
    check_one_of("estimator", estimator, ESTIMATORS)

    def init(params):
        zero = jnp.zeros([], jnp.float32)
        izero = jnp.zeros([], jnp.int32)
        return GradNormPeakState(_window_init(params, estimator), zero, zero, izero, izero)

    def update(state, *, grad, grad_norm, value=None, step, params=None, value_fn=None):
        w = _window_add(state.window, grad, grad_norm, value)
        done, w, norm, _, evals = _on_window_end(w, window, params, value_fn, estimator)
        stat = jnp.where(done, norm, state.grad_norm_stat)
        peak = jnp.maximum(state.grad_norm_max, stat)
        windows = state.windows + done.astype(jnp.int32)
        fire = (stat <= ratio * peak) & _reached(step, min_steps) & (windows >= 2)
        return GradNormPeakState(w, stat, peak, windows, state.value_and_grad_evals + evals), fire

    return Detector(init, update)


grad_norm_peak.__doc__ = grad_norm_peak.__doc__.format(estimators=_ESTIMATOR_DOC)


# --------------------------------------------------------------------------- #
# Gradient norm against loss.


class NormLossSlopeState(NamedTuple):
    """State of :func:`norm_loss_slope`.

    Attributes:
      window: running sums of the current window.
      norms: float32 ``(history,)`` ring of the last windows' norm estimates.
      losses: float32 ``(history,)`` ring of the last windows' mean losses.
      grad_norm_stat: float32, the last window's full-batch norm estimate.
      grad_norm_max: float32, the largest estimate so far.
      slope: float32, least-squares slope of norm against loss over the ring.
      slope_stderr: float32, its standard error.
      streak: int32, consecutive windows with a clearly positive slope.
      windows: int32, complete windows seen.
      value_and_grad_evals: int32, full-batch evaluations made (``"exact"``).
    """

    window: _Window
    norms: jax.Array
    losses: jax.Array
    grad_norm_stat: jax.Array
    grad_norm_max: jax.Array
    slope: jax.Array
    slope_stderr: jax.Array
    streak: jax.Array
    windows: jax.Array
    value_and_grad_evals: jax.Array


def least_squares_slope(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Slope of the least-squares line ``y ~ a + b x`` and its standard error.

    ``x``, ``y``: float ``(k,)`` with ``k >= 3``. A degenerate ``x`` (no spread)
    gives slope 0 with infinite error.
    """
    k = x.shape[0]
    xc = x - jnp.mean(x)
    yc = y - jnp.mean(y)
    sxx = jnp.sum(xc * xc)
    ok = sxx > 0
    slope = jnp.where(ok, jnp.sum(xc * yc) / jnp.where(ok, sxx, 1.0), 0.0)
    residual = yc - slope * xc
    variance = jnp.sum(residual * residual) / (k - 2)
    stderr = jnp.where(ok, jnp.sqrt(variance / jnp.where(ok, sxx, 1.0)), jnp.inf)
    return slope, stderr


def norm_loss_slope(
    window: int = 100,
    patience: int = 5,
    *,
    history: int = 4,
    z_score: float = 2.0,
    min_steps: int = 0,
    estimator: str = "exact",
) -> Detector:
    """Fires once the gradient norm falls *with* the loss, clearly and for long.

    The paper's "dependence of the gradient norm on the loss": inside the convex
    basin around a minimum the gradient norm shrinks as the loss does, so the
    slope of norm against loss is positive; in the non-convex region the norm
    grows while the loss falls (negative slope). Every ``window`` steps this
    detector adds a point (loss, gradient norm) and fits a least-squares line
    through the last ``history`` points. A window counts when the slope exceeds
    ``z_score`` standard errors (clearly beyond the noise) *and* both the loss
    and the norm fell over the fitted span. It fires after ``patience``
    consecutive such windows, not before ``min_steps`` steps: a start-up
    transient shorter than the fitted span, or one noisy window, does not fire;
    ``history + patience - 1`` windows of sustained joint decrease do.

    With ``"exact"`` the point is the full-batch (loss, gradient norm) at the
    window's end; otherwise the window's mean mini-batch loss (``value`` is then
    required at every update) and the chosen norm statistic.
    {estimators}
    Args:
      window: steps per point (e.g. a few epochs' steps), ``>= 1``.
      patience: consecutive clear windows required, ``>= 1``.
      history: points in each fit, ``>= 3``.
      z_score: how many standard errors the slope must exceed, ``> 0``.
      min_steps: never fire before this many phase-0 steps, ``>= 0``.
      estimator: ``"exact"``, ``"minibatch"`` or ``"window"``.

    Returns:
      A :class:`Detector` (``needs_value`` unless ``"exact"``).

    Raises:
      ValueError: ``window`` or ``patience`` not an int ``>= 1``, ``history``
        not an int ``>= 3``, ``min_steps`` not an int ``>= 0``, an unknown
        ``estimator``, or ``z_score`` not a positive finite number.
      TypeError: at trace time, ``update`` without ``value`` (other estimators
        than ``"exact"``) or without ``value_fn`` (``"exact"``).
    """
    check_int("window", window, 1)
    check_int("patience", patience, 1)
    check_int("history", history, 3)
    check_int("min_steps", min_steps, 0)
    check_one_of("estimator", estimator, ESTIMATORS)
    check_positive("z_score", z_score)
    needs_value = estimator != "exact"

    def init(params):
        zero = jnp.zeros([], jnp.float32)
        izero = jnp.zeros([], jnp.int32)
        ring = jnp.zeros([history], jnp.float32)
        return NormLossSlopeState(
            _window_init(params, estimator),
            ring,
            ring,
            zero,
            zero,
            zero,
            zero,
            izero,
            izero,
            izero,
        )

    def update(state, *, grad, grad_norm, value=None, step, params=None, value_fn=None):
        if needs_value:
            require_value(value, "norm_loss_slope")
        w = _window_add(state.window, grad, grad_norm, value)
        done, w, norm, loss, evals = _on_window_end(w, window, params, value_fn, estimator)
        norms = jnp.where(done, jnp.roll(state.norms, -1).at[-1].set(norm), state.norms)
        losses = jnp.where(done, jnp.roll(state.losses, -1).at[-1].set(loss), state.losses)
        windows = state.windows + done.astype(jnp.int32)
        slope, stderr = least_squares_slope(losses, norms)
        falling = (losses[-1] < losses[0]) & (norms[-1] < norms[0])
        clear = (windows >= history) & falling & (slope > z_score * stderr)
        streak = jnp.where(done, jnp.where(clear, state.streak + 1, 0), state.streak)
        fire = (streak >= patience) & _reached(step, min_steps)
        new_state = NormLossSlopeState(
            window=w,
            norms=norms,
            losses=losses,
            grad_norm_stat=jnp.where(done, norm, state.grad_norm_stat),
            grad_norm_max=jnp.maximum(state.grad_norm_max, jnp.where(done, norm, 0.0)),
            slope=jnp.where(done, slope, state.slope),
            slope_stderr=jnp.where(done, stderr, state.slope_stderr),
            streak=streak,
            windows=windows,
            value_and_grad_evals=state.value_and_grad_evals + evals,
        )
        return new_state, fire

    return Detector(init, update, needs_value=needs_value)


norm_loss_slope.__doc__ = norm_loss_slope.__doc__.format(estimators=_ESTIMATOR_DOC)


# --------------------------------------------------------------------------- #
# Loss plateau.


class LossPlateauState(NamedTuple):
    """State of :func:`loss_plateau`.

    Attributes:
      value_sum: float32, sum of the current window's mini-batch losses.
      grad_sq_sum: float32, sum of its squared mini-batch gradient norms.
      count: int32, steps in the current window.
      window_steps: int32, the current window length (doubles at every merge).
      means: float32 ``(2 * history,)``, mean loss of each complete window since
        the start, oldest first; entries ``>= stored`` are unused.
      stored: int32, entries of ``means`` in use.
      grad_norm_stat: float32, the last window's RMS mini-batch gradient norm
        (reported by ``info``; not used to decide).
      grad_norm_max: float32, the largest ``grad_norm_stat`` so far.
      slope: float32, least-squares slope of the last ``history`` means (per window).
      slope_stderr: float32, its standard error.
      streak: int32, consecutive windows whose slope was not clearly negative.
      merges: int32, how often windows were merged: the current window is
        ``window * 2**merges`` steps for the ``window`` in effect at each update
        (so an injected ``window`` takes effect at once).
    """

    value_sum: jax.Array
    grad_sq_sum: jax.Array
    count: jax.Array
    window_steps: jax.Array
    means: jax.Array
    stored: jax.Array
    grad_norm_stat: jax.Array
    grad_norm_max: jax.Array
    slope: jax.Array
    slope_stderr: jax.Array
    streak: jax.Array
    merges: jax.Array


def init_loss_plateau(window: int, history: int) -> LossPlateauState:
    """A fresh :class:`LossPlateauState`: windows of ``window`` steps, room for
    ``2 * history`` window means."""
    zero = jnp.zeros([], jnp.float32)
    return LossPlateauState(
        value_sum=zero,
        grad_sq_sum=jnp.zeros([], jnp.float32),
        count=jnp.zeros([], jnp.int32),
        window_steps=jnp.asarray(window, jnp.int32),
        means=jnp.zeros([2 * history], jnp.float32),
        stored=jnp.zeros([], jnp.int32),
        grad_norm_stat=jnp.zeros([], jnp.float32),
        grad_norm_max=jnp.zeros([], jnp.float32),
        slope=jnp.zeros([], jnp.float32),
        slope_stderr=jnp.zeros([], jnp.float32),
        streak=jnp.zeros([], jnp.int32),
        merges=jnp.zeros([], jnp.int32),
    )


def close_plateau_window(state: LossPlateauState, history: int, z_score: float) -> LossPlateauState:
    """Close :func:`loss_plateau`'s current window: store its mean loss, fit a
    least-squares line through the last ``history`` means, count a flat window
    (``slope >= -z_score * stderr``) in ``streak``, and, once ``2 * history``
    means are stored, merge adjacent pairs and double the window length."""
    positions = jnp.arange(history, dtype=jnp.float32)
    mean, norm = _window_means(state.value_sum, state.grad_sq_sum, state.count)
    means = state.means.at[state.stored].set(mean)
    stored = state.stored + 1
    last = lax.dynamic_slice(means, (jnp.maximum(stored - history, 0),), (history,))
    slope, stderr = least_squares_slope(positions, last)
    flat = (stored >= history) & (slope >= -z_score * stderr)
    full = stored == 2 * history
    merged = jnp.concatenate(
        [means.reshape(history, 2).mean(axis=1), jnp.zeros([history], jnp.float32)]
    )
    return state._replace(
        value_sum=jnp.zeros([], jnp.float32),
        grad_sq_sum=jnp.zeros([], jnp.float32),
        count=jnp.zeros([], jnp.int32),
        window_steps=jnp.where(full, 2 * state.window_steps, state.window_steps),
        merges=state.merges + full.astype(jnp.int32),
        means=jnp.where(full, merged, means),
        stored=jnp.where(full, history, stored),
        grad_norm_stat=norm,
        grad_norm_max=jnp.maximum(state.grad_norm_max, norm),
        slope=jnp.where(stored >= history, slope, 0.0),
        slope_stderr=jnp.where(stored >= history, stderr, jnp.inf),
        streak=jnp.where(flat, state.streak + 1, 0),
    )


def loss_plateau(
    window: int = 100,
    patience: int = 5,
    *,
    history: int = 10,
    z_score: float = 1.0,
    min_steps: int = 0,
) -> Detector:
    """Fires once the mini-batch loss has stopped falling over the last half of the run.

    The moment the paper's method is for: Adam has reached the floor that its
    mini-batches and step size allow, and only a full-batch method makes further
    progress. The detector keeps the mean mini-batch loss (``value``, required)
    of every window since the start, in at most ``2 * history`` equal windows:
    windows start ``window`` steps long and, whenever ``2 * history`` are
    stored, adjacent pairs are merged and the window length doubles. After each
    window it fits a least-squares line through the last ``history`` means,
    which therefore span the last half of the run or more (scale-free: a loss
    that keeps falling like a power law of the step count, as Adam's typically
    does, is never flat at any time scale). A window is flat when the fitted
    decrease is not clearly beyond the noise (``slope >= -z_score * stderr``);
    the detector fires after ``patience`` consecutive flat windows, not before
    ``min_steps`` steps.

    It is free: no full-batch evaluation, no parameter-sized buffer, a few
    scalar operations per step. It is deliberately conservative: a switch to
    full-batch CG lost at equal cost wherever Adam was still making progress
    (``benchmarks/RESULTS.md``), and a loss that has been flat for a short
    stretch can fall again. It cannot tell a basin floor from a long saddle
    plateau, which look the same in the loss.

    Args:
      window: steps in the first windows (typically steps per epoch), ``>= 1``.
      patience: consecutive flat windows required, ``>= 1``.
      history: points in each fit, ``>= 3``.
      z_score: a slope below ``-z_score`` standard errors counts as still
        falling, ``> 0``.
      min_steps: never fire before this many phase-0 steps, ``>= 0``.

    Returns:
      A :class:`Detector` with ``needs_value=True``.

    Raises:
      ValueError: ``window`` or ``patience`` not an int ``>= 1``, ``history``
        not an int ``>= 3``, ``min_steps`` not an int ``>= 0``, or ``z_score``
        not a positive finite number.
      TypeError: at trace time, ``update`` without ``value``.
    """
    check_int("window", window, 1)
    check_int("patience", patience, 1)
    check_int("history", history, 3)
    check_int("min_steps", min_steps, 0)
    check_positive("z_score", z_score)

    def init(params):
        del params
        return init_loss_plateau(window, history)

    def close(state: LossPlateauState) -> LossPlateauState:
        return close_plateau_window(state, history, z_score)

    def update(state, *, grad, grad_norm, value=None, step, params=None, value_fn=None):
        del grad, params, value_fn
        require_value(value, "loss_plateau")
        value_sum, grad_sq_sum, count = _add_step(
            state.value_sum, state.grad_sq_sum, state.count, grad_norm, value
        )
        state = state._replace(
            value_sum=value_sum,
            grad_sq_sum=grad_sq_sum,
            count=count,
            # From the `window` in effect now, so that an injected one takes effect.
            window_steps=jnp.left_shift(jnp.asarray(window, jnp.int32), state.merges),
        )
        state = lax.cond(state.count >= state.window_steps, close, lambda s: s, state)
        fire = (state.streak >= patience) & _reached(step, min_steps)
        return state, fire

    return Detector(init, update, needs_value=True)


# --------------------------------------------------------------------------- #
# Fixed switch and combinators.


class SwitchAtState(NamedTuple):
    """State of :func:`switch_at` (empty: the step count comes from the caller)."""


def switch_at(step: int) -> Detector:
    """A fixed switch, as in the paper's experiments: the first second-phase step
    is step number ``step`` (0-based), i.e. after ``step >= 1`` first-phase steps.
    (A detector decides after a first-phase step, so at least one is made; for
    the second phase from the start use it directly, e.g. ``nonlinear_cg()``.)

    Args:
      step: the index of the first second-phase step, an int ``>= 1``.

    Returns:
      A :class:`Detector` with an empty state.

    Raises:
      ValueError: ``step`` not an int ``>= 1``.
    """
    check_int("step", step, 1)
    switch_step = step

    def init(params):
        del params
        return SwitchAtState()

    def update(state, *, grad, grad_norm, value=None, step, params=None, value_fn=None):
        return state, _reached(step, switch_step)

    return Detector(init, update)


def _combine(detectors: tuple[Detector, ...], reduce, name: str) -> Detector:
    if not detectors:
        raise ValueError(f"`{name}` needs at least one detector.")
    for d in detectors:
        if not isinstance(d, Detector):
            raise ValueError(f"`{name}` takes twophase Detectors, got {d!r}.")

    def init(params):
        return tuple(d.init(params) for d in detectors)

    def update(state, **kwargs):
        results = [d.update(s, **kwargs) for d, s in zip(detectors, state, strict=True)]
        states = tuple(s for s, _ in results)
        fires = jnp.stack([jnp.asarray(f) for _, f in results])
        return states, reduce(fires)

    return Detector(init, update, needs_value=any(d.needs_value for d in detectors))


def any_of(*detectors: Detector) -> Detector:
    """Fires when any of ``detectors`` fires (their states are kept in a tuple).

    Raises:
      ValueError: no detector, or an argument that is not a :class:`Detector`.
    """
    return _combine(detectors, jnp.any, "any_of")


def all_of(*detectors: Detector) -> Detector:
    """Fires when the conditions of all ``detectors`` hold at the same step
    (their states are kept in a tuple).

    Raises:
      ValueError: no detector, or an argument that is not a :class:`Detector`.
    """
    return _combine(detectors, jnp.all, "all_of")
