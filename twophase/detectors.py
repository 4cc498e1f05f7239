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

Why the statistic is an estimate of the *full-batch* norm: the mean of
mini-batch gradient norms converges to the sampling-noise floor, not to the
full-batch norm, and hides the paper's peak late in training. Over a window of
``m`` mini-batch gradients ``g_i`` with sum ``S`` and ``Q = sum ||g_i||^2``,
``E ||S||^2 - Q = m (m - 1) ||G||^2`` for i.i.d. batches with mean gradient
``G``, so ``(||S||^2 - Q) / (m (m - 1))`` is an unbiased estimate of the squared
full-batch norm (the gradient drift within a window is neglected).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree
from jax import lax

from twophase.objectives import as_value_and_grad

__all__ = [
    "Detector",
    "GradNormPeakState",
    "NormLossSlopeState",
    "SwitchAtState",
    "all_of",
    "any_of",
    "grad_norm_peak",
    "norm_loss_slope",
    "switch_at",
]

PyTree = Any


class Detector(NamedTuple):
    """A switch detector; see the module docstring for the protocol.

    Attributes:
      init: ``params -> state``.
      update: ``(state, *, grad, grad_norm, value, step, params, value_fn) ->
        (state, fire)``.
      needs_value: whether ``update`` requires the mini-batch loss ``value``.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[Any, jax.Array]]
    needs_value: bool = False


def _concrete(value: Any) -> Any:
    """A Python scalar for a concrete 0-d array (``optax.inject_hyperparams``
    passes hyperparameters as arrays); ``None`` for a tracer, which was
    validated when the transformation was built."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def _check_int(name: str, value: Any, minimum: int) -> None:
    value = _concrete(value)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def _check_ratio(ratio: Any) -> None:
    ratio = _concrete(ratio)
    if ratio is None:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"`ratio` must be in (0, 1], got {ratio!r}.")


def _require_value(value, who: str) -> None:
    if value is None:
        raise TypeError(
            f"{who} needs the mini-batch loss: pass `value=` to update (the loss at the "
            "incoming gradient)."
        )


# --------------------------------------------------------------------------- #
# Window accumulation of a full-batch gradient-norm estimate.


class _Window(NamedTuple):
    grad_sum: PyTree  # float32 sum of the window's gradients (None if exact)
    sq_norm_sum: jax.Array  # float32 sum of squared gradient norms
    value_sum: jax.Array  # float32 sum of mini-batch losses
    count: jax.Array  # int32 steps in the current window


def _window_init(params, exact: bool) -> _Window:
    grad_sum = (
        None if exact else jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
    )
    zero = jnp.zeros([], jnp.float32)
    return _Window(grad_sum, zero, zero, jnp.zeros([], jnp.int32))


def _window_add(w: _Window, grad, grad_norm, value) -> _Window:
    grad_sum = w.grad_sum
    if grad_sum is not None:
        grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grad)
    value_f32 = jnp.zeros([], jnp.float32) if value is None else jnp.asarray(value, jnp.float32)
    return _Window(
        grad_sum,
        w.sq_norm_sum + jnp.square(grad_norm.astype(jnp.float32)),
        w.value_sum + jnp.reshape(value_f32, ()),
        w.count + 1,
    )


def _window_norm_estimate(w: _Window) -> jax.Array:
    """Unbiased estimate of the full-batch norm from a complete window (see the
    module docstring); a window of one step gives that step's norm."""
    m = w.count.astype(jnp.float32)
    s_sq = jnp.asarray(optax.tree.vdot(w.grad_sum, w.grad_sum)).astype(jnp.float32)
    unbiased = (s_sq - w.sq_norm_sum) / jnp.maximum(m * (m - 1.0), 1.0)
    single = w.sq_norm_sum
    return jnp.sqrt(jnp.maximum(jnp.where(m > 1, unbiased, single), 0.0))


def _window_close(w: _Window, params, value_fn, exact: bool):
    """(norm statistic, mean loss, evaluations used) at the end of a window."""
    mean_value = w.value_sum / jnp.maximum(w.count.astype(jnp.float32), 1.0)
    if not exact:
        return _window_norm_estimate(w), mean_value, jnp.zeros([], jnp.int32)
    if value_fn is None:
        raise TypeError("grad_norm_peak(exact=True) needs `value_fn` at every update.")
    _, grad = as_value_and_grad(value_fn, params)(params)
    return jnp.asarray(optax.tree.norm(grad)).astype(jnp.float32), mean_value, jnp.ones([], jnp.int32)


