"""Nonlinear conjugate gradient as an optax transformation.

Each ``update`` call is one CG iteration, in stages (module-level functions,
each testable alone):

1. :func:`~twophase.second_phase.common.value_here`: value and gradient at the
   current point, from the cache the last line search left;
2. :func:`start_direction`: the stored direction, or steepest descent on a
   (re)start; :func:`first_trial_step`: the line search's first trial;
3. the line search along the direction (:mod:`~twophase.second_phase.linesearch`);
4. :func:`next_direction`: ``d_{k+1} = -z_{k+1} + beta d_k`` with a beta rule
   (:mod:`~twophase.second_phase.beta`), or a restart;
5. :func:`after_search` / :func:`hold_state` / :func:`stalled_state`: the new state.

**Contract (no wasted evaluations).** The value and gradient at the point the
line search accepted are stored in the state and reused by the next call, which
therefore assumes that the parameters were advanced by *exactly* the returned
update (``optax.apply_updates(params, updates)``) and that the objective did not
change. A transformation chained *after* this one that alters the update (weight
decay, clipping) breaks the contract; place it before, or inside ``value_fn``.
To change the objective or the parameters otherwise, re-``init`` the state.

**Restarts** to steepest descent (``d = -z``): on the first iteration, after a
failed line search, when Powell's (1977) test
``|<z_k, g_{k-1}>| >= restart_threshold * <z_k, g_k>`` fires, every
``restart_every`` iterations, when ``beta`` is not finite, and whenever the new
direction is not a descent direction. Fletcher-Reeves and Dai-Yuan jam without
restarts, so ``restart_threshold="auto"`` turns Powell's test on for them only:
PR+ restarts itself through ``max(0, beta)``, and the test costs PR+, HS and HZ
evaluations.

**Stalls.** A failed line search leaves the parameters where they are and makes
the next call a steepest-descent restart from the same point. Once that restart
has failed too (two failures in a row; typically the objective has converged to
its floating-point resolution), every later call would repeat the same search:
such a call evaluates once, and while the value is the one it had (the
objective did not change), returns a zero update and counts a failed iteration
without searching. A call after one that did not move never trusts the cache:
the objective may have changed under it (loss weights, resampled residual
points), and the next search starts from a fresh evaluation.

**First trial step** (``initial_step``): on the first iteration and after
restarts caused by failures, Hager & Zhang's (2006) ``0.01 ||x||_inf / ||d||_inf``
(or ``0.01 |f| / ||g||^2`` at ``x = 0``); afterwards the rule of
:data:`~twophase.second_phase.common.INITIAL_STEP_RULES` (``"slope"``,
``"quadratic"`` or ``"max"``).

**Scale.** Stored directions are multiplied by a power of two that brings
gradients of extreme size near 1, so that every inner product stays finite for
any finite gradient (:func:`twophase._numerics.pow2_scale`).

Memory: two parameter-sized buffers (three with a stored preconditioner),
against about ``2m + 2`` for L-BFGS with memory ``m``.

References:
  * Nocedal & Wright, *Numerical Optimization* (2006), chapters 3.5 and 5.2.
  * Powell (1977), restart when successive gradients are far from orthogonal.
  * Hager & Zhang (2006), "A survey of nonlinear conjugate gradient methods".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree
from jax import lax

from twophase import auxiliary as _aux
from twophase._checks import concrete, require_update_args
from twophase._numerics import finite_and_norm, max_abs, pow2_scale
from twophase.second_phase import common
from twophase.second_phase import linesearch as _ls
from twophase.second_phase.beta import JAMMING_RULES, BetaFn, resolve_beta
from twophase.second_phase.common import select, set_preconditioner, vdot

__all__ = [
    "INITIAL_STEPS",
    "BetaFn",
    "CGOptions",
    "NonlinearCGState",
    "after_search",
    "first_trial_step",
    "hold_state",
    "init_state",
    "next_direction",
    "nonlinear_cg",
    "search_step",
    "set_preconditioner",
    "stalled_state",
    "start_direction",
    "update",
]

PyTree = Any

INITIAL_STEPS = ("slope", "quadratic", "max")
"""The ``initial_step`` rules :func:`nonlinear_cg` accepts."""


class NonlinearCGState(NamedTuple):
    """State of :func:`nonlinear_cg`.

    Parameter-sized buffers: ``grad`` and ``direction`` (two), plus
    ``preconditioner`` when a stored diagonal preconditioner is used (three).
    The next direction is computed at the end of each iteration, while both the
    old and the new gradient are at hand, so the previous gradient need not be
    kept. Buffers are in the CG arithmetic dtype: float32 for parameters of lower
    precision (bfloat16, float16), the parameters' dtype otherwise.

    Attributes:
      value: objective at the current parameters, scalar; ``+inf`` until the
        first evaluation. Read by ``optax.value_and_grad_from_state``.
      grad: gradient at the current parameters (pytree like the parameters).
      direction: search direction for the next iteration, ``d_k``, stored
        times a power of two that brings gradients of extreme size (in float32,
        entries beyond about 1e15 or below 1e-15) near 1, and exactly 1
        otherwise, so that ``slope`` stays finite for any finite gradient;
        ``step`` is along this stored direction.
      slope: ``<g_k, d_k>`` with the stored ``d_k``, scalar (negative).
      value_prev: objective at the previous iterate, scalar.
      slope_prev: ``<g_{k-1}, d_{k-1}>``, scalar.
      step: last accepted step size, scalar.
      preconditioner: diagonal preconditioner ``P`` (positive, pytree like the
        parameters) when stored in the state, else ``None``.
      restart_next: bool scalar; the next direction is steepest descent computed
        afresh (set at init, after failures and by
        :func:`set_preconditioner`).
      since_restart: int32 iterations since the last steepest-descent step.
      cg_iterations: int32 line searches performed (successful or not).
      value_and_grad_evals: int32 evaluations of the objective with its gradient.
      restarts: int32 steepest-descent restarts after the first iteration.
      linesearch_failures: int32 line searches that found no decrease.
      consecutive_failures: int32 current run of such failures (0 after a success).
      nonfinite_events: int32 calls where the objective or gradient at the current
        point was not finite (no step was taken).
      aux: the auxiliary output at the current parameters when ``value_fn``
        returns ``(loss, aux)`` (a pytree of scalars, zeros before the first
        evaluation), else ``None``; ``None`` until the first ``update`` sees
        ``value_fn`` (:func:`twophase.prepare_aux` fills it beforehand).
    """

    value: jax.Array
    grad: PyTree
    direction: PyTree
    slope: jax.Array
    value_prev: jax.Array
    slope_prev: jax.Array
    step: jax.Array
    preconditioner: PyTree
    restart_next: jax.Array
    since_restart: jax.Array
    cg_iterations: jax.Array
    value_and_grad_evals: jax.Array
    restarts: jax.Array
    linesearch_failures: jax.Array
    consecutive_failures: jax.Array
    nonfinite_events: jax.Array
    aux: PyTree = None


class CGOptions(NamedTuple):
    """The checked options of one :func:`nonlinear_cg`.

    Attributes:
      beta_fn: the direction rule, a :class:`BetaFn`.
      search: the :class:`~twophase.second_phase.linesearch.LineSearch`.
      restart_threshold: Powell's constant, or ``None``.
      restart_every: iterations between forced restarts, or ``None``.
      preconditioner: as the argument of :func:`nonlinear_cg`.
      initial_step: one of :data:`INITIAL_STEPS`.
      grad_tol: the "zero" gradient norm.
    """

    beta_fn: BetaFn
    search: _ls.LineSearch
    restart_threshold: float | None
    restart_every: int | None
    preconditioner: Any
    initial_step: str
    grad_tol: float


def nonlinear_cg(
    beta: str | BetaFn = "polak_ribiere",
    linesearch: str | _ls.LineSearch = "wolfe",
    *,
    restart_threshold: float | str | None = "auto",
    restart_every: int | None = None,
    preconditioner: PyTree | Callable[[PyTree, NonlinearCGState], PyTree] | str | None = None,
    initial_step: str = "slope",
    grad_tol: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Full-batch nonlinear conjugate gradient with a line search.

    Each ``update`` call performs one CG iteration (see the module docstring):
    a line search along ``d_k = -z_k + beta_k d_{k-1}`` (``z = P g``) and the
    returned update ``step * d_k`` to add with :func:`optax.apply_updates`.
    Call ``update(updates, state, params, value_fn=f)`` where ``f(params)``
    returns the full (full-batch) objective as a scalar; ``updates`` are
    ignored. The value cached in the state is also readable by
    ``optax.value_and_grad_from_state``.

    Args:
      beta: direction rule, a name in :data:`twophase.BETA_RULES` or a :class:`BetaFn`.
        Default ``"polak_ribiere"`` (PR+), the rule that met the targets against
        scipy on the benchmark suite with the default line search
        (`benchmarks/RESULTS.md <../benchmarks/RESULTS.md>`_).
      linesearch: ``"wolfe"`` (:func:`twophase.wolfe_linesearch` defaults),
        ``"golden"`` (the paper's), or a :class:`twophase.LineSearch`.
      restart_threshold: Powell's restart constant in ``(0, 1]``; ``None``
        disables; ``"auto"``: 0.2 for the rules in :data:`JAMMING_RULES`, else ``None``.
      restart_every: restart every this many iterations (e.g. the number of
        parameters); ``None`` disables.
      preconditioner: ``None``; a pytree of positive scales ``P`` like the
        parameters (an approximate inverse Hessian diagonal), stored in the state;
        ``"state"`` to store ones, meant to be replaced later with
        :func:`twophase.set_preconditioner` (how ``two_phase`` hands over Adam's
        second moments); or a callable ``(params, state) -> P`` evaluated every
        iteration.
      initial_step: ``"slope"`` (default), ``"quadratic"`` or ``"max"`` (see the module docstring).
      grad_tol: "zero" gradient norm (the paper's CG parameter): while
        ``||g||_2 <= grad_tol`` no line search is made and the update is zero.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: an unknown ``beta``, ``linesearch`` or ``initial_step``, a
        ``restart_threshold`` outside ``(0, 1]``, ``restart_every < 1`` or a
        negative ``grad_tol`` (at construction).
      TypeError: ``update`` called without ``value_fn``.
    """
    options = CGOptions(
        beta_fn=resolve_beta(beta),
        search=common.resolve_linesearch(linesearch),
        restart_threshold=_check_restart_threshold(beta, restart_threshold),
        restart_every=_check_restart_every(restart_every),
        preconditioner=_check_preconditioner(preconditioner),
        initial_step=initial_step,
        grad_tol=_check_grad_tol(grad_tol),
    )
    common.check_initial_step(initial_step, INITIAL_STEPS)
    return common.second_phase_transformation(
        functools.partial(init_state, preconditioner=preconditioner),
        functools.partial(update, options),
    )


