"""One-dimensional line searches for nonlinear conjugate gradient.

A line search minimises ``phi(step) = f(x + step * d)`` approximately along a
descent direction ``d``. Both searches here are written as a single
``jax.lax.while_loop`` whose body makes exactly one evaluation of the objective
*with its gradient*, so they run inside ``jit`` with no host callbacks, and the
value and gradient at the accepted point are returned for reuse by the next
conjugate-gradient iteration.

* :func:`wolfe_linesearch`: bracketing plus safeguarded cubic interpolation
  ("zoom"), Nocedal & Wright, *Numerical Optimization* (2006), Algorithms 3.5
  and 3.6, accepting a point that satisfies the strong Wolfe conditions with a
  curvature constant fit for CG (default ``c2=0.2``) or Hager & Zhang's
  (2005) approximate Wolfe conditions.
* :func:`golden_section_linesearch`: the derivative-free bracketing and golden
  section search of Press et al., *Numerical Recipes* (1992) section 10.1, as
  used by the paper this package implements (Hrycej et al., KDIR 2025).

Both are described by a :class:`LineSearch` record and share one calling
convention, :class:`LineSearchFn`.

**The Wolfe search.** Bracketing phase: while the trial point has an acceptable
value and a negative slope, the step grows by safeguarded cubic extrapolation
(at most ``max_growth`` times the last step). The bracket ``[lo, hi]`` keeps at ``lo``
the furthest point with an acceptable value and a negative slope, and at
``hi`` the nearest point with a non-negative slope or an unacceptable value
(Hager & Zhang 2005's update rule, which decides by slopes first and so keeps
working when values differ only by rounding). The next trial is the minimiser
of the cubic interpolating both ends (the secant on slopes when their values
are equal to rounding), kept at least 10% of the bracket's width from ``hi``
and 0.1% from ``lo`` (Nocedal & Wright 2006, Algorithms 3.5-3.6; More &
Thuente 1994 for the safeguards). On a quadratic the second trial is exact.

With ``approximate_wolfe`` a trial is also accepted when the curvature condition
holds and ``f(step) <= f(0) + value_tolerance * eps * |f(0)|`` (``eps`` the
dtype's machine epsilon): Hager & Zhang's (2005) approximate Wolfe
conditions, from the observation that near a minimiser the
sufficient-decrease test drowns in rounding error while the slope test does
not. Hager & Zhang allow ``1e-6 |f(0)|``; the default here allows 1000 ulps
(``2.2e-13 |f(0)|`` in float64, ``1.2e-4 |f(0)|`` in float32), the rounding
noise of a loss summed over many terms, so the objective never increases by
more than that.

CG needs a more exact search than quasi-Newton methods (Nocedal & Wright
recommend ``c2 = 0.1`` for CG, 0.9 for quasi-Newton); the default ``c2 = 0.2``
needed the fewest evaluations on the benchmark suite. On ill-conditioned
quadratics a smaller ``c2`` keeps more conjugacy.

Non-finite values at a trial point count as "too far": the step shrinks.
When the budget runs out or the bracket collapses to rounding width, the
bracket's low end is returned (``converged=False``) if it strictly
decreased the objective, or if it passed the value test and satisfies the
curvature condition with ``c2 = 0.1``: with a small ``c2`` near a
minimiser, rounding noise in the slopes can exceed ``c2 |f'(0)|`` and this
is then the best point on offer. Otherwise ``failed=True`` and ``step=0``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from twophase._checks import as_positive_finite, check_max_evaluations

__all__ = [
    "LineSearch",
    "LineSearchFn",
    "LineSearchResult",
    "golden_section_linesearch",
    "wolfe_linesearch",
]

PyTree = Any
# evaluate(step) -> (value, grad, slope) with slope = <grad, direction>.
EvaluateFn = Callable[[jax.Array], tuple[jax.Array, PyTree, jax.Array]]

_GOLDEN = 0.5 * (3.0 - math.sqrt(5.0))  # 0.381966..., the golden section fraction
_GROW = 0.5 * (1.0 + math.sqrt(5.0))  # 1.618..., the golden expansion factor


class LineSearchResult(NamedTuple):
    """Outcome of one line search.

    Attributes:
      step: accepted step size, a scalar of the search's floating dtype;
        ``0`` when the search failed to find any decrease.
      value: objective at the accepted point (``value0`` when ``step == 0``).
      grad: gradient at the accepted point, a pytree shaped like the
        parameters (``grad0`` when ``step == 0``).
      slope: directional derivative ``<grad, direction>`` at the accepted point.
      evaluations: number of objective-with-gradient evaluations made (int32).
      failed: bool scalar, ``True`` when no point with a lower objective was
        found; the caller must then not move.
      converged: bool scalar, ``True`` when the accepted point satisfies the
        search's own acceptance test (Wolfe conditions, or the golden section
        tolerance); ``False`` when the evaluation budget ran out first (the best
        decreasing point found is then returned).
    """

    step: jax.Array
    value: jax.Array
    grad: PyTree
    slope: jax.Array
    evaluations: jax.Array
    failed: jax.Array
    converged: jax.Array


class LineSearchFn(Protocol):
    """Calling convention shared by the line searches."""

    def __call__(
        self,
        evaluate: EvaluateFn,
        value0: jax.Array,
        grad0: PyTree,
        slope0: jax.Array,
        initial_step: jax.Array,
    ) -> LineSearchResult:
        """Searches along a descent direction.

        Args:
          evaluate: ``step -> (value, grad, slope)`` at ``x + step * d``; each call
            is one evaluation of the objective with its gradient.
          value0: objective at ``step = 0`` (scalar).
          grad0: gradient at ``step = 0`` (pytree).
          slope0: ``<grad0, d>``, negative for a descent direction (scalar).
          initial_step: first trial step, positive scalar.

        Returns:
          A :class:`LineSearchResult`.
        """


class LineSearch(NamedTuple):
    """A named line search: ``search`` follows :class:`LineSearchFn`."""

    name: str
    search: LineSearchFn


def cubic_minimizer(a, fa, sa, b, fb, sb):
    """Minimiser of the cubic interpolating value and slope at ``a`` and ``b``.

    Nocedal & Wright (2006), equation (3.59). Returns NaN when the cubic has no
    local minimiser (the caller then falls back to bisection or extrapolation).
    All arguments are scalars of one floating dtype.
    """
    d1 = sa + sb - 3.0 * (fa - fb) / (a - b)
    radicand = d1 * d1 - sa * sb
    d2 = jnp.sign(b - a) * jnp.sqrt(radicand)  # NaN when radicand < 0
    return b - (b - a) * (sb + d2 - d1) / (sb - sa + 2.0 * d2)


def _interpolate(a, fa, sa, b, fb, sb, slack):
    """Cubic minimiser from values and slopes at ``a``, ``b``; where the values
    differ by no more than rounding (``slack``) or the cubic has no minimiser,
    the secant step on the slopes, which stays accurate near a minimiser (Hager &
    Zhang 2005). May be NaN; callers safeguard."""
    cubic = cubic_minimizer(a, fa, sa, b, fb, sb)
    secant = a - sa * (b - a) / (sb - sa)
    use_cubic = jnp.isfinite(cubic) & (jnp.abs(fb - fa) > slack)
    return jnp.where(use_cubic, cubic, secant)


class _WolfeLoop(NamedTuple):
    trial: jax.Array  # next step to evaluate
    lo: jax.Array  # best step so far satisfying sufficient decrease (0 at start)
    value_lo: jax.Array
    slope_lo: jax.Array
    grad_lo: PyTree
    hi: jax.Array  # other end of the bracket (meaningful when bracketed)
    value_hi: jax.Array
    slope_hi: jax.Array
    bracketed: jax.Array
    done: jax.Array  # accepted, or the bracket collapsed
    accepted: jax.Array  # a point satisfying the acceptance test was found
    evaluations: jax.Array


def wolfe_linesearch(
    *,
    c1: float = 1e-4,
    c2: float = 0.2,
    approximate_wolfe: bool = True,
    value_tolerance: float = 1e3,
    max_evaluations: int = 30,
    max_growth: float = 10.0,
) -> LineSearch:
    """Strong Wolfe line search fit for nonlinear conjugate gradient.

    A trial step is accepted when the strong Wolfe conditions hold::

        f(step) <= f(0) + c1 * step * f'(0)      (sufficient decrease)
        |f'(step)| <= c2 * |f'(0)|               (curvature)

    With ``approximate_wolfe``, Hager & Zhang's (2005) approximate Wolfe
    points are accepted too; how the bracket moves, and what a search that
    runs out of budget returns: see the module docstring.

    Args:
      c1: sufficient-decrease constant, ``0 < c1 < c2``.
      c2: curvature constant, ``c1 < c2 < 1``.
      approximate_wolfe: also accept Hager-Zhang approximate Wolfe points.
      value_tolerance: rounding slack of the approximate Wolfe value test, in
        units of the dtype's machine epsilon relative to ``|f(0)|``.
      max_evaluations: evaluations of the objective with its gradient per search.
      max_growth: largest factor by which the bracketing phase grows the step.

    Returns:
      A :class:`LineSearch` named ``"wolfe"``.

    Raises:
      ValueError: ``c1`` or ``c2`` not positive finite numbers with
        ``c1 < c2 < 1``; ``max_evaluations`` not an int ``>= 1``;
        ``value_tolerance`` not a positive finite number; ``max_growth`` not a
        finite number ``> 1``. The message names the argument.
    """
    as_positive_finite("c1", c1)
    as_positive_finite("c2", c2)
    if not c1 < c2 < 1.0:
        raise ValueError(f"`c1` and `c2` must satisfy 0 < c1 < c2 < 1, got c1={c1}, c2={c2}.")
    check_max_evaluations(max_evaluations)
    as_positive_finite("value_tolerance", value_tolerance)
    as_positive_finite("max_growth", max_growth)
    if max_growth <= 1.0:
        raise ValueError(f"`max_growth` must be > 1, got {max_growth}.")

    options = _WolfeOptions(c1, c2, approximate_wolfe, value_tolerance, max_evaluations, max_growth)
    return LineSearch("wolfe", functools.partial(_wolfe_search, options))


class _WolfeOptions(NamedTuple):
    c1: float
    c2: float
    approximate_wolfe: bool
    value_tolerance: float
    max_evaluations: int
    max_growth: float


def _wolfe_search(options: _WolfeOptions, evaluate, value0, grad0, slope0, initial_step):
    """The :class:`LineSearchFn` of :func:`wolfe_linesearch` with ``options``."""
    dtype = jnp.result_type(value0)
    # Rounding slack of the approximate Wolfe test.
    slack = options.value_tolerance * jnp.finfo(dtype).eps * jnp.abs(value0)

    def cond(s: _WolfeLoop):
        return (~s.done) & (s.evaluations < options.max_evaluations)

    def body(s: _WolfeLoop):
        return _wolfe_iteration(options, s, evaluate, value0, slope0, slack)

    init = _wolfe_start(initial_step, value0, grad0, slope0, dtype)
    return _wolfe_result(lax.while_loop(cond, body, init), value0, grad0, slope0)


def _wolfe_iteration(options: _WolfeOptions, s: _WolfeLoop, evaluate, value0, slope0, slack):
    """One trial of the Wolfe search: evaluate, test, update the bracket and
    choose the next trial."""
    dtype = jnp.result_type(value0)
    step = s.trial
    value, grad, slope, finite = _evaluate_trial(evaluate, step, dtype)
    decrease = value <= value0 + options.c1 * step * slope0
    acceptable_value = decrease | (options.approximate_wolfe & (value <= value0 + slack))
    flat = jnp.abs(slope) <= options.c2 * jnp.abs(slope0)
    accept = finite & flat & acceptable_value
    new_lo = finite & acceptable_value & (slope < 0)
    bracket = _update_bracket(s, step, value, grad, slope, new_lo)
    trial, width = _next_wolfe_trial(s, bracket, step, value, slope, slack, options.max_growth)
    # A bracket narrower than rounding cannot produce a new point.
    degenerate = bracket.bracketed & (
        jnp.abs(width) <= 10 * jnp.finfo(dtype).eps * jnp.abs(bracket.lo)
    )
    done = accept | degenerate
    return bracket._replace(
        trial=jnp.where(done, step, trial),
        lo=jnp.where(accept, step, bracket.lo),
        value_lo=jnp.where(accept, value, bracket.value_lo),
        slope_lo=jnp.where(accept, slope, bracket.slope_lo),
        grad_lo=jax.tree.map(lambda g, gl: jnp.where(accept, g, gl), grad, bracket.grad_lo),
        done=done,
        accepted=accept,
        evaluations=s.evaluations + 1,
    )


# Stages of the Wolfe search.


def _evaluate_trial(evaluate, step, dtype):
    """``(value, grad, slope, finite)`` at ``step``: value and slope in the
    search's ``dtype``, ``finite`` whether both are finite."""
    value, grad, slope = evaluate(step)
    value = value.astype(dtype)
    slope = slope.astype(dtype)
    return value, grad, slope, jnp.isfinite(value) & jnp.isfinite(slope)


