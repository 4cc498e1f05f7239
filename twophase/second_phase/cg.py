"""Nonlinear conjugate gradient as an optax transformation.

Direction rules (the "beta" formulas) are small pure functions sharing one
signature, :class:`BetaFn`, written in the inner product of a diagonal
preconditioner ``P`` (``z = P * g`` is the preconditioned gradient, ``P = 1``
without preconditioning). The search direction is ``d_k = -z_k + beta_k d_{k-1}``.

References:
  * Fletcher & Reeves (1964), Polak & Ribiere (1969), Hestenes & Stiefel (1952),
    Dai & Yuan (1999), Hager & Zhang (2005, "CG_DESCENT"); Hager & Zhang (2006),
    "A survey of nonlinear conjugate gradient methods".
  * Powell (1977), restart when successive gradients are far from orthogonal.
  * Nocedal & Wright, *Numerical Optimization* (2006), chapter 5.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
import optax.tree
from jax import lax

from twophase import auxiliary as _aux
from twophase._checks import concrete, require_update_args
from twophase._control import eager_jit, owning_init
from twophase._numerics import finite_and_norm, max_abs, pow2_scale
from twophase.second_phase import linesearch as _ls

__all__ = [
    "BETA_RULES",
    "BetaFn",
    "NonlinearCGState",
    "dai_yuan",
    "fletcher_reeves",
    "hager_zhang",
    "hestenes_stiefel",
    "nonlinear_cg",
    "polak_ribiere",
]

PyTree = Any


class BetaFn(Protocol):
    """Signature of a CG direction rule.

    Args:
      grad: gradient ``g_k`` at the current point (pytree).
      grad_prev: gradient ``g_{k-1}`` at the previous point (pytree).
      direction_prev: previous search direction ``d_{k-1}`` (pytree).
      precond_grad: ``z_k = P * g_k`` (pytree; equals ``grad`` without
        preconditioning).
      precond_grad_prev: ``z_{k-1} = P * g_{k-1}`` (pytree).

    Returns:
      ``beta_k``, a scalar of the trees' floating dtype. A non-finite value makes
      the caller restart with steepest descent.
    """

    def __call__(
        self,
        grad: PyTree,
        grad_prev: PyTree,
        direction_prev: PyTree,
        precond_grad: PyTree,
        precond_grad_prev: PyTree,
    ) -> jax.Array: ...


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    """``optax.tree.vdot``; a float32 zero for trees without leaves."""
    if not jax.tree.leaves(a):
        return jnp.zeros([], jnp.float32)
    return jnp.asarray(optax.tree.vdot(a, b))


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, or 0 (a steepest-descent restart) when the
    denominator is too small to trust in its dtype."""
    dtype = jnp.result_type(numerator, denominator)
    tiny = jnp.finfo(dtype).tiny / jnp.finfo(dtype).eps
    ok = jnp.abs(denominator) > tiny
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1), 0).astype(dtype)