def _check_restart_threshold(beta, threshold):
    """Powell's constant: ``"auto"`` resolved for ``beta``, else checked."""
    if threshold == "auto":
        return 0.2 if beta in JAMMING_RULES else None
    value = concrete(threshold)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1
    ):
        raise ValueError(
            f"`restart_threshold` must be in (0, 1], None or 'auto', got {threshold!r}."
        )
    return threshold


def _check_restart_every(every):
    value = concrete(every)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"`restart_every` must be a positive int or None, got {every!r}.")
    return every


def _check_grad_tol(grad_tol):
    tol = concrete(grad_tol)
    if grad_tol is None or (
        tol is not None
        and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf)
    ):
        raise ValueError(f"`grad_tol` must be a finite number >= 0, got {grad_tol!r}.")
    return grad_tol


def _check_preconditioner(preconditioner):
    if isinstance(preconditioner, str) and preconditioner != "state":
        raise ValueError(
            "`preconditioner` must be None, 'state', a pytree or a callable, "
            f"got {preconditioner!r}."
        )
    return preconditioner


def init_state(params: PyTree, *, preconditioner: Any = None) -> NonlinearCGState:
    """A fresh :class:`NonlinearCGState` for ``params`` (the first update restarts)."""
    dtype = common.scalar_dtype(params)
    int_zero = jnp.zeros([], jnp.int32)
    return NonlinearCGState(
        value=jnp.asarray(jnp.inf, dtype),
        grad=common.to_compute(optax.tree.zeros_like(params)),
        direction=common.to_compute(optax.tree.zeros_like(params)),
        slope=jnp.zeros([], dtype),
        value_prev=jnp.asarray(jnp.inf, dtype),
        slope_prev=jnp.zeros([], dtype),
        step=jnp.zeros([], dtype),
        preconditioner=common.initial_preconditioner(preconditioner, params),
        restart_next=jnp.asarray(True),
        since_restart=int_zero,
        cg_iterations=int_zero,
        value_and_grad_evals=int_zero,
        restarts=int_zero,
        linesearch_failures=int_zero,
        consecutive_failures=int_zero,
        nonfinite_events=int_zero,
        aux=None,
    )