def _wolfe_start(initial_step, value0, grad0, slope0, dtype) -> _WolfeLoop:
    """The loop state before the first trial: both ends at 0, nothing bracketed."""
    zero = jnp.zeros([], dtype)
    return _WolfeLoop(
        trial=initial_step.astype(dtype),
        lo=zero,
        value_lo=value0,
        slope_lo=slope0.astype(dtype),
        grad_lo=grad0,
        hi=zero,
        value_hi=value0,
        slope_hi=slope0.astype(dtype),
        bracketed=jnp.asarray(False),
        done=jnp.asarray(False),
        accepted=jnp.asarray(False),
        evaluations=jnp.zeros([], jnp.int32),
    )


def _update_bracket(s: _WolfeLoop, step, value, grad, slope, new_lo) -> _WolfeLoop:
    """Hager & Zhang (2005)'s bracket update: ``lo`` always has an acceptable
    value and a negative slope, so a minimiser lies beyond it; a point with a
    non-negative slope, an unacceptable value or a non-finite value becomes
    ``hi``. Slopes decide before values, which keeps the search working when
    values differ only by rounding."""
    new_hi = ~new_lo
    return s._replace(
        hi=jnp.where(new_hi, step, s.hi),
        value_hi=jnp.where(new_hi, value, s.value_hi),
        slope_hi=jnp.where(new_hi, slope, s.slope_hi),
        bracketed=s.bracketed | new_hi,
        lo=jnp.where(new_lo, step, s.lo),
        value_lo=jnp.where(new_lo, value, s.value_lo),
        slope_lo=jnp.where(new_lo, slope, s.slope_lo),
        grad_lo=jax.tree.map(lambda g, gl: jnp.where(new_lo, g, gl), grad, s.grad_lo),
    )