def _window_reset(w: _Window) -> _Window:
    return _Window(
        None if w.grad_sum is None else optax.tree.zeros_like(w.grad_sum),
        jnp.zeros_like(w.sq_norm_sum),
        jnp.zeros_like(w.value_sum),
        jnp.zeros_like(w.count),
    )


def _on_window_end(w: _Window, window: int, params, value_fn, exact: bool):
    """Runs the window statistic only when the window is complete (``lax.cond``,
    so an exact evaluation costs one full-batch gradient per window)."""
    done = w.count >= window

    def close(w):
        norm, mean_value, evals = _window_close(w, params, value_fn, exact)
        return _window_reset(w), norm, mean_value, evals

    def keep(w):
        zero = jnp.zeros([], jnp.float32)
        return w, zero, zero, jnp.zeros([], jnp.int32)

    w, norm, mean_value, evals = lax.cond(done, close, keep, w)
    return done, w, norm, mean_value, evals


# --------------------------------------------------------------------------- #
# The paper's rule.


class GradNormPeakState(NamedTuple):
    """State of :func:`grad_norm_peak`.

    Attributes:
      window: running sums of the current window.
      grad_norm_stat: float32, the last complete window's full-batch norm estimate.
      grad_norm_max: float32, the largest ``grad_norm_stat`` so far.
      windows: int32, complete windows seen.
      value_and_grad_evals: int32, full-batch evaluations made (``exact=True``).
    """

    window: _Window
    grad_norm_stat: jax.Array
    grad_norm_max: jax.Array
    windows: jax.Array
    value_and_grad_evals: jax.Array


