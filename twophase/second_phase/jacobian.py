"""Jacobians of residual-form objectives, built in bounded memory.

A least-squares objective ``f(theta) = 1/2 sum_i r_i(theta)^2`` (after the
weights of :class:`twophase.GaussNewtonObjective`) needs, for a
Levenberg-Marquardt step, the gradient ``J^T r`` and either the Gauss-Newton
matrix ``J^T J`` (``P x P``, ``P`` parameters) or its diagonal. Nothing here
holds the whole ``M x P`` Jacobian: rows (or columns) are produced a chunk at a
time inside a ``lax.scan`` and folded into those reductions, so the scratch
memory is one chunk plus the result.

How the rows are made, chosen by shape at trace time:

* **per point** (a :class:`PointwiseObjective`, built by
  :func:`pointwise_residuals`): each residual point's own function
  ``r(params, point)`` (``k`` entries) differentiated under ``jax.vmap`` over
  the points, by reverse mode (``jax.jacrev``, ``k`` backward passes of one
  point) when ``k <= P``, else by forward mode (``jax.jacfwd``, ``P`` forward
  passes). The work is that of ``k`` (or ``P``) evaluations of the objective's
  gradient, not ``M`` of them: this is the fast path (on this project's CPU, for
  a tanh PINN of 921 parameters and 1000 points, a Levenberg-Marquardt step in
  about 0.1 s against about 7 s with ``jax.jacfwd`` of the whole vector).
* **whole vector** (any other :class:`twophase.GaussNewtonObjective`): when
  ``M <= P``, rows by reverse mode, ``jax.vjp`` pulled back along chunks of
  unit cotangents; else columns by forward mode, ``jax.jvp`` along chunks of
  unit tangents (the Gauss-Newton columns ``J^T (J e_j)`` then by one pullback
  each). Each pass costs a whole evaluation, so this is ``min(M, P)``
  evaluations: correct, but slow for large problems.

Sources: Nocedal & Wright, *Numerical Optimization* (2006), chapter 10
(least squares, the Gauss-Newton matrix); Griewank & Walther, *Evaluating
Derivatives* (2008), chapter 3 (forward and reverse mode costs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from twophase.second_phase.newton_cg import GaussNewtonObjective

__all__ = [
    "REDUCTIONS",
    "Linearization",
    "PointwiseObjective",
    "default_chunk",
    "flat_residual_fn",
    "gauss_newton_product",
    "linearize",
    "pointwise_residuals",
    "residual_count",
]

PyTree = Any

REDUCTIONS = ("term_means", "mean", "half_sum")

_CHUNK_BYTES = 2**27  # 128 MiB of Jacobian rows per chunk by default


# --------------------------------------------------------------------------- objective


@dataclasses.dataclass(frozen=True, eq=False)
class PointwiseObjective(GaussNewtonObjective):
    """A :class:`twophase.GaussNewtonObjective` that also knows each residual
    point's own function, so that its Jacobian can be built point by point.

    It is an ordinary ``value_fn`` (for Adam, :func:`twophase.nonlinear_cg`,
    ``newton_cg(curvature="gauss_newton")``); :func:`twophase.levenberg_marquardt`
    reads ``terms``. Build it with :func:`pointwise_residuals`.

    Attributes:
      residual_fn: ``params -> {name: (n_t * k_t,) scaled residuals}`` (the
        per-point functions under ``jax.vmap``); the objective is half the sum
        of their squares (``reduction="half_sum"`` of the parent).
      terms: tuple of ``(name, point_fn, data, n_t)``: ``point_fn(params,
        point) -> scalar or (k_t,)``, ``data`` a pytree whose leaves share the
        leading axis of ``n_t`` points.
      term_reduction: the ``reduction`` of :func:`pointwise_residuals`, which
        fixes each term's scale (:func:`term_scales`).
      has_aux: calling returns ``(loss, {name: term's part of the loss})``.
    """

    terms: tuple = ()
    term_reduction: str = "term_means"
    has_aux: bool = False

    def scales(self, params: PyTree) -> dict[str, float]:
        """Each term's residual scale (:func:`term_scales`)."""
        return term_scales(self.terms, self.term_reduction, params)

    def __call__(self, params: PyTree):
        scaled = self.residual_fn(params)
        leaves = jax.tree.leaves(scaled)
        dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
        parts = {name: 0.5 * jnp.sum(jnp.square(r.astype(dtype))) for name, r in scaled.items()}
        total = sum(parts.values(), jnp.zeros([], dtype))
        return (total, parts) if self.has_aux else total


def _points_in(name: str, data: PyTree) -> int:
    """Number of points (the common leading axis) of a term's ``data``."""
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(data)}
    if not sizes or None in sizes or len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"`terms['{name}']`'s data must be a pytree of arrays sharing a leading axis of at "
            f"least one point, got leading sizes {sorted(map(str, sizes))}."
        )
    return sizes.pop()