def _next_wolfe_trial(before: _WolfeLoop, bracket: _WolfeLoop, step, value, slope, slack, growth):
    """``(next trial, bracket width)``: safeguarded interpolation inside
    ``(lo, hi)`` when bracketed, else extrapolation beyond ``step`` from the low
    end ``before`` the update (at most ``growth`` times ``step``)."""
    # Only 0.1% of the width is kept free at `lo`: after a large overshoot the
    # minimiser legitimately lies very close to it, and the interpolant, exact on
    # quadratics, says where.
    lo, hi = bracket.lo, bracket.hi
    width = hi - lo
    hi_finite = jnp.isfinite(bracket.value_hi) & jnp.isfinite(bracket.slope_hi)
    interpolated = jnp.where(
        hi_finite,
        jnp.clip(
            _interpolate(
                lo,
                bracket.value_lo,
                bracket.slope_lo,
                hi,
                bracket.value_hi,
                bracket.slope_hi,
                slack,
            ),
            lo + 1e-3 * width,
            hi - 0.1 * width,
        ),
        # Non-finite far end: shrink hard towards the known good point.
        lo + 0.2 * width,
    )
    reach = step - before.lo
    extrap = _interpolate(before.lo, before.value_lo, before.slope_lo, step, value, slope, slack)
    extrapolated = jnp.where(
        jnp.isfinite(extrap),
        jnp.clip(extrap, step + 1.1 * reach, growth * step),
        growth * step,
    )
    return jnp.where(bracket.bracketed, interpolated, extrapolated), width