def update(options: CGOptions, updates, state, params=None, *, value_fn=None, **extra_args):
    """One CG iteration: the ``update`` of :func:`nonlinear_cg` with ``options``."""
    del extra_args
    require_update_args("nonlinear_cg", updates, params, value_fn)
    dtype = state.value.dtype
    state = _aux.prepare_aux(state, value_fn, params)
    value_grad_aux = _aux.value_grad_and_aux(value_fn, params)
    recheck = common.must_recheck(state, options.grad_tol)
    value, grad, aux, cached, evals = common.value_here(state, value_grad_aux, params, recheck)
    scales = common.preconditioner_scales(state, options.preconditioner, params)
    # Per element, and a norm that does not overflow for finite gradients.
    grad_finite, grad_norm = finite_and_norm(grad)
    finite_here = jnp.isfinite(value) & grad_finite
    converged = grad_norm.astype(dtype) <= jnp.asarray(options.grad_tol, dtype)

    def step_branch(_):
        here = (value, grad, aux, cached, evals)
        return search_step(options, state, params, value_grad_aux, here, scales)

    def hold_branch(_):
        return optax.tree.zeros_like(params), hold_state(
            state, finite_here, value, grad, aux, evals, cached
        )

    def stalled_branch(_):
        return optax.tree.zeros_like(params), stalled_state(state, evals)

    # Two failures in a row from this point, and the objective is as it was.
    stalled = (state.consecutive_failures >= 2) & common.unchanged(value, state.value)
    delta, new_state = lax.cond(
        finite_here & ~converged,
        lambda _: lax.cond(stalled, stalled_branch, step_branch, None),
        hold_branch,
        None,
    )
    # A NaN never reaches the parameters.
    return common.zero_if_nonfinite(delta), new_state