def grad_norm_peak(
    ratio: float = 0.9,
    window: int = 100,
    min_steps: int = 0,
    *,
    exact: bool = False,
) -> Detector:
    """The paper's rule (Hrycej et al. 2025, Algorithm 1) on a full-batch norm.

    At the end of every window of ``window`` steps the full-batch gradient norm
    is estimated (unbiasedly, from the window's mini-batch gradients; or, with
    ``exact=True``, evaluated through ``value_fn`` at the current parameters, one
    full-batch gradient per window, counted in ``info``). The detector fires when
    that statistic has fallen to ``ratio`` times its running maximum or below,
    once at least ``min_steps`` steps were seen. With ``window`` = steps per epoch
    and ``exact=True`` this is Algorithm 1 exactly.

    Buffers: one parameter-sized float32 sum (none with ``exact=True``).

    Caveat measured on a small classification MLP: the full-batch norm can
    *fall* during a start-up transient of a few epochs and then plateau, so this
    rule alone may fire far too early; use ``min_steps`` or combine it with
    :func:`norm_loss_slope` (see :func:`twophase.adam_cg`).

    Args:
      ratio: the paper's tolerance ``gnfact`` in ``(0, 1]``.
      window: steps per statistic (typically steps per epoch), ``>= 1``.
      min_steps: never fire before this many phase-0 steps, ``>= 0``.
      exact: evaluate the exact full-batch norm once per window.

    Returns:
      A :class:`Detector`.
    """
    _check_ratio(ratio)
    _check_int("window", window, 1)
    _check_int("min_steps", min_steps, 0)

    def init(params):
        zero = jnp.zeros([], jnp.float32)
        izero = jnp.zeros([], jnp.int32)
        return GradNormPeakState(_window_init(params, exact), zero, zero, izero, izero)

    def update(state, *, grad, grad_norm, value=None, step, params=None, value_fn=None):
        w = _window_add(state.window, grad, grad_norm, value)
        done, w, norm, _, evals = _on_window_end(w, window, params, value_fn, exact)
        stat = jnp.where(done, norm, state.grad_norm_stat)
        peak = jnp.maximum(state.grad_norm_max, stat)
        windows = state.windows + done.astype(jnp.int32)
        fire = (stat <= ratio * peak) & (step + 1 >= min_steps) & (windows >= 2)
        return GradNormPeakState(w, stat, peak, windows, state.value_and_grad_evals + evals), fire

    return Detector(init, update)


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
) -> Detector:
    """Fires once the gradient norm falls *with* the loss, clearly and for long.

    The paper's "dependence of the gradient norm on the loss": inside the convex
    basin around a minimum the gradient norm shrinks as the loss does, so the
    slope of norm against loss is positive; in the non-convex region the norm
    grows while the loss falls (negative slope). Every ``window`` steps this
    detector adds a point (the window's mean mini-batch loss, the window's
    unbiased full-batch norm estimate) and fits a least-squares line through the
    last ``history`` points. A window counts when the slope exceeds ``z_score``
    standard errors (clearly beyond the noise) *and* both the loss and the norm
    estimate fell over the fitted span. It fires after ``patience`` consecutive
    such windows, not before ``min_steps`` steps. A short start-up transient or
    one noisy window does not fire; ``history + patience - 1`` windows of
    sustained joint decrease do.

    Needs ``value`` (the mini-batch loss) at every update.
    Buffers: one parameter-sized float32 sum.

    Args:
      window: steps per point (typically steps per epoch), ``>= 1``.
      patience: consecutive clear windows required, ``>= 1``.
      history: points in each fit, ``>= 3``.
      z_score: how many standard errors the slope must exceed, ``> 0``.
      min_steps: never fire before this many phase-0 steps, ``>= 0``.

    Returns:
      A :class:`Detector` with ``needs_value=True``.
    """
    _check_int("window", window, 1)
    _check_int("patience", patience, 1)
    _check_int("history", history, 3)
    _check_int("min_steps", min_steps, 0)
    if isinstance(z_score, bool) or not isinstance(z_score, (int, float)) or z_score <= 0:
        raise ValueError(f"`z_score` must be a positive number, got {z_score!r}.")

    def init(params):
        zero = jnp.zeros([], jnp.float32)
        izero = jnp.zeros([], jnp.int32)
        ring = jnp.zeros([history], jnp.float32)
        return NormLossSlopeState(
            _window_init(params, False), ring, ring, zero, zero, zero, zero, izero, izero
        )

    def update(state, *, grad, grad_norm, value=None, step, params=None, value_fn=None):
        _require_value(value, "norm_loss_slope")
        w = _window_add(state.window, grad, grad_norm, value)
        done, w, norm, mean_loss, _ = _on_window_end(w, window, params, value_fn, False)
        norms = jnp.where(done, jnp.roll(state.norms, -1).at[-1].set(norm), state.norms)
        losses = jnp.where(done, jnp.roll(state.losses, -1).at[-1].set(mean_loss), state.losses)
        windows = state.windows + done.astype(jnp.int32)
        slope, stderr = least_squares_slope(losses, norms)
        falling = (losses[-1] < losses[0]) & (norms[-1] < norms[0])
        clear = (windows >= history) & falling & (slope > z_score * stderr)
        streak = jnp.where(done, jnp.where(clear, state.streak + 1, 0), state.streak)
        fire = (streak >= patience) & (step + 1 >= min_steps)
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
        )
        return new_state, fire

    return Detector(init, update, needs_value=True)


# --------------------------------------------------------------------------- #
# Fixed switch and combinators.


class SwitchAtState(NamedTuple):
    """State of :func:`switch_at` (empty: the step count comes from the caller)."""


def switch_at(step: int) -> Detector:
    """A fixed switch, as in the paper's experiments: the first second-phase step
    is step number ``step`` (0-based), i.e. after ``step >= 1`` first-phase steps.
    (A detector decides after a first-phase step, so at least one is made; for
    the second phase from the start use it directly, e.g. ``nonlinear_cg()``.)"""
    _check_int("step", step, 1)
    switch_step = step

    def init(params):
        del params
        return SwitchAtState()

    def update(state, *, grad, grad_norm, value=None, step, params=None, value_fn=None):
        return state, step + 1 >= switch_step

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
    """Fires when any of ``detectors`` fires (their states are kept in a tuple)."""
    return _combine(detectors, jnp.any, "any_of")


def all_of(*detectors: Detector) -> Detector:
    """Fires when the conditions of all ``detectors`` hold at the same step."""
    return _combine(detectors, jnp.all, "all_of")