def _wolfe_result(final: _WolfeLoop, value0, grad0, slope0) -> LineSearchResult:
    """The accepted point; without one, ``lo`` if it strictly decreased the
    objective, or if it passed the same value test as an accepted point and
    flattened the slope tenfold (Wolfe with c2 = 0.1): near a minimiser, where
    rounding noise in the slopes exceeds a small c2 |f'(0)|, this is the best
    point on offer. A wrong gradient flattens nothing and fails (step 0)."""
    dtype = jnp.result_type(value0)
    accepted = final.accepted & (final.lo > 0)
    flattened = jnp.abs(final.slope_lo) <= 0.1 * jnp.abs(slope0)
    moved = accepted | ((final.lo > 0) & ((final.value_lo < value0) | flattened))
    return LineSearchResult(
        step=jnp.where(moved, final.lo, jnp.zeros([], dtype)),
        value=jnp.where(moved, final.value_lo, value0),
        grad=jax.tree.map(lambda g, g0: jnp.where(moved, g, g0), final.grad_lo, grad0),
        slope=jnp.where(moved, final.slope_lo, slope0.astype(dtype)),
        evaluations=final.evaluations,
        failed=~moved,
        converged=accepted,
    )


class _GoldenLoop(NamedTuple):
    trial: jax.Array
    a: jax.Array  # left end of the bracket (starts at 0)
    value_a: jax.Array
    b: jax.Array  # best point so far (valid when has_b)
    value_b: jax.Array
    slope_b: jax.Array
    grad_b: PyTree
    c: jax.Array  # right end of the bracket (valid when has_c)
    value_c: jax.Array
    has_b: jax.Array
    has_c: jax.Array
    done: jax.Array
    evaluations: jax.Array