def fletcher_reeves(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Fletcher-Reeves (1964): ``beta = <g_k, z_k> / <g_{k-1}, z_{k-1}>``."""
    del direction_prev
    return _safe_divide(_vdot(grad, precond_grad), _vdot(grad_prev, precond_grad_prev))


def polak_ribiere(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Polak-Ribiere-Polyak with Powell's non-negativity (PR+, Gilbert & Nocedal 1992).

    ``beta = max(0, <z_k, g_k - g_{k-1}> / <g_{k-1}, z_{k-1}>)``.
    """
    del direction_prev
    y = optax.tree.sub(grad, grad_prev)
    beta = _safe_divide(_vdot(precond_grad, y), _vdot(grad_prev, precond_grad_prev))
    return jnp.maximum(beta, 0)


def hestenes_stiefel(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Hestenes-Stiefel (1952): ``beta = <z_k, y> / <d_{k-1}, y>``, ``y = g_k - g_{k-1}``."""
    del precond_grad_prev
    y = optax.tree.sub(grad, grad_prev)
    return _safe_divide(_vdot(precond_grad, y), _vdot(direction_prev, y))


def dai_yuan(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Dai-Yuan (1999): ``beta = <g_k, z_k> / <d_{k-1}, y>``, ``y = g_k - g_{k-1}``."""
    del precond_grad_prev
    y = optax.tree.sub(grad, grad_prev)
    return _safe_divide(_vdot(grad, precond_grad), _vdot(direction_prev, y))


def hager_zhang(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Hager-Zhang CG_DESCENT (2005), preconditioned as in Hager & Zhang (2013).

    With ``y = g_k - g_{k-1}``, ``Py = z_k - z_{k-1}`` and ``dy = <d_{k-1}, y>``::

        beta_N = <y, z_k> / dy - 2 <y, Py> <d_{k-1}, g_k> / dy**2
        beta   = max(beta_N, -1 / (||d_{k-1}|| * min(0.01, ||g_{k-1}||)))

    the lower bound that gives global convergence without restarts.
    """
    y = optax.tree.sub(grad, grad_prev)
    precond_y = optax.tree.sub(precond_grad, precond_grad_prev)
    dy = _vdot(direction_prev, y)
    beta_n = _safe_divide(_vdot(y, precond_grad), dy) - 2 * _safe_divide(
        _vdot(y, precond_y) * _vdot(direction_prev, grad), dy * dy
    )
    # Euclidean norms, as in Hager & Zhang (2005); the bound is a safeguard only.
    g_prev_norm = jnp.sqrt(_vdot(grad_prev, grad_prev))
    d_norm = jnp.sqrt(_vdot(direction_prev, direction_prev))
    eta = _safe_divide(jnp.asarray(-1.0, beta_n.dtype), d_norm * jnp.minimum(0.01, g_prev_norm))
    return jnp.where(eta < 0, jnp.maximum(beta_n, eta), beta_n)


BETA_RULES: dict[str, BetaFn] = {
    "fletcher_reeves": fletcher_reeves,
    "polak_ribiere": polak_ribiere,
    "hestenes_stiefel": hestenes_stiefel,
    "dai_yuan": dai_yuan,
    "hager_zhang": hager_zhang,
}

_LINESEARCHES: dict[str, Callable[[], _ls.LineSearch]] = {
    "wolfe": _ls.wolfe_linesearch,
    "golden": _ls.golden_section_linesearch,
}


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


def compute_dtype(dtype) -> jnp.dtype:
    """Dtype of the CG arithmetic for parameters of ``dtype``: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _scalar_dtype(params) -> jnp.dtype:
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.dtype(jnp.float32)
    return compute_dtype(jnp.result_type(*leaves))


def _to_compute(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, compute_dtype(jnp.result_type(x))), tree)


def _resolve_beta(beta) -> BetaFn:
    if callable(beta):
        return beta
    if isinstance(beta, str) and beta in BETA_RULES:
        return BETA_RULES[beta]
    raise ValueError(f"`beta` must be one of {sorted(BETA_RULES)} or a callable, got {beta!r}.")


def _resolve_linesearch(
    linesearch, choices: dict[str, Callable[[], _ls.LineSearch]] | None = None
) -> _ls.LineSearch:
    """``linesearch`` itself, or the search its name builds from ``choices``
    (CG's by default; a second phase may pass its own defaults)."""
    choices = _LINESEARCHES if choices is None else choices
    if isinstance(linesearch, _ls.LineSearch):
        return linesearch
    if isinstance(linesearch, str) and linesearch in choices:
        return choices[linesearch]()
    raise ValueError(
        f"`linesearch` must be one of {sorted(choices)} or a twophase.LineSearch, "
        f"got {linesearch!r}."
    )


_INITIAL_STEP_RULES = ("slope", "quadratic", "max")


_JAMMING_RULES = ("fletcher_reeves", "dai_yuan")


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

    Each ``update`` call performs one CG iteration: a new direction
    ``d_k = -z_k + beta_k d_{k-1}`` (``z = P g``), a line search along it, and
    the returned update ``step * d_k`` to add with :func:`optax.apply_updates`.

    The transformation evaluates the objective itself: call
    ``update(updates, state, params, value_fn=f)`` where ``f(params)`` returns
    the full (full-batch) objective as a scalar. The incoming ``updates`` are
    ignored (pass the gradient, zeros or ``params``; they only set nothing).

    **Contract (no wasted evaluations).** The value and gradient at the point the
    line search accepted are stored in the state and reused by the next call,
    which therefore assumes that the parameters were advanced by *exactly* the
    returned update (``optax.apply_updates(params, updates)``), and that the
    objective did not change. Chaining a transformation *after* this one that
    alters the update (weight decay, clipping) breaks the contract; place such
    transformations before it or inside ``value_fn``. To change the objective
    or the parameters otherwise, re-``init`` the state. The cached value is
    also readable by ``optax.value_and_grad_from_state``.

    **Restarts** to steepest descent (``d = -z``): on the first iteration, after
    a failed line search, when Powell's (1977) test
    ``|<z_k, g_{k-1}>| >= restart_threshold * <z_k, g_k>`` fires, every
    ``restart_every`` iterations, when ``beta`` is not finite, and whenever the
    new direction is not a descent direction. ``restart_threshold="auto"`` is
    0.2 for Fletcher-Reeves and Dai-Yuan, which jam without restarts (measured:
    stuck at ||g|| ~ 2e2 on the chained Rosenbrock function), and ``None`` for
    the others: PR+ restarts itself through ``max(0, beta)``, and Powell's test
    cost PR+, HS and HZ evaluations on ``benchmarks/cg_suite.py``.

    **Stalls.** A failed line search leaves the parameters where they are and
    makes the next call a steepest-descent restart from the same point. Once
    that restart has failed too (two failures in a row; typically the objective
    has converged to its floating-point resolution), every later call would
    repeat the same search, since ``value_fn`` is assumed deterministic: such a
    call returns a zero update and counts a failed iteration (so
    ``two_phase``'s ``fallback`` still counts it) without evaluating anything.

    **First trial step** of the line search (``initial_step``): on the first
    iteration and after restarts caused by failures, Hager & Zhang's (2006)
    ``0.01 ||x||_inf / ||d||_inf`` (or ``0.01 |f| / ||g||^2`` at ``x = 0``).
    Afterwards ``"slope"`` is Nocedal & Wright's (3.60)
    ``step_{k-1} <g_{k-1}, d_{k-1}> / <g_k, d_k>``, ``"quadratic"`` their
    ``1.01 * 2 (f_k - f_{k-1}) / <g_k, d_k>`` (as scipy's CG) and ``"max"`` the
    larger of the two.

    Memory: two parameter-sized buffers (three with a stored preconditioner),
    against about ``2m + 2`` for L-BFGS with memory ``m``; see
    :class:`NonlinearCGState`.

    Args:
      beta: direction rule, a name in :data:`BETA_RULES` or a :class:`BetaFn`.
        Default ``"polak_ribiere"`` (PR+): with the default line search, the
        only configuration of the sweep over ``benchmarks/cg_suite.py`` that met
        both of its targets against scipy (``benchmarks/RESULTS.md``, section 1).
      linesearch: ``"wolfe"`` (:func:`twophase.wolfe_linesearch` defaults),
        ``"golden"`` (the paper's), or a :class:`twophase.LineSearch`.
      restart_threshold: Powell's restart constant in ``(0, 1]``; ``None``
        disables; ``"auto"`` (see above).
      restart_every: restart every this many iterations (e.g. the number of
        parameters); ``None`` disables.
      preconditioner: ``None``; a pytree of positive scales ``P`` like the
        parameters (an approximate inverse Hessian diagonal), stored in the state;
        ``"state"`` to store ones, meant to be replaced later with
        :func:`twophase.set_preconditioner` (how ``two_phase`` hands over Adam's
        second moments); or a callable ``(params, state) -> P`` evaluated every
        iteration.
      initial_step: ``"slope"`` (default), ``"quadratic"`` or ``"max"`` (see above).
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
    beta_fn = _resolve_beta(beta)
    search = _resolve_linesearch(linesearch)
    if restart_threshold == "auto":
        restart_threshold = 0.2 if beta in _JAMMING_RULES else None
    threshold = concrete(restart_threshold)
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0 < threshold <= 1
    ):
        raise ValueError(
            f"`restart_threshold` must be in (0, 1], None or 'auto', got {restart_threshold!r}."
        )
    every = concrete(restart_every)
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise ValueError(f"`restart_every` must be a positive int or None, got {restart_every!r}.")
    if initial_step not in _INITIAL_STEP_RULES:
        raise ValueError(
            f"`initial_step` must be one of {list(_INITIAL_STEP_RULES)}, got {initial_step!r}."
        )
    tol = concrete(grad_tol)
    if grad_tol is None or (
        tol is not None
        and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf)
    ):
        raise ValueError(f"`grad_tol` must be a finite number >= 0, got {grad_tol!r}.")
    if isinstance(preconditioner, str) and preconditioner != "state":
        raise ValueError(
            "`preconditioner` must be None, 'state', a pytree or a callable, "
            f"got {preconditioner!r}."
        )

    def init_fn(params):
        dtype = _scalar_dtype(params)
        zeros = _to_compute(optax.tree.zeros_like(params))
        stored = initial_preconditioner(preconditioner, params)
        int_zero = jnp.zeros([], jnp.int32)
        return NonlinearCGState(
            value=jnp.asarray(jnp.inf, dtype),
            grad=zeros,
            direction=zeros,
            slope=jnp.zeros([], dtype),
            value_prev=jnp.asarray(jnp.inf, dtype),
            slope_prev=jnp.zeros([], dtype),
            step=jnp.zeros([], dtype),
            preconditioner=stored,
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

    def next_direction(grad, grad_prev, direction_prev, apply_scales, since_restart):
        """Direction ``d_{k+1}``, its slope and whether it is a restart.

        ``direction_prev`` is stored scaled by ``pow2_scale(max_abs(grad_prev))``
        and the result by ``pow2_scale(max_abs(grad))`` (powers of two, 1 for
        gradients of ordinary size): the inner products of a gradient with the
        stored direction then stay finite for any finite gradient. The beta rule
        sees all its trees scaled by one common power of two, which leaves every
        scale-invariant rule's value unchanged.
        """
        dtype = jnp.result_type(*jax.tree.leaves(grad)) if jax.tree.leaves(grad) else jnp.float32
        big_new, big_old = max_abs(grad), max_abs(grad_prev)
        scale_new, scale_old = pow2_scale(big_new), pow2_scale(big_old)
        common = pow2_scale(jnp.maximum(big_new, big_old))

        def scaled(tree, factor):
            return jax.tree.map(lambda x: x * factor.astype(x.dtype), tree)

        grad_c, grad_prev_c = scaled(grad, common), scaled(grad_prev, common)
        direction_prev_c = scaled(direction_prev, common / scale_old)
        z = apply_scales(grad_c)
        z_prev = apply_scales(grad_prev_c)
        gz = _vdot(grad_c, z)
        beta_k = beta_fn(grad_c, grad_prev_c, direction_prev_c, z, z_prev).astype(gz.dtype)
        candidate = jax.tree.map(
            lambda z_, d: (-z_ + beta_k * d).astype(z_.dtype), z, direction_prev_c
        )
        slope_candidate = _vdot(grad_c, candidate)
        restart = ~jnp.isfinite(beta_k)
        # Not a (numerically) descent direction.
        restart |= ~(slope_candidate < -jnp.finfo(dtype).eps * gz)
        if restart_threshold is not None:  # Powell (1977)
            restart |= jnp.abs(_vdot(z, grad_prev_c)) >= restart_threshold * gz
        if restart_every is not None:
            restart |= since_restart + 1 >= restart_every
        direction = _select(restart, optax.tree.scale(-1.0, z), candidate)
        slope = jnp.where(restart, -gz, slope_candidate)
        # Back from the common scale to the new point's own.
        to_new = (scale_new / common).astype(gz.dtype)
        direction = scaled(direction, to_new)
        slope = slope * to_new / common.astype(gz.dtype)
        return direction, slope, restart

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        require_update_args("nonlinear_cg", updates, params, value_fn)
        del updates
        dtype = state.value.dtype
        state = _aux.prepare_aux(state, value_fn, params)
        value_grad_aux = _aux.value_grad_and_aux(value_fn, params)
        value, grad, aux, cached, evals = value_here(state, value_grad_aux, params)
        scales = preconditioner_scales(state, preconditioner, params)

        def apply_scales(tree):
            return tree if scales is None else optax.tree.mul(scales, tree)

        # Per element, and a norm that does not overflow for finite gradients.
        grad_finite, grad_norm = finite_and_norm(grad)
        finite_here = jnp.isfinite(value) & grad_finite
        converged = grad_norm.astype(dtype) <= jnp.asarray(grad_tol, dtype)

        def step_branch(_):
            # The stored direction belongs to the cached point; anything else
            # (first call, after a failure, an external re-evaluation) restarts.
            fresh_start = state.restart_next | ~cached
            # Stored directions are scaled by this power of two (see next_direction).
            scale = pow2_scale(max_abs(grad)).astype(dtype)
            steepest = optax.tree.scale(-scale, apply_scales(grad))
            direction = _select(fresh_start, steepest, state.direction)
            slope0 = jnp.where(fresh_start, _vdot(grad, steepest), state.slope).astype(dtype)

            # First trial step.
            x_inf = _max_abs(params)
            d_inf = _max_abs(direction)
            first_guess = jnp.where(
                x_inf > 0,
                0.01 * _safe_ratio(x_inf, d_inf),
                jnp.where(value != 0, 0.01 * _safe_ratio(jnp.abs(value), -slope0), 1.0),
            )
            by_slope = state.step * _safe_ratio(state.slope_prev, slope0)
            by_quadratic = 1.01 * 2.0 * _safe_ratio(value - state.value_prev, slope0)
            warm = {
                "slope": by_slope,
                "quadratic": by_quadratic,
                "max": jnp.maximum(by_slope, by_quadratic),
            }[initial_step]
            has_history = (state.step > 0) & ~fresh_start
            trial = jnp.where(has_history & jnp.isfinite(warm) & (warm > 0), warm, first_guess)
            trial = jnp.where(jnp.isfinite(trial) & (trial > 0), trial, 1.0).astype(dtype)

            def evaluate(step):
                # The auxiliary output rides with the gradient, which the line
                # search only carries: it comes back for the accepted point.
                delta = _scaled_update(step, direction, params)
                f, g, a = value_grad_aux(optax.apply_updates(params, delta))
                g = _to_compute(g)
                return f.astype(dtype), (g, a), _vdot(g, direction).astype(dtype)

            result = search.search(evaluate, value, (grad, aux), slope0, trial)
            result_grad, result_aux = result.grad
            failed = result.failed
            since = jnp.where(fresh_start, 0, state.since_restart)
            new_direction, new_slope, restart = next_direction(
                result_grad, grad, direction, apply_scales, since
            )
            delta = _scaled_update(jnp.where(failed, 0, result.step), direction, params)
            new_state = NonlinearCGState(
                value=jnp.where(failed, value, result.value),
                grad=_select(failed, grad, result_grad),
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
                aux=_select(failed, aux, result_aux),
            )
            return delta, new_state

        def hold_branch(_):
            # Converged, or nothing finite to work with: do not move.
            delta = optax.tree.zeros_like(params)
            new_state = held(state, finite_here, value, grad, aux, evals)._replace(
                restart_next=state.restart_next | ~finite_here | ~cached,
            )
            return delta, new_state

        def stalled_branch(_):
            # Every failed search makes the next call a steepest-descent restart from the
            # same cached point, so after two failures in a row the last attempt was
            # exactly the search this call would repeat (value_fn is deterministic): it
            # fails again. Count it as failed without evaluating anything.
            delta = optax.tree.zeros_like(params)
            new_state = state._replace(
                cg_iterations=state.cg_iterations + 1,
                restarts=state.restarts + 1,
                linesearch_failures=state.linesearch_failures + 1,
                consecutive_failures=state.consecutive_failures + 1,
            )
            return delta, new_state

        stalled = cached & (state.consecutive_failures >= 2)
        delta, new_state = lax.cond(
            finite_here & ~converged,
            lambda _: lax.cond(stalled, stalled_branch, step_branch, None),
            hold_branch,
            None,
        )
        # A NaN never reaches the parameters.
        delta = _zero_if_nonfinite(delta)
        return delta, new_state

    return optax.GradientTransformationExtraArgs(owning_init(init_fn), eager_jit(update_fn))


def value_here(state, value_grad_aux, params):
    """Stage 1 of a second phase's iteration: ``(value, grad, aux, cached,
    evals)`` at ``params``, from ``state``'s cache (the previous line search's
    accepted point) when its ``value`` is finite, else evaluated (``evals``: the
    state's cumulative count including this evaluation)."""
    dtype = state.value.dtype

    def evaluate(_):
        value, grad, aux = value_grad_aux(params)
        return value.astype(dtype), _to_compute(grad), aux, jnp.ones([], jnp.int32)

    cached = jnp.isfinite(state.value)
    value, grad, aux, new_evals = lax.cond(
        cached,
        lambda _: (state.value, state.grad, state.aux, jnp.zeros([], jnp.int32)),
        evaluate,
        None,
    )
    return value, grad, aux, cached, state.value_and_grad_evals + new_evals


def held(state, finite_here, value, grad, aux, evals):
    """A second phase's state after an iteration that does not move (converged,
    or no finite value or gradient here): keeps a finite evaluation, counts a
    non-finite one as a failure."""
    nonfinite = (~finite_here).astype(jnp.int32)
    return state._replace(
        value=jnp.where(finite_here, value, jnp.inf).astype(state.value.dtype),
        grad=_select(finite_here, grad, state.grad),
        aux=_select(finite_here, aux, state.aux),
        value_and_grad_evals=evals,
        nonfinite_events=state.nonfinite_events + nonfinite,
        consecutive_failures=state.consecutive_failures + nonfinite,
    )


def preconditioner_scales(state, preconditioner, params):
    """The diagonal preconditioner of this iteration: the one stored in
    ``state``, else a callable's ``preconditioner(params, state)``, else ``None``."""
    if state.preconditioner is not None:
        return state.preconditioner
    if callable(preconditioner):
        return _to_compute(preconditioner(params, state))
    return None


def _max_abs(tree):
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree) if jnp.size(x) > 0]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros([])


def _safe_ratio(numerator, denominator):
    return _safe_divide(jnp.asarray(numerator), jnp.asarray(denominator))


def _select(condition, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def _scaled_update(step, direction, params):
    """``step * direction`` cast leafwise to the parameters' dtypes: the exact
    update returned, and the one the line search evaluates."""
    return jax.tree.map(lambda d, p: (step * d).astype(jnp.result_type(p)), direction, params)


def _zero_if_nonfinite(tree):
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return tree
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    return jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), tree)


def _has_preconditioner_field(node: Any) -> bool:
    """A second-phase state by the contract's field name: a NamedTuple with a
    ``preconditioner`` field (:class:`NonlinearCGState`, ``NewtonCGState``)."""
    return isinstance(node, tuple) and "preconditioner" in getattr(node, "_fields", ())


def initial_preconditioner(preconditioner: Any, params: PyTree) -> PyTree | None:
    """The stored diagonal preconditioner a second phase starts with: ``None``
    unless ``preconditioner`` is stored (``"state"``: ones, to be set by a
    handover; a pytree: broadcast to the parameters); in the compute dtype."""
    if preconditioner is None or callable(preconditioner):
        return None
    if isinstance(preconditioner, str):
        return _to_compute(optax.tree.ones_like(params))
    return jax.tree.map(
        lambda p, x: jnp.broadcast_to(jnp.asarray(p, compute_dtype(x.dtype)), x.shape),
        preconditioner,
        params,
    )


def set_preconditioner(state: PyTree, scales: PyTree) -> PyTree:
    """Returns ``state`` with every nested second-phase state's stored
    preconditioner replaced by ``scales`` (positive, shaped like the parameters).

    The states are found by field name: every NamedTuple with a
    ``preconditioner`` field (:class:`NonlinearCGState`, whose next direction is
    also reset to steepest descent, and :class:`twophase.NewtonCGState`).

    Requires ``nonlinear_cg(preconditioner="state")`` / ``newton_cg(preconditioner="state")``
    (or a pytree).

    Args:
      state: an optimizer state holding such second-phase states (any nesting).
      scales: a pytree like the parameters, each leaf broadcastable to the
        stored preconditioner's (cast to its dtype).

    Returns:
      ``state`` with the preconditioners replaced (the same structure and dtypes).

    Raises:
      ValueError: a second-phase state in ``state`` that stores no
        preconditioner (built without ``preconditioner="state"``).
    """

    def replace(node):
        if _has_preconditioner_field(node):
            if node.preconditioner is None:
                raise ValueError(
                    f"`state` holds a {type(node).__name__} without a stored preconditioner; "
                    "build it with preconditioner='state'."
                )
            new = jax.tree.map(
                lambda s, old: jnp.asarray(s, old.dtype), scales, node.preconditioner
            )
            node = node._replace(preconditioner=new)
            if "restart_next" in node._fields:
                node = node._replace(restart_next=jnp.asarray(True))
        return node

    return jax.tree.map(replace, state, is_leaf=_has_preconditioner_field)
