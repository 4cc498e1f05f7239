"""Hessian-free (truncated) Newton-CG as an optax transformation.

Each outer iteration solves the damped Newton system ``(H + lambda I) p = -g``
approximately by linear conjugate gradient on Hessian-vector products (never
forming ``H``), then searches along ``p`` with a Wolfe line search, and adapts
the damping ``lambda`` from how well the quadratic model predicted the decrease.

Stages of one ``update`` call (module-level functions, each testable alone):

1. *evaluate*: the value and gradient at the current point, cached from the
   previous call's line search (:func:`twophase.second_phase.common.value_here`);
2. *forcing term* ``eta``: the inner solve stops at ``||r|| <= eta ||g||``
   (:func:`forcing_term`);
3. *inner solve* (:func:`inner_solve_stage`, :func:`truncated_cg`):
   preconditioned linear CG on ``H + lambda I`` (with the Nystrom sketch,
   :func:`nystrom_stage`), stopped by the forcing rule, the iteration cap,
   negative curvature (Steihaug-style) or a non-finite product;
4. *line search* along ``p`` from the Newton step ``1`` (or the shorter step
   that the last decrease suggests, as scipy's Newton-CG) (:func:`search_stage`);
5. *damping* (:func:`adapt_damping`): Levenberg-Marquardt's rule on the ratio
   ``rho`` of actual to predicted decrease (:func:`after_newton_step`).

**Calling convention and contract:** as :func:`twophase.nonlinear_cg`. Call
``update(updates, state, params, value_fn=f)`` with ``f(params)`` the full
objective (a scalar); ``updates`` are ignored. The value and gradient at
the accepted point are cached in the state and reused by the next call,
which therefore assumes the parameters were advanced by exactly the
returned update and the objective did not change (else re-``init``).

**Inner solve.** Forcing (``forcing``, :func:`forcing_term`): stop at
``||r|| <= eta ||g||`` (Nocedal & Wright 2006, (7.3); Eisenstat & Walker
1996), or after ``max_inner_iterations`` products. Negative curvature
(``<d, (H + lambda I) d> <= 0``, Steihaug-style): stop and use the last
iterate, or scaled steepest descent at the first inner iteration; counted
in ``negative_curvature``.

**Damping** (Levenberg-Marquardt): ``rho`` = actual decrease / decrease
predicted by the undamped model ``m(a p) = f + a <g, p> + a^2/2 <p, H p>`` at
the accepted step ``a``; ``rho > 0.75`` divides ``lambda`` by 3, ``rho <
0.25`` doubles it, a failed or rejected step multiplies it by 4, within
``[min_damping, max_damping]``; after negative curvature, ``lambda`` is at
least the magnitude of the curvature found.

**Rejected steps:** a non-finite curvature product, step or slope, a direction
that is not a descent direction, or a ``state.damping`` that is not
positive and finite: the update is zero, ``rejected_steps`` and
``consecutive_failures`` count it (``nonfinite_events`` too when
something was not finite), nothing is evaluated; a bad damping is reset
to ``damping``. A non-finite value or gradient at the current point gives a
zero update as well (``nonfinite_events``). A failed line search leaves the
parameters where they are and raises the damping, so that the next call
tries a different (shorter, more gradient-like) step.

**Cost** per outer iteration: the inner solve's products
(``hessian_vector_products``, each about :data:`HVP_COST` evaluations of
wall time) plus the line search's evaluations (usually 1: the Newton step
is accepted).

**Memory:** one parameter-sized buffer in the state (two with a stored
diagonal preconditioner), four more transiently in the inner solve; see
:class:`NewtonCGState`. The Nystrom preconditioner adds ``sketch_size``
parameter-sized columns to the state, and its sketch holds three
``(n, sketch_size)`` matrices transiently (the test matrix, the products,
the SVD's factor).

**Scale.** The inner solve runs on the gradient multiplied by a power of two
that brings its largest entry near 1 (exact, and the solve is linear in ``g``),
so that ``<d, H d>``, which grows like the objective's scale cubed, stays inside
float32's range for objectives scaled by ``2**40`` or ``1e-12``.

References:
  * Nocedal & Wright, *Numerical Optimization* (2006): chapter 7.1 (line-search
    Newton-CG, Algorithm 7.1, termination test (7.3) with the superlinear forcing
    ``min(0.5, sqrt(||g||))``); chapter 5.1 (preconditioned
    CG, Algorithm 5.3); chapter 10.3 (Levenberg-Marquardt); Steihaug (1983).
  * Eisenstat & Walker, "Choosing the forcing terms in an inexact Newton method",
    SIAM J. Sci. Comput. 17 (1996): "choice 2" with its safeguard.
  * Martens, "Deep learning via Hessian-free optimization", ICML 2010: damping
    adapted from the reduction ratio (constants 2/3 and 3/2 there), Gauss-Newton
    products for least squares (Schraudolph 2002).
  * Pearlmutter (1994): Hessian-vector products by forward-over-reverse
    differentiation, ``jax.jvp`` of ``jax.grad``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree
from jax import lax
from jax.flatten_util import ravel_pytree

from twophase import auxiliary as _aux
from twophase._checks import (
    as_non_negative_int,
    as_open_unit,
    as_positive_finite,
    as_positive_int,
    concrete,
    require_update_args,
)
from twophase._numerics import finite_and_norm
from twophase.second_phase import common
from twophase.second_phase import linesearch as _ls
from twophase.second_phase import nystrom as _nys
from twophase.second_phase.common import select, vdot
from twophase.second_phase.contract import HVP_COST

__all__ = [
    "CURVATURES",
    "FORCING_RULES",
    "HVP_COST",
    "INITIAL_STEPS",
    "PRECONDITIONERS",
    "GaussNewtonObjective",
    "InnerSolve",
    "NewtonCGState",
    "NewtonOptions",
    "adapt_damping",
    "after_newton_step",
    "curvature_product",
    "forcing_term",
    "gauss_newton_objective",
    "hessian_product",
    "init_state",
    "inner_cg_step",
    "inner_solve_stage",
    "newton_cg",
    "nystrom_stage",
    "rejected_state",
    "search_stage",
    "truncated_cg",
    "update",
]

PyTree = Any


CURVATURES = ("hessian", "gauss_newton")

FORCING_RULES = ("sqrt", "eisenstat_walker")

PRECONDITIONERS = ("state", "nystrom")

INITIAL_STEPS = ("unit", "quadratic")
"""The ``initial_step`` rules :func:`newton_cg` accepts."""

# Levenberg-Marquardt adaptation (Nocedal & Wright 2006, Algorithm 4.1's
# thresholds; Martens 2010 uses factors 2/3 and 3/2).
_RHO_GOOD = 0.75
_RHO_POOR = 0.25
_DAMPING_DECREASE = 1.0 / 3.0
_DAMPING_INCREASE = 2.0
_DAMPING_FAILURE = 4.0  # after a rejected step or a failed line search

# Eisenstat & Walker (1996), choice 2: eta_k = gamma (||g_k|| / ||g_{k-1}||)^alpha.
_EW_GAMMA = 0.9
_EW_ALPHA = 2.0


class NewtonCGState(NamedTuple):
    """State of :func:`newton_cg`.

    Parameter-sized buffers: one, ``grad`` (plus ``preconditioner`` when a
    diagonal preconditioner is stored: two; plus ``sketch_size`` columns of the
    Nystrom sketch with ``preconditioner="nystrom"``). The inner solve holds four more
    while an ``update`` runs (the step ``p``, the residual ``r``, the direction
    ``d`` and the product ``(H + lambda I) d``; XLA fuses the preconditioned
    residual ``z = P r`` into its uses), plus what the objective's
    Hessian-vector product needs, and the line search its own (trial point and
    gradients); none of them is kept between calls. Buffers are in the arithmetic dtype, float32
    for parameters of lower precision (bfloat16, float16), the parameters'
    dtype otherwise (:func:`twophase.second_phase.common.compute_dtype`).

    The fields ``value``, ``grad``, ``value_and_grad_evals``,
    ``hessian_vector_products``, ``consecutive_failures``,
    ``nonfinite_events``, ``linesearch_failures``, ``iterations``, ``damping``
    and ``preconditioner`` follow the second-phase contract that the two-phase
    switch reads by name.

    Attributes:
      value: objective at the current parameters, scalar; ``+inf`` until the
        first evaluation (and after a non-finite one). Read by
        ``optax.value_and_grad_from_state``.
      grad: gradient at the current parameters (pytree like the parameters).
      preconditioner: diagonal preconditioner ``P`` (positive, pytree like the
        parameters) when stored in the state, else ``None``.
      damping: current Levenberg-Marquardt ``lambda`` (scalar, positive).
      eta: forcing term of the last inner solve (scalar in ``(0, 1)``).
      grad_norm_prev: ``||g||_2`` at the start of the last outer iteration, for
        the Eisenstat-Walker rule (``+inf`` before the first).
      value_prev: objective at the previous iterate (``+inf`` before the first
        step), for the ``"quadratic"`` first trial step.
      step: last accepted line-search step (``1`` is the full Newton step;
        ``0`` after a failure).
      ratio: last reduction ratio ``rho`` (actual / predicted decrease; ``0``
        after a failure).
      iterations: int32 outer iterations attempted (inner solve plus line
        search, successful or not).
      value_and_grad_evals: int32 cumulative full-batch evaluations of the
        objective with its gradient, the line searches' included.
      hessian_vector_products: int32 cumulative curvature-vector products
        (Hessian or Gauss-Newton).
      negative_curvature: int32 inner solves stopped by non-positive curvature.
      linesearch_failures: int32 line searches that found no decrease.
      rejected_steps: int32 outer iterations whose step was rejected before the
        line search (a non-finite product or step, a non-descent direction, a
        damping that is not positive and finite).
      consecutive_failures: int32 current run of outer iterations that made no
        progress (failed line searches, rejected steps, non-finite current
        points); 0 after a successful step. While it is positive the update was
        zero.
      nonfinite_events: int32 calls where the objective or gradient at the
        current point, or a curvature product, was not finite (no step was
        taken).
      aux: as :class:`twophase.NonlinearCGState`'s ``aux`` (the auxiliary
        output at the current parameters, or ``None``).
      sketch: the :class:`twophase.second_phase.nystrom.NystromSketch` of
        ``preconditioner="nystrom"`` (``sketch_size`` parameter-sized columns),
        else ``None``.
    """

    value: jax.Array
    grad: PyTree
    preconditioner: PyTree
    damping: jax.Array
    eta: jax.Array
    grad_norm_prev: jax.Array
    value_prev: jax.Array
    step: jax.Array
    ratio: jax.Array
    iterations: jax.Array
    value_and_grad_evals: jax.Array
    hessian_vector_products: jax.Array
    negative_curvature: jax.Array
    linesearch_failures: jax.Array
    rejected_steps: jax.Array
    consecutive_failures: jax.Array
    nonfinite_events: jax.Array
    aux: PyTree = None
    sketch: _nys.NystromSketch | None = None


# --------------------------------------------------------------------------- Gauss-Newton


@dataclasses.dataclass(frozen=True)
class GaussNewtonObjective:
    """A least-squares objective that also knows its residuals.

    Calling it returns the scalar objective, so it is an ordinary ``value_fn``
    for every twophase optimizer (and for Adam's loss); ``newton_cg(
    curvature="gauss_newton")`` additionally reads ``residual_fn`` to multiply
    by the Gauss-Newton matrix ``G = w J^T J`` instead of the Hessian.
    Build it with :func:`gauss_newton_objective`.

    Attributes:
      residual_fn: ``params -> residuals``, an array or pytree of arrays.
      reduction: ``"mean"``: ``value = mean(r**2)`` over all residual entries
        (``w = 2 / m`` with ``m`` entries); ``"half_sum"``:
        ``value = 0.5 * sum(r**2)`` (``w = 1``).
    """

    residual_fn: Callable[[PyTree], PyTree]
    reduction: str = "mean"

    def __call__(self, params: PyTree) -> jax.Array:
        leaves = jax.tree.leaves(self.residual_fn(params))
        dtype = common.compute_dtype(jnp.result_type(*leaves)) if leaves else jnp.float32
        total = sum((jnp.sum(jnp.square(r.astype(dtype))) for r in leaves), jnp.zeros([], dtype))
        return total * self.weight(params) / 2

    def weight(self, params: PyTree) -> float:
        """``w`` in ``G = w J^T J`` (the objective is ``w/2 * sum(r**2)``)."""
        if self.reduction == "half_sum":
            return 1.0
        shapes = jax.tree.leaves(jax.eval_shape(self.residual_fn, params))
        return 2.0 / max(sum(math.prod(s.shape) for s in shapes), 1)

    def product(self, params: PyTree) -> Callable[[PyTree], PyTree]:
        """``v -> G v = w J^T (J v)`` at ``params``: one ``jax.jvp`` and one
        ``jax.vjp`` of ``residual_fn`` per product (the reverse pass is
        linearised once per call of ``product``)."""
        weight = self.weight(params)
        _, pullback = jax.vjp(self.residual_fn, params)

        def gauss_newton_vector_product(v):
            _, jv = jax.jvp(self.residual_fn, (params,), (v,))
            (jtjv,) = pullback(jv)
            return optax.tree.scale(weight, jtjv)

        return gauss_newton_vector_product


def gauss_newton_objective(
    residual_fn: Callable[[PyTree], PyTree], *, reduction: str = "mean"
) -> GaussNewtonObjective:
    """A least-squares ``value_fn`` whose curvature :func:`newton_cg` can take
    as the Gauss-Newton matrix.

    ``value_fn = gauss_newton_objective(lambda p: model(p, x) - y)`` is
    ``mean((model(p, x) - y)**2)``; pass it as ``value_fn`` to
    ``newton_cg(curvature="gauss_newton")`` (or to any optimizer, where it is
    just that scalar). The Gauss-Newton matrix ``w J^T J`` is positive
    semi-definite, so with positive damping the inner solve never meets
    negative curvature, and it equals the Hessian at a zero-residual minimiser.

    Args:
      residual_fn: ``params -> residuals`` (an array or a pytree of arrays).
      reduction: ``"mean"`` (mean of squares, the usual MSE) or ``"half_sum"``
        (``0.5 * sum`` of squares, the textbook least-squares form).

    Raises:
      TypeError: ``residual_fn`` is not callable.
      ValueError: an unknown ``reduction``.
    """
    if not callable(residual_fn):
        raise TypeError(f"`residual_fn` must be callable, got {residual_fn!r}.")
    if reduction not in ("mean", "half_sum"):
        raise ValueError(f"`reduction` must be 'mean' or 'half_sum', got {reduction!r}.")
    return GaussNewtonObjective(residual_fn, reduction)


def hessian_product(value_fn: Callable[[PyTree], jax.Array], params: PyTree):
    """``v -> H v`` at ``params`` by forward-over-reverse differentiation
    (``jax.jvp`` of ``jax.grad``; Pearlmutter 1994)."""
    grad_fn = jax.grad(_aux.scalar_objective(value_fn))

    def hessian_vector_product(v):
        return jax.jvp(grad_fn, (params,), (v,))[1]

    return hessian_vector_product


# --------------------------------------------------------------------------- stages


def forcing_term(rule, eta_max, grad_norm, grad_norm_prev, eta_prev):
    """Relative tolerance ``eta`` of the inner solve, ``||r|| <= eta ||g||``.

    * ``"sqrt"``: ``min(eta_max, sqrt(||g||))``, Nocedal & Wright (2006) (7.3),
      superlinear convergence (as scipy's Newton-CG, which uses 1-norms);
    * ``"eisenstat_walker"``: Eisenstat & Walker (1996) choice 2,
      ``0.9 (||g_k|| / ||g_{k-1}||)^2``, safeguarded by ``0.9 eta_{k-1}^2`` when
      that exceeds 0.1, capped at ``eta_max`` (``eta_max`` on the first call);
    * a number in ``(0, 1)``: that constant (linear convergence).

    All arguments but ``rule`` are scalars; returns a scalar of ``grad_norm``'s dtype.
    """
    dtype = jnp.result_type(grad_norm)
    if rule == "sqrt":
        eta = jnp.sqrt(grad_norm)
    elif rule == "eisenstat_walker":
        ratio = grad_norm / grad_norm_prev
        eta = _EW_GAMMA * ratio**_EW_ALPHA
        safeguard = _EW_GAMMA * eta_prev**_EW_ALPHA
        eta = jnp.where(safeguard > 0.1, jnp.maximum(eta, safeguard), eta)
        eta = jnp.where(jnp.isfinite(grad_norm_prev) & (grad_norm_prev > 0), eta, eta_max)
    else:
        eta = jnp.asarray(rule, dtype)
    eta = jnp.minimum(jnp.asarray(eta_max, dtype), eta)
    # Never exactly 0 (an exact solve to rounding) nor NaN.
    tiny = jnp.finfo(dtype).eps
    return jnp.where(jnp.isfinite(eta), jnp.maximum(eta, tiny), eta_max).astype(dtype)


class InnerSolve(NamedTuple):
    """Outcome of :func:`truncated_cg`.

    Attributes:
      step: the approximate solution ``p`` of ``(H + lambda I) p = -g`` (pytree).
      curvature: ``<p, (H + lambda I) p>`` (scalar, from the CG recurrences).
      products: int32 curvature-vector products made.
      negative_curvature: bool, stopped by ``<d, (H + lambda I) d> <= 0``; ``p``
        is then the last iterate, or the scaled steepest-descent direction
        ``-(<g, Pg> / |<d, A d>|) P g`` when it happened at the first iteration.
      nonfinite: bool, a product was not finite; ``p`` is the last finite iterate.
      residual_norm: ``||(H + lambda I) p + g||_2`` as recurred.
      rayleigh: ``<d, H d> / ||d||^2`` (undamped) of the direction that stopped
        the loop for non-positive curvature (meaningful only then).
    """

    step: PyTree
    curvature: jax.Array
    products: jax.Array
    negative_curvature: jax.Array
    nonfinite: jax.Array
    residual_norm: jax.Array
    rayleigh: jax.Array


class InnerLoop(NamedTuple):
    """The carry of :func:`truncated_cg`'s loop (see :func:`inner_cg_step`)."""

    step: PyTree  # p_j
    residual: PyTree  # r_j = A p_j + g
    direction: PyTree  # d_j
    rz: jax.Array  # <r_j, P r_j>
    curvature: jax.Array  # <p_j, A p_j>
    residual_norm: jax.Array
    iteration: jax.Array
    done: jax.Array
    negative_curvature: jax.Array
    nonfinite: jax.Array
    rayleigh: jax.Array


def truncated_cg(product, grad, damping, tolerance, max_iterations, apply_scales=None):
    """Preconditioned CG on ``A p = -g``, ``A = H + damping I``, from ``p = 0``.

    Nocedal & Wright (2006) Algorithm 5.3 with ``M^{-1} = diag(P)`` and the
    truncation of their Algorithm 7.1: stop when ``||r||_2 <= tolerance``, after
    ``max_iterations`` products, or at a direction of non-positive curvature
    ``<d, A d> <= 0`` (keep the last iterate; at the first iteration, the
    steepest-descent direction scaled by ``<g, Pg> / |<d, A d>|`` as scipy's
    Newton-CG). A non-finite product stops the loop and sets ``nonfinite``.
    One ``lax.while_loop``, one product per iteration (:func:`inner_cg_step`).

    The loop runs on ``c g`` with ``c`` a power of two that brings ``max|g|``
    near 1 (:func:`~twophase.second_phase.common.unit_pow2`): exact, the solve
    is linear in ``g``, and ``<d, A d>`` stays in range at any objective scale.

    Args:
      product: ``v -> H v`` (pytree to pytree).
      grad: the gradient ``g`` (pytree, arithmetic dtype).
      damping: ``lambda``, scalar.
      tolerance: absolute residual tolerance, scalar.
      max_iterations: Python int >= 1.
      apply_scales: ``tree -> P * tree`` or ``None`` (no preconditioning).

    Returns:
      An :class:`InnerSolve`.
    """
    precondition = (lambda t: t) if apply_scales is None else apply_scales
    dtype = jnp.result_type(damping)
    unit = common.unit_pow2(grad).astype(dtype)
    grad = common.scale_tree(unit, grad)
    tolerance = tolerance * unit
    z0 = precondition(grad)
    rz0 = vdot(grad, z0).astype(dtype)
    norm0 = jnp.sqrt(vdot(grad, grad)).astype(dtype)
    init = InnerLoop(
        step=optax.tree.zeros_like(grad),
        residual=grad,
        direction=common.scale_tree(-1.0, z0),
        rz=rz0,
        curvature=jnp.zeros([], dtype),
        residual_norm=norm0,
        iteration=jnp.zeros([], jnp.int32),
        done=(norm0 <= tolerance) | ~jnp.isfinite(rz0),
        negative_curvature=jnp.asarray(False),
        nonfinite=~jnp.isfinite(rz0),
        rayleigh=jnp.zeros([], dtype),
    )

    def body(s):
        return inner_cg_step(s, product, damping, precondition, tolerance, max_iterations)

    final = lax.while_loop(lambda s: ~s.done, body, init)
    return InnerSolve(
        step=common.scale_tree(1 / unit, final.step),
        curvature=final.curvature / (unit * unit),
        products=final.iteration,
        negative_curvature=final.negative_curvature,
        nonfinite=final.nonfinite,
        residual_norm=final.residual_norm / unit,
        rayleigh=final.rayleigh - damping,
    )


def inner_cg_step(s: InnerLoop, product, damping, precondition, tolerance, max_iterations):
    """One iteration of :func:`truncated_cg`'s loop: a product ``A d``, the CG
    update of step, residual and direction, and the stopping tests."""
    dtype = jnp.result_type(damping)
    tiny = jnp.finfo(dtype).tiny
    ad = jax.tree.map(
        lambda h, d_: (h + damping * d_).astype(d_.dtype), product(s.direction), s.direction
    )
    dad = vdot(s.direction, ad).astype(dtype)
    nonfinite = ~jnp.isfinite(dad)
    nonpositive = ~nonfinite & ~(dad > 0)
    alpha = s.rz / jnp.where(dad > 0, dad, 1)
    step = common.add_scaled(s.step, alpha, s.direction)
    residual = common.add_scaled(s.residual, alpha, ad)
    rz = vdot(residual, precondition(residual)).astype(dtype)
    beta = rz / jnp.where(s.rz > 0, s.rz, 1)
    direction = jax.tree.map(
        lambda z_, d: (beta * d - z_).astype(d.dtype), precondition(residual), s.direction
    )
    residual_norm = jnp.sqrt(vdot(residual, residual)).astype(dtype)
    curvature = s.curvature + alpha * s.rz  # alpha^2 <d, A d>, A-conjugacy
    stop = nonfinite | nonpositive
    # Negative curvature at the very first direction: scaled steepest descent.
    fallback = nonpositive & (s.iteration == 0)
    scale = jnp.where(jnp.abs(dad) > tiny, s.rz / jnp.abs(dad), 1)
    stopped_step = select(fallback, common.scale_tree(scale, s.direction), s.step)
    stopped_curvature = jnp.where(fallback, scale * scale * dad, s.curvature)
    iteration = s.iteration + 1
    return InnerLoop(
        step=select(stop, stopped_step, step),
        residual=select(stop, s.residual, residual),
        direction=select(stop, s.direction, direction),
        rz=jnp.where(stop, s.rz, rz),
        curvature=jnp.where(stop, stopped_curvature, curvature),
        residual_norm=jnp.where(stop, s.residual_norm, residual_norm),
        iteration=iteration,
        done=stop | (residual_norm <= tolerance) | (iteration >= max_iterations),
        negative_curvature=nonpositive,
        nonfinite=nonfinite,
        rayleigh=dad / jnp.maximum(vdot(s.direction, s.direction), tiny).astype(dtype),
    )


def adapt_damping(
    damping, ratio, predicted, moved, min_damping, max_damping, negative_curvature=0.0
):
    """Levenberg-Marquardt update of ``lambda`` from ``rho = actual / predicted``.

    ``rho > 0.75``: ``lambda / 3``; ``rho < 0.25`` (or a model predicting no
    decrease): ``2 lambda``; no step taken: ``4 lambda``; otherwise unchanged.
    After an inner solve stopped by negative curvature, at least
    ``negative_curvature`` (the magnitude ``-<d, H d> / ||d||^2`` of the curvature
    found), so that the next damped system is positive along that direction.
    (Measured on the Rosenbrock functions of ``tests/test_newton_cg.py``: this
    cut the 2-D cost by a third; scipy's Newton-CG, undamped, falls back to
    steepest descent there.) Clipped to ``[min_damping, max_damping]``. All
    arguments are scalars.
    """
    trusted = predicted > 0
    factor = jnp.where(
        ~moved,
        _DAMPING_FAILURE,
        jnp.where(
            trusted & (ratio > _RHO_GOOD),
            _DAMPING_DECREASE,
            jnp.where(trusted & (ratio >= _RHO_POOR), 1.0, _DAMPING_INCREASE),
        ),
    )
    new = jnp.maximum(damping * factor, jnp.nan_to_num(negative_curvature))
    return jnp.clip(new, min_damping, max_damping).astype(jnp.result_type(damping))


# --------------------------------------------------------------------------- transformation


class NewtonOptions(NamedTuple):
    """The checked options of one :func:`newton_cg` (names as its arguments).

    Attributes:
      search: the :class:`~twophase.second_phase.linesearch.LineSearch`.
      curvature: one of :data:`CURVATURES`.
      forcing: a name in :data:`FORCING_RULES` or a float in ``(0, 1)``.
      eta_max, damping, min_damping, max_damping, grad_tol: floats.
      max_inner_iterations, sketch_size, sketch_refresh, seed: ints.
      preconditioner: as the argument (``"nystrom"`` sets ``nystrom``).
      nystrom: whether the Nystrom sketch preconditions the inner solve.
      initial_step: one of :data:`INITIAL_STEPS`.
    """

    search: _ls.LineSearch
    curvature: str
    forcing: str | float
    eta_max: float
    max_inner_iterations: int
    damping: float
    min_damping: float
    max_damping: float
    preconditioner: Any
    nystrom: bool
    grad_tol: float
    initial_step: str
    sketch_size: int
    sketch_refresh: int
    seed: int


def newton_cg(
    linesearch: str | _ls.LineSearch = "wolfe",
    *,
    curvature: str = "hessian",
    forcing: str | float = "sqrt",
    eta_max: float = 0.5,
    max_inner_iterations: int = 100,
    damping: float = 1e-3,
    min_damping: float = 1e-10,
    max_damping: float = 1e10,
    preconditioner: PyTree | Callable[[PyTree, NewtonCGState], PyTree] | str | None = None,
    grad_tol: float = 0.0,
    initial_step: str = "quadratic",
    sketch_size: int = 60,
    sketch_refresh: int = 20,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Full-batch Hessian-free Newton-CG with damping and a line search.

    Each ``update`` call is one outer iteration (see the module docstring): an
    inexact solve of ``(H + lambda I) p = -g`` by (preconditioned) linear CG on
    Hessian-vector products (:func:`truncated_cg`), a line search along ``p``
    from the Newton step ``1``, an update of ``lambda`` (:func:`adapt_damping`),
    and the returned update ``step * p`` to add with :func:`optax.apply_updates`.
    Call ``update(updates, state, params, value_fn=f)``, as for
    :func:`twophase.nonlinear_cg`.

    Args:
      linesearch: ``"wolfe"`` (:func:`twophase.wolfe_linesearch` with ``c2=0.9``,
        the quasi-Newton value), ``"golden"``, or a :class:`twophase.LineSearch`.
      curvature: ``"hessian"`` (forward-over-reverse Hessian-vector products,
        ``jax.jvp`` of ``jax.grad``) or ``"gauss_newton"`` (``value_fn`` must be
        a :func:`gauss_newton_objective`; products ``w J^T J v``).
      forcing: ``"sqrt"``, ``"eisenstat_walker"`` or a constant in ``(0, 1)``
        (see :func:`forcing_term`).
      eta_max: largest forcing term, in ``(0, 1)``.
      max_inner_iterations: cap on products per inner solve, an int ``>= 1``.
      damping: initial ``lambda > 0``. It is an absolute shift of the Hessian's
        eigenvalues, so its right size depends on the objective's scale; the
        adaptation corrects it within a few iterations (a factor 3 down per
        good step). The default 1e-3 is a compromise over the benchmark
        problems (`benchmarks/RESULTS.md <../benchmarks/RESULTS.md>`_).
      min_damping: lower bound of ``lambda``, ``0 < min_damping <= damping``.
      max_damping: upper bound, ``>= damping``.
      preconditioner: ``None``; a pytree of positive scales ``P`` (an
        approximate inverse Hessian diagonal) stored in the state; ``"state"``
        to store ones, to be replaced with :func:`twophase.set_preconditioner`
        (the handover of Adam's second moments, as for ``nonlinear_cg``); a
        callable ``(params, state) -> P`` evaluated every iteration; or
        ``"nystrom"``: the randomized Nystrom preconditioner of the curvature
        (:mod:`twophase.second_phase.nystrom`; Frangella, Tropp & Udell 2023, as in Rathore
        et al.'s NNCG, ICML 2024), a rank-``sketch_size`` sketch taken with
        ``sketch_size`` curvature products (batched with ``jax.vmap``, counted in
        ``hessian_vector_products``) at the first iteration and every
        ``sketch_refresh`` iterations, kept in the state's ``sketch`` field
        (``sketch_size`` parameter-sized columns) and applied with the current
        damping.
      grad_tol: while ``||g||_2 <= grad_tol`` the update is zero and nothing
        is computed beyond the (cached) gradient.
      initial_step: first trial step of the line search. ``"unit"``: the
        Newton step ``1``; ``"quadratic"`` (default, as scipy's Newton-CG):
        ``min(1, 1.01 * 2 (f_{k-1} - f_k) / -<g_k, p_k>)``, which saves
        line-search evaluations on long Newton steps across a curved valley and
        still tries ``1`` near a minimiser, where the ratio tends to 2.
      sketch_size: rank of the Nystrom sketch (``preconditioner="nystrom"``
        only), an int ``>= 1``; capped at the number of parameters.
      sketch_refresh: outer iterations between sketches, an int ``>= 1``.
      seed: seed of the sketches' Gaussian test matrices (the ``k``-th sketch
        uses ``jax.random.fold_in(jax.random.key(seed), k)``), an int ``>= 0``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: an unknown ``linesearch``, ``curvature``, ``forcing`` rule or
        ``preconditioner`` string; ``forcing`` or ``eta_max`` outside
        ``(0, 1)``; ``max_inner_iterations``, ``sketch_size`` or
        ``sketch_refresh`` not an int ``>= 1``; a negative ``seed``; a ``damping``,
        ``min_damping`` or ``max_damping`` that is not positive and finite or
        out of order; a negative ``grad_tol``; an unknown ``initial_step`` (at
        construction).
      TypeError: ``update`` called without ``value_fn``, or with one that is not
        a :func:`gauss_newton_objective` under ``curvature="gauss_newton"``.
    """
    options = _check_options(
        linesearch=linesearch, curvature=curvature, forcing=forcing, eta_max=eta_max,
        max_inner_iterations=max_inner_iterations, damping=damping,
        min_damping=min_damping, max_damping=max_damping, preconditioner=preconditioner,
        grad_tol=grad_tol, initial_step=initial_step, sketch_size=sketch_size,
        sketch_refresh=sketch_refresh, seed=seed,
    )  # fmt: skip
    return common.second_phase_transformation(
        functools.partial(init_state, options), functools.partial(update, options)
    )


def _check_options(**kw) -> NewtonOptions:
    """:class:`NewtonOptions` from :func:`newton_cg`'s arguments, or the
    ValueError its docstring lists."""
    if kw["curvature"] not in CURVATURES:
        raise ValueError(f"`curvature` must be one of {list(CURVATURES)}, got {kw['curvature']!r}.")
    forcing = kw["forcing"]
    if isinstance(forcing, str) and forcing not in FORCING_RULES:
        raise ValueError(
            f"`forcing` must be one of {list(FORCING_RULES)} or a number in (0, 1), "
            f"got {forcing!r}."
        )
    inner_cap = concrete(kw["max_inner_iterations"])
    if not isinstance(inner_cap, int) or isinstance(inner_cap, bool) or inner_cap < 1:
        raise ValueError(
            f"`max_inner_iterations` must be an int >= 1, got {kw['max_inner_iterations']!r}."
        )
    lams = [
        as_positive_finite(name, kw[name]) for name in ("damping", "min_damping", "max_damping")
    ]
    if not lams[1] <= lams[0] <= lams[2]:
        raise ValueError(
            "`damping` must lie in [`min_damping`, `max_damping`], got "
            f"damping={kw['damping']!r}, min_damping={kw['min_damping']!r}, "
            f"max_damping={kw['max_damping']!r}."
        )
    tol = concrete(kw["grad_tol"])
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ValueError(f"`grad_tol` must be a finite number >= 0, got {kw['grad_tol']!r}.")
    preconditioner = kw["preconditioner"]
    if isinstance(preconditioner, str) and preconditioner not in PRECONDITIONERS:
        raise ValueError(
            "`preconditioner` must be None, 'state', 'nystrom', a pytree or a callable, "
            f"got {preconditioner!r}."
        )
    common.check_initial_step(kw["initial_step"], INITIAL_STEPS)
    return NewtonOptions(
        # Newton steps want the loose curvature condition of quasi-Newton methods
        # (Nocedal & Wright 2006, section 3.1: c2 = 0.9).
        search=common.resolve_linesearch(kw["linesearch"], c2=0.9),
        curvature=kw["curvature"],
        forcing=forcing if isinstance(forcing, str) else as_open_unit("forcing", forcing),
        eta_max=as_open_unit("eta_max", kw["eta_max"]),
        max_inner_iterations=inner_cap,
        damping=lams[0],
        min_damping=lams[1],
        max_damping=lams[2],
        preconditioner=preconditioner,
        nystrom=isinstance(preconditioner, str) and preconditioner == "nystrom",
        grad_tol=kw["grad_tol"],
        initial_step=kw["initial_step"],
        sketch_size=as_positive_int("sketch_size", kw["sketch_size"]),
        sketch_refresh=as_positive_int("sketch_refresh", kw["sketch_refresh"]),
        seed=as_non_negative_int("seed", kw["seed"]),
    )


def init_state(options: NewtonOptions, params: PyTree) -> NewtonCGState:
    """A fresh :class:`NewtonCGState` for ``params`` (with an empty, due
    Nystrom sketch under ``preconditioner="nystrom"``)."""
    dtype = common.scalar_dtype(params)
    sketch = None
    if options.nystrom:
        flat = jax.eval_shape(lambda p: ravel_pytree(common.to_compute(p))[0], params)
        rank = max(min(options.sketch_size, flat.shape[0]), 1)
        sketch = _nys.empty_sketch(flat.shape[0], rank, flat.dtype, age=options.sketch_refresh)
    int_zero = jnp.zeros([], jnp.int32)
    return NewtonCGState(
        value=jnp.asarray(jnp.inf, dtype),
        grad=common.to_compute(optax.tree.zeros_like(params)),
        preconditioner=(
            None
            if options.nystrom
            else common.initial_preconditioner(options.preconditioner, params)
        ),
        damping=jnp.asarray(options.damping, dtype),
        eta=jnp.asarray(options.eta_max, dtype),
        grad_norm_prev=jnp.asarray(jnp.inf, dtype),
        value_prev=jnp.asarray(jnp.inf, dtype),
        step=jnp.zeros([], dtype),
        ratio=jnp.zeros([], dtype),
        iterations=int_zero,
        value_and_grad_evals=int_zero,
        hessian_vector_products=int_zero,
        negative_curvature=int_zero,
        linesearch_failures=int_zero,
        rejected_steps=int_zero,
        consecutive_failures=int_zero,
        nonfinite_events=int_zero,
        aux=None,
        sketch=sketch,
    )


def update(options: NewtonOptions, updates, state, params=None, *, value_fn=None, **extra_args):
    """One outer iteration: the ``update`` of :func:`newton_cg` with ``options``."""
    del extra_args
    require_update_args("newton_cg", updates, params, value_fn)
    if options.curvature == "gauss_newton" and not isinstance(value_fn, GaussNewtonObjective):
        raise TypeError(
            "newton_cg(curvature='gauss_newton') requires `value_fn` built by "
            f"twophase.gauss_newton_objective(residual_fn), got {value_fn!r}."
        )
    dtype = state.value.dtype
    state = _aux.prepare_aux(state, value_fn, params)
    value_grad_aux = _aux.value_grad_and_aux(value_fn, params)
    recheck = common.must_recheck(state, options.grad_tol)
    value, grad, aux, _, evals = common.value_here(state, value_grad_aux, params, recheck)
    grad_finite, grad_norm = finite_and_norm(grad)
    grad_norm = grad_norm.astype(dtype)
    finite_here = jnp.isfinite(value) & grad_finite & jnp.isfinite(grad_norm)
    converged = grad_norm <= jnp.asarray(options.grad_tol, dtype)
    damping_ok = jnp.isfinite(state.damping) & (state.damping > 0)
    here = (value, grad, aux, evals, grad_norm)

    def newton_branch(_):
        inner, sketch_products, sketch, eta = inner_solve_stage(
            options, state, params, value_fn, grad, grad_norm
        )
        result, slope, usable = search_stage(options, state, params, value_grad_aux, here, inner)
        step = jnp.where(usable & ~result.failed, result.step, 0).astype(dtype)
        new_state = after_newton_step(
            options, state, here, (inner, sketch, sketch_products, eta), (result, slope, usable)
        )
        return common.scaled_update(step, inner.step, params), new_state

    def hold_branch(_):
        # Converged, or nothing finite to work with: do not move.
        new_state = common.held(state, finite_here, value, grad, aux, evals)
        return optax.tree.zeros_like(params), new_state

    def reject_branch(_):
        return optax.tree.zeros_like(params), rejected_state(options, state, here)

    branch = jnp.where(finite_here & ~converged, jnp.where(damping_ok, 2, 1), 0)
    delta, new_state = lax.switch(branch, (hold_branch, reject_branch, newton_branch), None)
    # A NaN never reaches the parameters.
    return common.zero_if_nonfinite(delta), new_state


def curvature_product(curvature: str, value_fn, params):
    """``v -> H v`` (``curvature="hessian"``) or ``G v`` (``"gauss_newton"``) at
    ``params``, in the arithmetic dtype, ``v`` cast to the parameters' dtypes on
    the way in."""
    raw = value_fn.product(params) if curvature == "gauss_newton" else None
    raw = hessian_product(value_fn, params) if raw is None else raw

    def product(v):
        v = jax.tree.map(lambda t, p: t.astype(jnp.result_type(p)), v, params)
        return common.to_compute(raw(v))

    return product


def nystrom_stage(options: NewtonOptions, state: NewtonCGState, product, grad, lam):
    """Stage 3a (``preconditioner="nystrom"``): refresh the sketch when due;
    returns the sketch, its products this call and ``tree -> P^{-1} tree``."""
    sketch = state.sketch
    flat_grad, unravel = ravel_pytree(grad)
    size, rank = sketch.basis.shape

    def flat_product(v):
        return ravel_pytree(product(unravel(v)))[0].astype(flat_grad.dtype)

    def take(_):
        key = jax.random.fold_in(jax.random.key(options.seed), sketch.sketches)
        basis, eigenvalues = _nys.nystrom_sketch(flat_product, key, size, rank, flat_grad.dtype)
        fresh = _nys.NystromSketch(
            basis, eigenvalues, jnp.zeros([], jnp.int32), sketch.sketches + 1
        )
        return fresh, jnp.asarray(rank, jnp.int32)

    def keep(_):
        return sketch, jnp.zeros([], jnp.int32)

    sketch, products = lax.cond(sketch.age >= options.sketch_refresh, take, keep, None)
    inverse = _nys.nystrom_inverse(sketch.basis, sketch.eigenvalues, lam.astype(flat_grad.dtype))
    return sketch, products, lambda tree: unravel(inverse(ravel_pytree(tree)[0]))


def inner_solve_stage(options: NewtonOptions, state, params, value_fn, grad, grad_norm):
    """Stages 2-3: the forcing term and the inner solve (with the Nystrom sketch
    when configured). Returns ``(InnerSolve, sketch products, sketch, eta)``."""
    lam = state.damping
    eta = forcing_term(options.forcing, options.eta_max, grad_norm, state.grad_norm_prev, state.eta)
    product = curvature_product(options.curvature, value_fn, params)
    sketch, sketch_products = state.sketch, jnp.zeros([], jnp.int32)
    scales = common.preconditioner_scales(state, options.preconditioner, params)
    inverse = None if scales is None else functools.partial(common.apply_scales, scales)
    if options.nystrom:
        sketch, sketch_products, inverse = nystrom_stage(options, state, product, grad, lam)
    inner = truncated_cg(product, grad, lam, eta * grad_norm, options.max_inner_iterations, inverse)
    return inner, sketch_products, sketch, eta


def search_stage(options: NewtonOptions, state, params, value_grad_aux, here, inner):
    """Stage 4: the line search along the inner solve's step from the Newton
    step 1 (or the ``"quadratic"`` guess, at most 1), skipped (a failed
    result, nothing evaluated) when the step is not a finite descent direction.
    Returns ``(LineSearchResult, slope <g, p>, usable)``."""
    value, grad, aux, _, _ = here
    dtype = state.value.dtype
    direction = inner.step
    slope = vdot(grad, direction).astype(dtype)
    usable = _finite_step(inner, state.damping, slope) & (slope < 0)
    one = jnp.ones([], dtype)
    guess = common.warm_step(options.initial_step, value, state.value_prev, slope, one, -one)
    trial = jnp.where(jnp.isfinite(guess) & (guess > 0), jnp.minimum(one, guess), one)
    evaluate = common.line_function(value_grad_aux, params, direction, dtype)

    def search_branch(_):
        return options.search.search(evaluate, value, (grad, aux), slope, trial.astype(dtype))

    def skip_branch(_):
        return _ls.LineSearchResult(
            step=jnp.zeros([], dtype),
            value=value,
            grad=(grad, aux),
            slope=jnp.where(jnp.isfinite(slope), slope, 0).astype(dtype),
            evaluations=jnp.zeros([], jnp.int32),
            failed=jnp.asarray(True),
            converged=jnp.asarray(False),
        )

    return lax.cond(usable, search_branch, skip_branch, None), slope, usable


def _model_curvature(inner: InnerSolve, damping) -> jax.Array:
    """``<p, H p>`` of the undamped model, from the solve's ``<p, (H + lambda I) p>``."""
    dtype = jnp.result_type(damping)
    return inner.curvature - damping * vdot(inner.step, inner.step).astype(dtype)


def _finite_step(inner: InnerSolve, damping, slope) -> jax.Array:
    """Whether the inner solve's products, the slope and the model are finite."""
    model = _model_curvature(inner, damping)
    return ~inner.nonfinite & jnp.isfinite(slope) & jnp.isfinite(model)


def after_newton_step(options: NewtonOptions, state, here, solved, searched) -> NewtonCGState:
    """Stage 5: the state after an outer iteration, with the damping adapted from
    the reduction ratio. ``here = (value, grad, aux, evals, grad_norm)`` before it,
    ``solved = (inner, sketch, sketch products, eta)``, ``searched = (result,
    slope, usable)``."""
    value, grad, aux, evals, grad_norm = here
    inner, sketch, sketch_products, eta = solved
    result, slope, usable = searched
    dtype = state.value.dtype
    moved = usable & ~result.failed
    step = jnp.where(moved, result.step, 0).astype(dtype)
    predicted = -(step * slope + 0.5 * step * step * _model_curvature(inner, state.damping))
    ratio = jnp.where(moved & (predicted > 0), (value - result.value) / predicted, 0).astype(dtype)
    new_damping = adapt_damping(
        state.damping, ratio, predicted, moved, options.min_damping, options.max_damping,
        negative_curvature=jnp.where(inner.negative_curvature, -inner.rayleigh, 0),
    )  # fmt: skip
    result_grad, result_aux = result.grad
    return state._replace(
        value=jnp.where(moved, result.value, value).astype(dtype),
        grad=select(moved, result_grad, grad),
        aux=select(moved, result_aux, aux),
        value_prev=jnp.where(moved, value, state.value_prev).astype(dtype),
        damping=new_damping,
        eta=eta,
        grad_norm_prev=grad_norm,
        step=step,
        ratio=ratio,
        iterations=state.iterations + 1,
        value_and_grad_evals=evals + result.evaluations,
        hessian_vector_products=state.hessian_vector_products + inner.products + sketch_products,
        sketch=None if sketch is None else sketch._replace(age=sketch.age + 1),
        negative_curvature=state.negative_curvature + inner.negative_curvature.astype(jnp.int32),
        linesearch_failures=state.linesearch_failures + (usable & result.failed).astype(jnp.int32),
        rejected_steps=state.rejected_steps + (~usable).astype(jnp.int32),
        consecutive_failures=jnp.where(moved, 0, state.consecutive_failures + 1),
        nonfinite_events=state.nonfinite_events
        + (~_finite_step(inner, state.damping, slope)).astype(jnp.int32),
    )


def rejected_state(options: NewtonOptions, state: NewtonCGState, here) -> NewtonCGState:
    """The state when ``state.damping`` is not positive and finite (set from
    outside): the step is rejected and counted, and the damping restarts from
    its initial value. ``here = (value, grad, aux, evals, grad_norm)``."""
    value, grad, aux, evals, _ = here
    return state._replace(
        value=value,
        grad=grad,
        aux=aux,
        damping=jnp.asarray(options.damping, state.value.dtype),
        value_and_grad_evals=evals,
        iterations=state.iterations + 1,
        rejected_steps=state.rejected_steps + 1,
        consecutive_failures=state.consecutive_failures + 1,
        nonfinite_events=state.nonfinite_events + (~jnp.isfinite(state.damping)).astype(jnp.int32),
    )