def golden_section_linesearch(
    *,
    tolerance: float = 1e-3,
    max_evaluations: int = 40,
) -> LineSearch:
    """Bracketing and golden section search (Press et al., Numerical Recipes, 10.1).

    The search the paper uses for its CG phase. First a bracket ``a < b < c`` with
    ``f(b) < f(a)`` and ``f(b) <= f(c)`` is found, starting from ``a = 0`` and the
    initial step: the step grows by the golden ratio while the objective keeps
    falling, and shrinks towards 0 by the golden fraction while it does not
    decrease. Then the larger sub-interval is cut at its golden point until
    ``c - a <= tolerance * b``. Only objective values steer the search (it
    ignores slopes); the gradient computed with each value is kept for the
    accepted point. Non-finite values count as ``+inf``.

    Args:
      tolerance: relative width of the final bracket, ``0 < tolerance < 1``.
      max_evaluations: evaluations of the objective with its gradient per search.

    Returns:
      A :class:`LineSearch` named ``"golden"``.

    Raises:
      ValueError: ``tolerance`` not in ``(0, 1)``, or ``max_evaluations`` not an
        int ``>= 1``. The message names the argument.
    """
    as_positive_finite("tolerance", tolerance)
    if tolerance >= 1.0:
        raise ValueError(f"`tolerance` must be < 1, got {tolerance}.")
    check_max_evaluations(max_evaluations)

    return LineSearch("golden", functools.partial(_golden_search, tolerance, max_evaluations))


def _golden_search(tolerance, max_evaluations, evaluate, value0, grad0, slope0, initial_step):
    """The :class:`LineSearchFn` of :func:`golden_section_linesearch`."""
    dtype = jnp.result_type(value0)

    def cond(s: _GoldenLoop):
        return (~s.done) & (s.evaluations < max_evaluations)

    def body(s: _GoldenLoop):
        return _golden_iteration(tolerance, s, evaluate, dtype)

    init = _golden_start(initial_step, value0, grad0, slope0, dtype)
    final = lax.while_loop(cond, body, init)
    return LineSearchResult(
        step=jnp.where(final.has_b, final.b, jnp.zeros([], dtype)),
        value=final.value_b,
        grad=final.grad_b,
        slope=final.slope_b,
        evaluations=final.evaluations,
        failed=~final.has_b,
        converged=final.done,
    )