def search_step(options: CGOptions, state, params, value_grad_aux, here, scales):
    """Stages 2-5 of an iteration from a finite point ``here = (value, grad,
    aux, cached, evals)``: the line search along the current direction and the
    next direction. Returns ``(update, new state)``."""
    value, grad, aux, cached, evals = here
    dtype = state.value.dtype
    # The stored direction belongs to the cached point; anything else
    # (first call, after a failure, an external re-evaluation) restarts.
    fresh_start = state.restart_next | ~cached
    direction, slope0 = start_direction(state, grad, scales, fresh_start)
    trial = first_trial_step(
        options.initial_step, state, params, value, direction, slope0, fresh_start
    )
    evaluate = common.line_function(value_grad_aux, params, direction, dtype)
    result = options.search.search(evaluate, value, (grad, aux), slope0, trial.astype(dtype))
    since = jnp.where(fresh_start, 0, state.since_restart)
    new_direction, new_slope, restart = next_direction(
        options, result.grad[0], grad, direction, scales, since
    )
    delta = common.scaled_update(jnp.where(result.failed, 0, result.step), direction, params)
    new_state = after_search(
        state, result, (value, grad, aux, evals), (new_direction, new_slope, restart), slope0, since
    )
    return delta, new_state


def start_direction(state: NonlinearCGState, grad, scales, fresh_start):
    """The direction to search along and its slope ``<g, d>``: steepest descent
    ``-P g`` (times the state's power-of-two scale, see :func:`next_direction`)
    on a fresh start, else the direction the last iteration stored."""
    dtype = state.value.dtype
    scale = pow2_scale(max_abs(grad)).astype(dtype)
    steepest = optax.tree.scale(-scale, common.apply_scales(scales, grad))
    direction = select(fresh_start, steepest, state.direction)
    slope0 = jnp.where(fresh_start, vdot(grad, steepest), state.slope).astype(dtype)
    return direction, slope0


def first_trial_step(rule: str, state, params, value, direction, slope0, fresh_start) -> jax.Array:
    """The line search's first trial step, finite and positive.

    On a fresh start (first iteration, restarts after failures) Hager & Zhang's
    (2006) ``0.01 ||x||_inf / ||d||_inf``, or ``0.01 |f| / |<g, d>|`` at
    ``x = 0``. Otherwise the guess of ``rule`` (in :data:`INITIAL_STEPS`,
    :func:`~twophase.second_phase.common.warm_step`) when the last iteration took
    a positive step and the guess is finite and positive, else the fresh one;
    1 as the last resort.
    """
    x_inf, d_inf = max_abs(params), max_abs(direction)
    fresh = jnp.where(
        x_inf > 0,
        0.01 * common.safe_divide(x_inf, d_inf),
        jnp.where(value != 0, 0.01 * common.safe_divide(jnp.abs(value), -slope0), 1.0),
    )
    warm = common.warm_step(rule, value, state.value_prev, slope0, state.step, state.slope_prev)
    usable = (state.step > 0) & ~fresh_start & jnp.isfinite(warm) & (warm > 0)
    trial = jnp.where(usable, warm, fresh)
    return jnp.where(jnp.isfinite(trial) & (trial > 0), trial, 1.0)