def term_scales(terms: tuple, reduction: str, params: PyTree) -> dict[str, float]:
    """``name -> s_t``, the factor on term ``t``'s residuals so that half the sum
    of the scaled squares is the objective ``reduction`` names: ``sqrt(2 /
    (n_t k_t))`` (``"term_means"``), ``sqrt(2 / sum_t n_t k_t)`` (``"mean"``) or
    ``1`` (``"half_sum"``). Trace time (``jax.eval_shape``), no evaluation."""
    entries = {}
    for name, fn, data, n in terms:
        sample = jax.tree.map(lambda x: x[0], data)
        shape = jax.eval_shape(fn, params, sample).shape
        entries[name] = n * math.prod(shape)
    total = sum(entries.values())
    if reduction == "term_means":
        return {name: math.sqrt(2.0 / max(m, 1)) for name, m in entries.items()}
    if reduction == "mean":
        return dict.fromkeys(entries, math.sqrt(2.0 / max(total, 1)))
    return dict.fromkeys(entries, 1.0)


def pointwise_residuals(
    terms: Mapping[str, tuple[Callable[[PyTree, PyTree], jax.Array], PyTree]],
    *,
    reduction: str = "term_means",
    has_aux: bool = False,
) -> PointwiseObjective:
    """A least-squares ``value_fn`` given residual by residual point.

    ``terms = {"pde": (pde_fn, x_interior), "initial": (ic_fn, (x0, u0))}``:
    each ``point_fn(params, point)`` returns the residual (a scalar or a
    ``(k,)`` array) at one point, one row of ``data``'s leaves (a pytree whose
    leaves share a leading axis of ``n`` points). The objective is

    * ``"term_means"``: ``sum_t mean(r_t**2)``, each term's mean square (the
      PINN loss of Raissi et al. 2019 and Rathore et al. 2024);
    * ``"mean"``: ``mean(r**2)`` over all entries of all terms (as
      :func:`twophase.gauss_newton_objective`);
    * ``"half_sum"``: ``0.5 * sum(r**2)``.

    Why: :func:`twophase.levenberg_marquardt` differentiates each point's own
    residual (``jax.jacrev`` under ``jax.vmap``) instead of the whole vector, the
    cheap way to a Jacobian (:mod:`twophase.second_phase.jacobian`).

    Args:
      terms: a non-empty mapping ``name -> (point_fn, data)``.
      reduction: one of :data:`REDUCTIONS`.
      has_aux: return ``(loss, {name: term's part of the loss})`` (scalars),
        the auxiliary output of :mod:`twophase.auxiliary`.

    Returns:
      A :class:`PointwiseObjective`.

    Raises:
      TypeError: a term that is not a pair ``(callable, data)``.
      ValueError: empty ``terms``, data without a common leading axis, an
        unknown ``reduction``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {list(REDUCTIONS)}, got {reduction!r}.")
    if not isinstance(terms, Mapping) or not terms:
        raise ValueError(
            f"`terms` must be a non-empty mapping name -> (point_fn, data), got {terms!r}."
        )
    sizes = {}
    for name, term in terms.items():
        if not (isinstance(term, tuple) and len(term) == 2 and callable(term[0])):
            raise TypeError(f"`terms['{name}']` must be a pair (point_fn, data), got {term!r}.")
        sizes[name] = _points_in(name, term[1])
    packed = tuple((name, fn, data, sizes[name]) for name, (fn, data) in terms.items())

    def residual_fn(params):
        scales = term_scales(packed, reduction, params)
        return {
            name: scales[name] * jnp.ravel(jax.vmap(fn, (None, 0))(params, data))
            for name, fn, data, _ in packed
        }

    return PointwiseObjective(residual_fn, "half_sum", packed, reduction, bool(has_aux))


# --------------------------------------------------------------------------- linearization


class Linearization(NamedTuple):
    """The least-squares model at a point, as flat arrays in the arithmetic dtype.

    ``f = w/2 ||r||^2``, ``g = w J^T r``, ``G = w J^T J`` (``w`` the objective's
    weight).

    Attributes:
      value: ``f``, scalar.
      gradient: ``g``, ``(P,)``.
      curvature: ``G`` (``(P, P)``) for ``mode="gram"``, its diagonal (``(P,)``)
        for ``mode="diagonal"``, ``None`` for ``mode="gradient"``.
    """

    value: jax.Array
    gradient: jax.Array
    curvature: jax.Array | None


def residual_count(objective: GaussNewtonObjective, params: PyTree) -> int:
    """``M``, the number of residual entries (trace time, no evaluation)."""
    shapes = jax.tree.leaves(jax.eval_shape(objective.residual_fn, params))
    return sum(math.prod(s.shape) for s in shapes)


def default_chunk(rows: int, size: int, dtype) -> int:
    """Rows per chunk so that a chunk of Jacobian rows (``size`` wide) holds
    about 128 MiB, at least 1 and at most ``rows``."""
    per_row = max(size, 1) * jnp.dtype(dtype).itemsize
    return max(1, min(rows, _CHUNK_BYTES // per_row))


def flat_residual_fn(objective: GaussNewtonObjective, unravel, base, dtype):
    """``theta -> r``: the objective's residuals as one flat vector of ``dtype``,
    of the flat parameters ``theta`` (cast to ``base``, then unravelled)."""

    def residual_vector(theta):
        tree = objective.residual_fn(unravel(theta.astype(base)))
        return ravel_pytree(tree)[0].astype(dtype)

    return residual_vector


def gauss_newton_product(objective: GaussNewtonObjective, params: PyTree, dtype):
    """``v -> G v = w J^T (J v)`` on flat ``(P,)`` vectors of ``dtype`` at
    ``params``: one ``jax.jvp`` and one ``jax.vjp`` (linearised once) a product."""
    flat, unravel = ravel_pytree(params)
    residual_vector = flat_residual_fn(objective, unravel, flat.dtype, dtype)
    theta = flat.astype(dtype)
    _, pullback = jax.vjp(residual_vector, theta)
    weight = objective.weight(params)

    def product(v):
        jv = jax.jvp(residual_vector, (theta,), (v.astype(dtype),))[1]
        return (weight * pullback(jv)[0]).astype(dtype)

    return product


def _fold(mode: str, carry, rows, residuals):
    """Adds a chunk of ``J`` rows ``(c, P)`` and their residuals ``(c,)`` to
    ``(J^T r, G or diag G)``."""
    jtr, curvature = carry
    jtr = jtr + rows.T @ residuals
    if mode == "gram":
        curvature = curvature + rows.T @ rows
    elif mode == "diagonal":
        curvature = curvature + jnp.sum(jnp.square(rows), axis=0)
    return jtr, curvature


def _empty(mode: str, size: int, dtype):
    """Zero ``(J^T r, curvature)`` accumulators for ``mode``."""
    curvature = {
        "gram": jnp.zeros((size, size), dtype),
        "diagonal": jnp.zeros((size,), dtype),
        "gradient": jnp.zeros((0,), dtype),
    }[mode]
    return jnp.zeros((size,), dtype), curvature


def _scan_rows(mode, carry, count, chunk, rows_of):
    """Folds ``rows_of(start, c) -> (rows (c', P), residuals (c',))`` over
    ``count`` items in chunks of ``chunk`` (a scan over the full chunks, then
    the remainder); returns the accumulators and the sum of squared residuals."""
    full, rest = divmod(count, chunk)

    def body(state, index):
        acc, sq = state
        rows, res = rows_of(index * chunk, chunk)
        return (_fold(mode, acc, rows, res), sq + jnp.sum(jnp.square(res))), None

    state = (carry, jnp.zeros([], carry[0].dtype))
    if full == 1:
        state, _ = body(state, 0)
    elif full > 1:
        state, _ = lax.scan(body, state, jnp.arange(full))
    if rest:
        rows, res = rows_of(full * chunk, rest)
        state = (_fold(mode, state[0], rows, res), state[1] + jnp.sum(jnp.square(res)))
    return state


def _pointwise_rows(term, scale, flat, unravel, dtype):
    """``(start, c) -> (rows (c k, P), residuals (c k,))`` of one term's points
    (residuals times ``scale``), each point's Jacobian by reverse mode when
    ``k <= P``, else forward mode."""
    _, fn, data, _ = term
    base = flat.dtype

    def point_residual(theta, point):
        return scale * jnp.ravel(fn(unravel(theta.astype(base)), point)).astype(dtype)

    sample = jax.tree.map(lambda x: x[0], data)
    k = jax.eval_shape(point_residual, flat.astype(dtype), sample).shape[0]
    differentiate = jax.jacrev if k <= flat.shape[0] else jax.jacfwd
    jac = differentiate(lambda theta, point: (point_residual(theta, point),) * 2, has_aux=True)

    def rows_of(start, count):
        points = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, count), data)
        rows, res = jax.vmap(jac, (None, 0))(flat.astype(dtype), points)
        return rows.reshape(-1, flat.shape[0]), res.reshape(-1)

    return rows_of, k


def _linearize_pointwise(objective, flat, unravel, mode, chunk, dtype):
    """:func:`linearize` for a :class:`PointwiseObjective`."""
    carry = _empty(mode, flat.shape[0], dtype)
    squares = jnp.zeros([], dtype)
    scales = objective.scales(unravel(flat))
    for term in objective.terms:
        rows_of, k = _pointwise_rows(term, scales[term[0]], flat, unravel, dtype)
        count = term[3]
        step = chunk or default_chunk(count, k * flat.shape[0], dtype)
        carry, sq = _scan_rows(mode, carry, count, step, rows_of)
        squares = squares + sq
    return carry, squares


def _linearize_whole(objective, flat, unravel, mode, chunk, dtype):
    """:func:`linearize` for any residual function: reverse-mode rows when
    ``M <= P``, else forward-mode columns."""
    size = flat.shape[0]
    residual_vector = flat_residual_fn(objective, unravel, flat.dtype, dtype)
    theta = flat.astype(dtype)
    r, pullback = jax.vjp(residual_vector, theta)
    rows = r.shape[0]
    if rows <= size:

        def rows_of(start, count):
            basis = jax.nn.one_hot(start + jnp.arange(count), rows, dtype=dtype)
            return jax.vmap(lambda e: pullback(e)[0])(basis), lax.dynamic_slice_in_dim(
                r, start, count
            )

        step = chunk or default_chunk(rows, size, dtype)
        return _scan_rows(mode, _empty(mode, size, dtype), rows, step, rows_of)
    return _columns(residual_vector, theta, r, pullback, mode, chunk), jnp.sum(jnp.square(r))


def _columns(residual_vector, theta, r, pullback, mode, chunk):
    """``(J^T r, curvature)`` from forward-mode columns ``J e_j`` in chunks."""
    size, dtype = theta.shape[0], theta.dtype
    jtr = pullback(r)[0]
    if mode == "gradient":
        return jtr, jnp.zeros((0,), dtype)
    step = chunk or default_chunk(size, r.shape[0], dtype)

    def block(start, count):
        basis = jax.nn.one_hot(start + jnp.arange(count), size, dtype=dtype)
        cols = jax.vmap(lambda e: jax.jvp(residual_vector, (theta,), (e,))[1])(basis)
        if mode == "diagonal":
            return jnp.sum(jnp.square(cols), axis=1)
        return jax.vmap(lambda c: pullback(c)[0])(cols)  # rows of G (symmetric)

    full, rest = divmod(size, step)
    parts = []
    if full:
        parts.append(lax.map(lambda i: block(i * step, step), jnp.arange(full)))
        parts[-1] = parts[-1].reshape((full * step, *parts[-1].shape[2:]))
    if rest:
        parts.append(block(full * step, rest))
    return jtr, jnp.concatenate(parts, axis=0)


def linearize(
    objective: GaussNewtonObjective,
    params: PyTree,
    mode: str,
    *,
    chunk: int | None = None,
    dtype=None,
) -> Linearization:
    """The least-squares model of ``objective`` at ``params``, in bounded memory.

    Args:
      objective: a :class:`twophase.GaussNewtonObjective` (per-point Jacobians
        when it is a :class:`PointwiseObjective`).
      params: the parameters (a pytree).
      mode: ``"gram"`` (``G``, ``P x P``), ``"diagonal"`` (``diag G``) or
        ``"gradient"`` (neither).
      chunk: residual rows (or points, or parameter columns) per chunk; ``None``
        chooses about 128 MiB of Jacobian per chunk.
      dtype: the arithmetic dtype (default: the flat parameters', at least float32).

    Returns:
      A :class:`Linearization` (not finite where the residuals or the Jacobian
      are not).
    """
    flat, unravel = ravel_pytree(params)
    dtype = jnp.promote_types(flat.dtype, jnp.float32) if dtype is None else dtype
    weight = objective.weight(params)
    if mode == "gradient":  # one reverse pass, no Jacobian
        residual_vector = flat_residual_fn(objective, unravel, flat.dtype, dtype)
        r, pullback = jax.vjp(residual_vector, flat.astype(dtype))
        return Linearization(
            value=(0.5 * weight * jnp.sum(jnp.square(r))).astype(dtype),
            gradient=(weight * pullback(r)[0]).astype(dtype),
            curvature=None,
        )
    if isinstance(objective, PointwiseObjective):
        (jtr, curvature), squares = _linearize_pointwise(
            objective, flat, unravel, mode, chunk, dtype
        )
    else:
        (jtr, curvature), squares = _linearize_whole(objective, flat, unravel, mode, chunk, dtype)
    return Linearization(
        value=(0.5 * weight * squares).astype(dtype),
        gradient=(weight * jtr).astype(dtype),
        curvature=None if mode == "gradient" else (weight * curvature).astype(dtype),
    )