def _golden_iteration(tolerance, s: _GoldenLoop, evaluate, dtype):
    """One trial of the golden-section search: evaluate, move the bracket's
    ends and the best point, choose the next trial."""
    x = s.trial
    value, grad, slope, finite = _evaluate_trial(evaluate, x, dtype)
    value = jnp.where(finite, value, jnp.asarray(jnp.inf, dtype))
    better = value < jnp.where(s.has_b, s.value_b, s.value_a)
    s = _golden_ends(s, x, value, better)
    # Best point.
    s = s._replace(
        b=jnp.where(better, x, s.b),
        value_b=jnp.where(better, value, s.value_b),
        slope_b=jnp.where(better, slope, s.slope_b),
        grad_b=jax.tree.map(lambda g, gb: jnp.where(better, g, gb), grad, s.grad_b),
        has_b=s.has_b | better,
    )
    return s._replace(
        trial=_golden_next_trial(s),
        done=s.has_b & s.has_c & ((s.c - s.a) <= tolerance * s.b),
        evaluations=s.evaluations + 1,
    )


# Stages of the golden-section search.


def _golden_start(initial_step, value0, grad0, slope0, dtype) -> _GoldenLoop:
    """The loop state before the first trial: ``a = 0``, no ``b`` nor ``c``."""
    zero = jnp.zeros([], dtype)
    return _GoldenLoop(
        trial=initial_step.astype(dtype),
        a=zero,
        value_a=value0,
        b=zero,
        value_b=value0,
        slope_b=slope0.astype(dtype),
        grad_b=grad0,
        c=zero,
        value_c=jnp.asarray(jnp.inf, dtype),
        has_b=jnp.asarray(False),
        has_c=jnp.asarray(False),
        done=jnp.asarray(False),
        evaluations=jnp.zeros([], jnp.int32),
    )


def _golden_ends(s: _GoldenLoop, x, value, better) -> _GoldenLoop:
    """The bracket's ends ``a`` and ``c`` after a trial at ``x`` (``better``:
    below the best value so far). No point below f(0) yet: ``x`` becomes the
    right end (the step shrinks). A best point but no right end: the search grows
    while it decreases. A full bracket: the golden-section update, where ``x``
    lands relative to ``b`` deciding which end it replaces."""
    sectioning = s.has_b & s.has_c
    right_of_b = x > s.b
    a = jnp.where(
        sectioning,
        jnp.where(better, jnp.where(right_of_b, s.b, s.a), jnp.where(right_of_b, s.a, x)),
        jnp.where(s.has_b & better, s.b, s.a),
    )
    value_a = jnp.where(
        sectioning,
        jnp.where(
            better,
            jnp.where(right_of_b, s.value_b, s.value_a),
            jnp.where(right_of_b, s.value_a, value),
        ),
        jnp.where(s.has_b & better, s.value_b, s.value_a),
    )
    c = jnp.where(
        sectioning,
        jnp.where(better, jnp.where(right_of_b, s.c, s.b), jnp.where(right_of_b, x, s.c)),
        jnp.where(better, s.c, x),
    )
    value_c = jnp.where(
        sectioning,
        jnp.where(
            better,
            jnp.where(right_of_b, s.value_c, s.value_b),
            jnp.where(right_of_b, value, s.value_c),
        ),
        jnp.where(better, s.value_c, value),
    )
    return s._replace(a=a, value_a=value_a, c=c, value_c=value_c, has_c=s.has_c | ~better)


def _golden_next_trial(s: _GoldenLoop):
    """The golden point of the larger sub-interval of a full bracket; else a
    golden growth beyond ``b``, or a golden shrink of ``[a, c]``."""
    a, b, c = s.a, s.b, s.c
    golden_point = jnp.where((c - b) > (b - a), b + _GOLDEN * (c - b), b - _GOLDEN * (b - a))
    return jnp.where(
        s.has_b & s.has_c,
        golden_point,
        jnp.where(s.has_b, b + _GROW * (b - a), a + _GOLDEN * (c - a)),
    )