def next_direction(options: CGOptions, grad, grad_prev, direction_prev, scales, since_restart):
    """Direction ``d_{k+1}``, its slope and whether it is a restart.

    ``direction_prev`` is stored scaled by ``pow2_scale(max_abs(grad_prev))``
    and the result by ``pow2_scale(max_abs(grad))`` (powers of two, 1 for
    gradients of ordinary size): the inner products of a gradient with the
    stored direction then stay finite for any finite gradient. The beta rule
    sees all its trees scaled by one common power of two, which leaves every
    scale-invariant rule's value unchanged.
    """
    leaves = jax.tree.leaves(grad)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    big_new, big_old = max_abs(grad), max_abs(grad_prev)
    scale_new, scale_old = pow2_scale(big_new), pow2_scale(big_old)
    common_scale = pow2_scale(jnp.maximum(big_new, big_old))
    grad_c = common.scale_tree(common_scale, grad)
    grad_prev_c = common.scale_tree(common_scale, grad_prev)
    direction_prev_c = common.scale_tree(common_scale / scale_old, direction_prev)
    z = common.apply_scales(scales, grad_c)
    z_prev = common.apply_scales(scales, grad_prev_c)
    gz = vdot(grad_c, z)
    beta_k = options.beta_fn(grad_c, grad_prev_c, direction_prev_c, z, z_prev).astype(gz.dtype)
    candidate = jax.tree.map(lambda z_, d: (-z_ + beta_k * d).astype(z_.dtype), z, direction_prev_c)
    slope_candidate = vdot(grad_c, candidate)
    restart = ~jnp.isfinite(beta_k)
    # Not a (numerically) descent direction.
    restart |= ~(slope_candidate < -jnp.finfo(dtype).eps * gz)
    if options.restart_threshold is not None:  # Powell (1977)
        restart |= jnp.abs(vdot(z, grad_prev_c)) >= options.restart_threshold * gz
    if options.restart_every is not None:
        restart |= since_restart + 1 >= options.restart_every
    direction = select(restart, optax.tree.scale(-1.0, z), candidate)
    slope = jnp.where(restart, -gz, slope_candidate)
    # Back from the common scale to the new point's own.
    to_new = (scale_new / common_scale).astype(gz.dtype)
    slope = slope * to_new / common_scale.astype(gz.dtype)
    return common.scale_tree(to_new, direction), slope, restart


def after_search(state: NonlinearCGState, result, here, new, slope0, since) -> NonlinearCGState:
    """The state after a line search: at the accepted point, or where it was
    (``result.failed``, the next call restarts). ``here = (value, grad, aux,
    evals)`` before the search; ``new = (direction, slope, restart)`` from
    :func:`next_direction`."""
    value, grad, aux, evals = here
    new_direction, new_slope, restart = new
    result_grad, result_aux = result.grad
    failed = result.failed
    dtype = state.value.dtype
    return NonlinearCGState(
        value=jnp.where(failed, value, result.value),
        grad=select(failed, grad, result_grad),
        direction=new_direction,
        slope=new_slope.astype(dtype),
        value_prev=value,
        slope_prev=slope0,
        step=jnp.where(failed, 0, result.step).astype(dtype),
        preconditioner=state.preconditioner,
        restart_next=failed,
        since_restart=jnp.where(restart, 0, since + 1),
        cg_iterations=state.cg_iterations + 1,
        value_and_grad_evals=evals + result.evaluations,
        restarts=state.restarts + (restart | failed).astype(jnp.int32),
        linesearch_failures=state.linesearch_failures + failed.astype(jnp.int32),
        consecutive_failures=jnp.where(failed, state.consecutive_failures + 1, 0),
        nonfinite_events=state.nonfinite_events,
        aux=select(failed, aux, result_aux),
    )


def hold_state(state, finite_here, value, grad, aux, evals, cached) -> NonlinearCGState:
    """The state after an iteration that does not move (converged, or nothing
    finite to work with); a non-finite or re-evaluated point restarts next."""
    return common.held(state, finite_here, value, grad, aux, evals)._replace(
        restart_next=state.restart_next | ~finite_here | ~cached,
    )


def stalled_state(state: NonlinearCGState, evals: jax.Array) -> NonlinearCGState:
    """The state after a call that would repeat a search known to fail (two
    failures in a row from this point, and a fresh evaluation that equals the
    cached one): counted as a failed iteration, no search; ``evals`` is the
    evaluation count including that evaluation."""
    return state._replace(
        value_and_grad_evals=evals,
        cg_iterations=state.cg_iterations + 1,
        restarts=state.restarts + 1,
        linesearch_failures=state.linesearch_failures + 1,
        consecutive_failures=state.consecutive_failures + 1,
    )
