"""Levenberg-Marquardt as an optax transformation, for least-squares objectives.

For ``f(theta) = w/2 ||r(theta)||^2`` (a :func:`twophase.gauss_newton_objective`
or :func:`twophase.pointwise_residuals`), each iteration solves the damped
Gauss-Newton system

    (G + mu D) d = -g,      G = w J^T J,   g = w J^T r,

tries ``theta + d`` and keeps it when the objective fell (a trust-region test on
the gain ratio ``rho`` of actual to predicted decrease), adapting ``mu`` by
Nielsen's rule. Near a zero-residual solution ``G`` is the Hessian, and the
steps converge quadratically; a physics-informed network's loss is of this
form, which is why this second phase reaches errors far below L-BFGS there.

Stages of one ``update`` call (each a module-level function below):

1. *linearize* (:func:`twophase.second_phase.jacobian.linearize`, only after the
   point moved): ``r``, ``g`` and ``G`` (dense path) or ``diag G`` (matrix-free
   path with Marquardt scaling), built from chunks of Jacobian rows;
2. *scaling* (:func:`marquardt_scaling`): ``D = I`` or Moré's running maximum
   of ``diag G``;
3. *solve*: :func:`dense_step` (Cholesky of the ``P x P`` matrix) or
   :func:`matrix_free_step` (linear CG on Gauss-Newton products, Nystrom
   preconditioned); optionally :func:`geodesic_acceleration`;
4. *trial*: one evaluation of the objective at ``theta + d``;
5. *damping* (:func:`nielsen_damping`): ``mu *= max(1/3, 1 - (2 rho - 1)^3)``,
   ``nu = 2`` on success; ``mu *= nu``, ``nu *= 2`` on failure.

Sources:
  * Levenberg (1944), Marquardt (1963); Moré, "The Levenberg-Marquardt
    algorithm: implementation and theory" (1978): the scaling ``D``.
  * Nielsen, "Damping parameter in Marquardt's method", IMM-REP-1999-05 (DTU);
    Madsen, Nielsen & Tingleff, *Methods for non-linear least squares
    problems* (2004), Algorithm 3.16: the damping rule and ``mu_0 = tau max G_ii``.
  * Nocedal & Wright, *Numerical Optimization* (2006), chapter 10.3.
  * Transtrum & Sethna, "Improvements to the Levenberg-Marquardt algorithm for
    nonlinear least-squares minimization", arXiv 1201.5885 (2012): geodesic
    acceleration and its acceptance ratio ``2 ||a|| / ||d|| <= alpha``.
  * Frangella, Tropp & Udell (2023): the Nystrom preconditioner.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree
from jax import lax
from jax.flatten_util import ravel_pytree

from twophase import auxiliary as _aux
from twophase._checks import as_open_unit, as_positive_finite, as_positive_int, require_update_args
from twophase._control import run_if
from twophase.second_phase import common
from twophase.second_phase import jacobian as _jac
from twophase.second_phase import nystrom as _nys
from twophase.second_phase.contract import JACOBIAN_COST
from twophase.second_phase.newton_cg import GaussNewtonObjective, truncated_cg

__all__ = [
    "DENSE_MAX_PARAMS",
    "JACOBIAN_COST",
    "SCALINGS",
    "SOLVERS",
    "LevenbergMarquardtState",
    "dense_memory",
    "dense_step",
    "geodesic_acceleration",
    "levenberg_marquardt",
    "marquardt_scaling",
    "matrix_free_step",
    "nielsen_damping",
    "recheck_model",
]

PyTree = Any

SOLVERS = ("auto", "dense", "matrix_free")
SCALINGS = ("identity", "marquardt")

DENSE_MAX_PARAMS: int = 3000
"""Default crossover: the dense (Cholesky) path for at most this many
parameters, the matrix-free (CG) path above.

Measured by ``python benchmarks/lm_crossover.py`` (float64, a tanh PINN on the
reaction problem with 1202 residuals, one OpenBLAS thread, this project's
shared 2-core CPU; table in ``CHANGES/lm.md``): the dense step grows from
0.05 s at 261 parameters to 0.31 s at 921 and 4.5 s at 1981, the matrix-free
step from 0.04 to 0.6 s, so per step the matrix-free path is cheaper
throughout. Per unit of progress it is not: its truncated CG steps are
inexact, and at 281 parameters it needed 26 s to reach a loss of 3e-3 where
the dense path reached 1e-5 in 2.6 s. The default keeps the dense path up to
where its step costs several seconds on a CPU; on a GPU the dense path pays
off further (raise it)."""

_BYTES_24_GIB = 24 * 2**30
_DENSE_MATRICES = 3  # G in the state, G + mu D, its Cholesky factor
_NU_MAX = 2.0**20
_ACCELERATION_DEFAULT = 0.75


class LevenbergMarquardtState(NamedTuple):
    """State of :func:`levenberg_marquardt`.

    Flat arrays over the ``P`` parameters (``jax.flatten_util.ravel_pytree``
    order) in the arithmetic dtype (float32 for lower-precision parameters,
    else theirs). The fields ``value``, ``value_and_grad_evals``,
    ``hessian_vector_products`` and ``consecutive_failures`` follow the
    second-phase contract (:mod:`twophase.second_phase.contract`).

    Attributes:
      value: objective at the current parameters, scalar; ``+inf`` before the
        first ``update``.
      gradient: ``(P,)`` ``g = w J^T r`` at the current parameters.
      gram: ``(P, P)`` ``G = w J^T J`` at the current parameters on the dense
        path; ``(0, 0)`` on the matrix-free path.
      scaling: ``(P,)`` the diagonal of ``D`` (ones for ``scaling="identity"``).
      damping: ``mu`` (scalar; ``0`` until the first linearization sets
        ``tau * max_i G_ii / D_ii``).
      growth: Nielsen's ``nu`` (scalar ``>= 2``).
      linearized: bool, ``gradient``/``gram`` belong to the current parameters
        (false after an accepted step: the next ``update`` rebuilds them).
      ratio: last gain ratio ``rho`` (``-inf`` for a non-finite trial).
      iterations: int32 ``update`` calls.
      value_and_grad_evals: int32 cumulative full-batch evaluations: one per
        trial point (a forward pass of the residuals, counted as a whole
        evaluation), one per matrix-free linearization without Jacobian, one
        per ``aux`` evaluation at the first point.
      jacobian_evals: int32 cumulative linearizations that built Jacobian rows
        (each costs about :data:`JACOBIAN_COST` evaluations).
      hessian_vector_products: int32 cumulative Gauss-Newton products (CG
        iterations, Nystrom sketch columns, geodesic second derivatives).
      rejected_steps: int32 cumulative rejected steps (``rho <= 0`` or not finite).
      consecutive_failures: int32 current run of rejected steps; 0 after an
        accepted one. The update was zero while it is positive.
      nonfinite_events: int32 calls where the residuals, the Jacobian, the step
        or the trial value was not finite.
      aux: the auxiliary output at the current parameters (``value_fn``
        returning ``(loss, aux)``), else ``None``.
      sketch: the Nystrom sketch of ``D^{-1/2} G D^{-1/2}`` on the matrix-free
        path, else ``None``.
    """

    value: jax.Array
    gradient: jax.Array
    gram: jax.Array
    scaling: jax.Array
    damping: jax.Array
    growth: jax.Array
    linearized: jax.Array
    ratio: jax.Array
    iterations: jax.Array
    value_and_grad_evals: jax.Array
    jacobian_evals: jax.Array
    hessian_vector_products: jax.Array
    rejected_steps: jax.Array
    consecutive_failures: jax.Array
    nonfinite_events: jax.Array
    aux: PyTree = None
    sketch: _nys.NystromSketch | None = None


# --------------------------------------------------------------------------- stages


def dense_memory(size: int, dtype) -> int:
    """Bytes of the dense path's ``P x P`` matrices: ``G`` (kept in the state),
    ``G + mu D`` and its Cholesky factor, ``3 P^2`` entries of ``dtype``."""
    return _DENSE_MATRICES * size * size * jnp.dtype(dtype).itemsize


def marquardt_scaling(kind: str, previous: jax.Array, diagonal: jax.Array | None) -> jax.Array:
    """``D``'s diagonal: ones (``"identity"``) or Moré's (1978) running maximum
    ``max(D_prev, diag G)`` (``"marquardt"``), floored at ``eps * max`` so that
    ``D`` stays positive definite for parameters the residuals ignore."""
    if kind == "identity" or diagonal is None:
        return jnp.ones_like(previous)
    scale = jnp.maximum(previous, diagonal)
    floor = jnp.finfo(scale.dtype).eps * jnp.max(scale)
    return jnp.maximum(scale, jnp.where(floor > 0, floor, 1))


def dense_step(gram, gradient, scaling, damping):
    """``d = -(G + mu D)^{-1} g`` by Cholesky; returns ``(d, solve)`` with
    ``solve(b) = (G + mu D)^{-1} b`` reusing the factor (NaN if not positive
    definite: the step is then rejected)."""
    matrix = gram + jnp.diag(damping * scaling)
    factor = jax.scipy.linalg.cho_factor(matrix, lower=True)

    def solve(b):
        return jax.scipy.linalg.cho_solve(factor, b)

    return -solve(gradient), solve


def matrix_free_step(product, gradient, scaling, damping, sketch, tolerance, max_iterations):
    """``d ~ -(G + mu D)^{-1} g`` by preconditioned CG in the scaled variables
    ``y = D^{1/2} d``: ``(D^{-1/2} G D^{-1/2} + mu I) y = -D^{-1/2} g``, stopped
    at ``||residual|| <= tolerance * ||D^{-1/2} g||``, with the Nystrom
    preconditioner of ``sketch`` at this damping.

    Returns ``(d, products, finite)``."""
    root = jnp.sqrt(scaling)
    scaled_gradient = gradient / root
    inverse = _nys.nystrom_inverse(sketch.basis, sketch.eigenvalues, damping)
    inner = truncated_cg(
        lambda v: product(v / root) / root,
        scaled_gradient,
        damping,
        tolerance * jnp.linalg.norm(scaled_gradient),
        max_iterations,
        inverse,
    )
    step = inner.step / root
    return step, inner.products, ~inner.nonfinite & jnp.all(jnp.isfinite(step))


def geodesic_acceleration(residual_vector, theta, weight, velocity, solve, pullback):
    """Transtrum & Sethna's (2012) second-order correction ``a``, solving
    ``(G + mu D) a = -w J^T r''``, ``r''`` the second directional derivative of
    the residuals along ``velocity`` (forward over forward mode); the step is
    then ``velocity + a / 2``."""

    def directional(t):
        return jax.jvp(residual_vector, (t,), (velocity,))[1]

    second = jax.jvp(directional, (theta,), (velocity,))[1]
    return -solve(weight * pullback(second)[0])


def nielsen_damping(damping, growth, ratio, accepted, ceiling):
    """Nielsen's rule: on an accepted step ``mu *= max(1/3, 1 - (2 rho - 1)^3)``
    and ``nu = 2``; on a rejected one ``mu *= nu``, ``nu *= 2``. ``mu`` is kept in
    ``[tiny, ceiling]``, ``nu`` at most ``2^20``. Returns ``(mu, nu)``."""
    dtype = damping.dtype
    shrink = jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * ratio - 1.0) ** 3)
    shrink = jnp.where(jnp.isfinite(shrink), shrink, 1.0 / 3.0)
    new_damping = jnp.where(accepted, damping * shrink, damping * growth)
    new_growth = jnp.where(accepted, 2.0, jnp.minimum(2.0 * growth, _NU_MAX))
    tiny = jnp.finfo(dtype).tiny
    return jnp.clip(new_damping, tiny, ceiling).astype(dtype), new_growth.astype(dtype)


def _initial_damping(tau, gram_diagonal, scaling, sketch):
    """``tau * max_i G_ii / D_ii`` (Madsen et al. 2004) when ``diag G`` is known,
    else ``tau`` times the sketch's largest eigenvalue; ``tau`` if neither is
    positive and finite."""
    if gram_diagonal is not None:
        reference = jnp.max(gram_diagonal / scaling)
    elif sketch is not None:
        reference = jnp.max(sketch.eigenvalues)
    else:
        reference = jnp.ones([], scaling.dtype)
    reference = jnp.where(jnp.isfinite(reference) & (reference > 0), reference, 1)
    return (tau * reference).astype(scaling.dtype)


# --------------------------------------------------------------------------- the transformation


class _Config(NamedTuple):
    """The checked, static arguments of :func:`levenberg_marquardt`."""

    tau: float
    scaling: str
    solver: str
    dense_max_params: int
    memory_limit: int
    geodesic: bool
    geodesic_ratio: float
    chunk: int | None
    cg_tolerance: float
    max_cg_iterations: int
    sketch_size: int
    sketch_refresh: int
    seed: int
    max_damping: float


def _flat_size_and_dtype(params: PyTree) -> tuple[int, Any]:
    """``P`` and the arithmetic dtype of the flat parameters (trace time)."""
    flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params)
    return flat.shape[0], jnp.promote_types(flat.dtype, jnp.float32)


def _use_dense(cfg: _Config, params: PyTree) -> bool:
    """Whether ``params`` take the dense path; ``ValueError`` naming the parameter
    count and the memory when the dense path is chosen but does not fit."""
    size, dtype = _flat_size_and_dtype(params)
    dense = cfg.solver == "dense" or (cfg.solver == "auto" and size <= cfg.dense_max_params)
    if dense and dense_memory(size, dtype) > cfg.memory_limit:
        raise ValueError(
            f"levenberg_marquardt: the dense path for {size} parameters needs about "
            f"{dense_memory(size, dtype) / 2**30:.1f} GiB ({_DENSE_MATRICES} matrices of "
            f"{size} x {size} {jnp.dtype(dtype).name}), above `memory_limit` = "
            f"{cfg.memory_limit / 2**30:.1f} GiB; use solver='matrix_free' or lower "
            "`dense_max_params`."
        )
    return dense


def _init_state(cfg: _Config, params: PyTree) -> LevenbergMarquardtState:
    """A fresh state for ``params`` (nothing evaluated)."""
    size, dtype = _flat_size_and_dtype(params)
    dense = _use_dense(cfg, params)
    izero = jnp.zeros([], jnp.int32)
    sketch = None
    if not dense:
        rank = max(min(cfg.sketch_size, size), 1)
        sketch = _nys.empty_sketch(size, rank, dtype, age=cfg.sketch_refresh)
    return LevenbergMarquardtState(
        value=jnp.asarray(jnp.inf, dtype),
        gradient=jnp.zeros((size,), dtype),
        gram=jnp.zeros((size, size) if dense else (0, 0), dtype),
        scaling=jnp.ones((size,), dtype),
        damping=jnp.zeros([], dtype),
        growth=jnp.asarray(2.0, dtype),
        linearized=jnp.asarray(False),
        ratio=jnp.zeros([], dtype),
        iterations=izero,
        value_and_grad_evals=izero,
        jacobian_evals=izero,
        hessian_vector_products=izero,
        rejected_steps=izero,
        consecutive_failures=izero,
        nonfinite_events=izero,
        aux=None,
        sketch=sketch,
    )


def _refresh_sketch(cfg, sketch, product, scaling):
    """A new Nystrom sketch of ``D^{-1/2} G D^{-1/2}`` when due (every
    ``sketch_refresh`` linearizations); returns ``(sketch, products)``."""
    size, rank = sketch.basis.shape
    root = jnp.sqrt(scaling)

    def take(old):
        key = jax.random.fold_in(jax.random.key(cfg.seed), old.sketches)
        basis, eigenvalues = _nys.nystrom_sketch(
            lambda v: product(v / root) / root, key, size, rank, scaling.dtype
        )
        return _nys.NystromSketch(basis, eigenvalues, jnp.zeros([], jnp.int32), old.sketches + 1)

    due = sketch.age >= cfg.sketch_refresh
    fresh = run_if(due, take, sketch, differentiable=False)
    fresh = fresh._replace(age=fresh.age + 1)
    return fresh, jnp.where(due, rank, 0).astype(jnp.int32)


def _relinearize(cfg, dense, state, objective, value_fn, params):
    """Stage 1-2: the model at the current parameters (after a move), the
    scaling, the sketch, the first damping and the first ``aux``."""
    dtype = state.value.dtype
    mode = "gram" if dense else ("diagonal" if cfg.scaling == "marquardt" else "gradient")
    lin = _jac.linearize(objective, params, mode, chunk=cfg.chunk, dtype=dtype)
    diagonal = jnp.diagonal(lin.curvature) if dense else lin.curvature
    finite = jnp.isfinite(lin.value) & jnp.all(jnp.isfinite(lin.gradient))
    if diagonal is not None:
        finite = finite & jnp.all(jnp.isfinite(lin.curvature))
    scaling = marquardt_scaling(cfg.scaling, state.scaling, diagonal)
    scaling = jnp.where(finite, scaling, state.scaling)
    sketch, products = state.sketch, jnp.zeros([], jnp.int32)
    if not dense:
        product = _jac.gauss_newton_product(objective, params, dtype)
        sketch, products = _refresh_sketch(cfg, sketch, product, scaling)
    first = _initial_damping(cfg.tau, diagonal, scaling, sketch)
    evals = jnp.asarray(mode == "gradient", jnp.int32)
    aux = state.aux
    if aux is not None:  # the aux of the first point; later ones come with the trial
        aux = run_if(
            ~jnp.isfinite(state.value),
            lambda old: _aux.as_template(value_fn(params)[1], old),
            aux,
            differentiable=False,
        )
        evals = evals + (~jnp.isfinite(state.value)).astype(jnp.int32)
    return state._replace(
        value=jnp.where(finite, lin.value, jnp.inf).astype(dtype),
        gradient=lin.gradient,
        gram=lin.curvature if dense else state.gram,
        scaling=scaling,
        damping=jnp.where(state.damping > 0, state.damping, first).astype(dtype),
        linearized=jnp.asarray(True),
        value_and_grad_evals=state.value_and_grad_evals + evals,
        jacobian_evals=state.jacobian_evals + jnp.asarray(mode != "gradient", jnp.int32),
        hessian_vector_products=state.hessian_vector_products + products,
        nonfinite_events=state.nonfinite_events + (~finite).astype(jnp.int32),
        aux=aux,
        sketch=sketch,
    )


def _solver(cfg, dense, state, objective, params):
    """``(d, solve, curvature_product, products)`` of stage 3 at the current
    damping: ``solve(b) -> (x, products)`` with ``x ~ (G + mu D)^{-1} b``."""
    dtype = state.value.dtype
    mu = state.damping
    if dense:
        step, solve = dense_step(state.gram, state.gradient, state.scaling, mu)
        none = jnp.zeros([], jnp.int32)
        return step, lambda b: (solve(b), none), lambda v: state.gram @ v, none
    product = _jac.gauss_newton_product(objective, params, dtype)

    def cg(b):
        return matrix_free_step(
            product, b, state.scaling, mu, state.sketch, cfg.cg_tolerance, cfg.max_cg_iterations
        )

    step, products, _ = cg(state.gradient)

    def solve(b):
        x, count, _ = cg(b)
        return -x, count

    return step, solve, product, products


def _accelerated(cfg, state, objective, params, step, solve):
    """Stage 3b: ``(d + a/2, products)`` when the ratio ``2 ||a||_D / ||d||_D``
    of geodesic acceleration is at most ``geodesic_ratio``, else ``(d, products)``."""
    flat, unravel = ravel_pytree(params)
    dtype = state.value.dtype
    residual_vector = _jac.flat_residual_fn(objective, unravel, flat.dtype, dtype)
    theta = flat.astype(dtype)
    _, pullback = jax.vjp(residual_vector, theta)
    counted = []

    def counting_solve(b):
        x, count = solve(b)
        counted.append(count)
        return x

    accel = geodesic_acceleration(
        residual_vector, theta, objective.weight(params), step, counting_solve, pullback
    )
    size_d = jnp.sqrt(jnp.sum(state.scaling * step * step))
    size_a = jnp.sqrt(jnp.sum(state.scaling * accel * accel))
    use = jnp.all(jnp.isfinite(accel)) & (2 * size_a <= cfg.geodesic_ratio * size_d)
    return jnp.where(use, step + 0.5 * accel, step), counted[0] + 1


def recheck_model(state, value_fn, params):
    """After two rejected steps in a row from the same model: one evaluation
    here. Where it differs from the model's value, the objective changed under
    it (loss weights, resampled residual points): the model is dropped (the next
    stage relinearizes) and the damping starts afresh. Otherwise the
    rejections were the model's, and it is kept."""
    value = _aux.scalar_objective(value_fn)(params).astype(state.value.dtype)
    same = common.unchanged(value, state.value) | ~jnp.isfinite(value)
    return state._replace(
        linearized=same,
        damping=jnp.where(same, state.damping, 0).astype(state.damping.dtype),
        consecutive_failures=jnp.where(same, state.consecutive_failures, 0),
        value_and_grad_evals=state.value_and_grad_evals + 1,
    )


def _try_step(cfg, dense, state, objective, value_fn, params):
    """Stages 3-5 at a finite linearization: solve, try ``theta + d``, keep it
    when the objective fell, adapt the damping. Returns ``(flat update, state)``."""
    flat, unravel = ravel_pytree(params)
    dtype = state.value.dtype
    step, solve, curvature, products = _solver(cfg, dense, state, objective, params)
    if cfg.geodesic:
        step, more = _accelerated(cfg, state, objective, params, step, solve)
        products = products + more
    step = step.astype(dtype)
    predicted = -(state.gradient @ step + 0.5 * step @ curvature(step))
    products = products + (0 if dense else 1)
    trial = unravel((flat.astype(dtype) + step).astype(flat.dtype))
    trial_value, trial_aux = _aux.split_output(value_fn(trial))
    trial_value = jnp.reshape(trial_value, ()).astype(dtype)
    actual = state.value - trial_value
    finite = jnp.all(jnp.isfinite(step)) & jnp.isfinite(predicted) & jnp.isfinite(trial_value)
    accepted = finite & (predicted > 0) & (actual > 0)
    ratio = jnp.where(finite & (predicted > 0), actual / predicted, -jnp.inf).astype(dtype)
    damping, growth = nielsen_damping(state.damping, state.growth, ratio, accepted, cfg.max_damping)
    aux = state.aux
    if aux is not None:
        aux = optax.tree.where(accepted, _aux.as_template(trial_aux, aux), aux)
    new_state = state._replace(
        value=jnp.where(accepted, trial_value, state.value),
        damping=damping,
        growth=growth,
        linearized=~accepted,
        ratio=ratio,
        value_and_grad_evals=state.value_and_grad_evals + 1,
        hessian_vector_products=state.hessian_vector_products + products,
        rejected_steps=state.rejected_steps + (~accepted).astype(jnp.int32),
        consecutive_failures=jnp.where(accepted, 0, state.consecutive_failures + 1),
        nonfinite_events=state.nonfinite_events + (~finite).astype(jnp.int32),
        aux=aux,
    )
    return jnp.where(accepted, step, 0).astype(dtype), new_state


def _reject(cfg, state):
    """No usable model here (non-finite residuals or Jacobian): a zero update,
    counted as a rejected step, the damping raised."""
    dtype = state.value.dtype
    damping, growth = nielsen_damping(
        state.damping,
        state.growth,
        jnp.asarray(-jnp.inf, dtype),
        jnp.asarray(False),
        cfg.max_damping,
    )
    return jnp.zeros_like(state.gradient), state._replace(
        damping=damping,
        growth=growth,
        ratio=jnp.asarray(-jnp.inf, dtype),
        rejected_steps=state.rejected_steps + 1,
        consecutive_failures=state.consecutive_failures + 1,
    )


def _check_objective(value_fn: Any) -> GaussNewtonObjective:
    """``value_fn`` itself when it is in residual form, else ``TypeError``."""
    if not isinstance(value_fn, GaussNewtonObjective):
        raise TypeError(
            "levenberg_marquardt requires `value_fn` in residual form: built by "
            "twophase.gauss_newton_objective(residual_fn) or twophase.pointwise_residuals("
            f"terms); got {value_fn!r}."
        )
    return value_fn


def _update(cfg, updates, state, params, value_fn):
    """One Levenberg-Marquardt iteration (the body of ``update``)."""
    require_update_args("levenberg_marquardt", updates, params, value_fn)
    objective = _check_objective(value_fn)
    dense = _use_dense(cfg, params)
    state = _aux.prepare_aux(state, value_fn, params)
    state = run_if(
        state.linearized & (state.consecutive_failures >= 2),
        lambda s: recheck_model(s, value_fn, params),
        state,
        differentiable=False,
    )
    state = run_if(
        ~state.linearized,
        lambda s: _relinearize(cfg, dense, s, objective, value_fn, params),
        state,
        differentiable=False,
    )
    usable = jnp.isfinite(state.value) & jnp.all(jnp.isfinite(state.gradient))
    usable = usable & (jnp.all(jnp.isfinite(state.gram)) if dense else True)
    usable = usable & jnp.isfinite(state.damping) & (state.damping > 0)
    step, state = lax.cond(
        usable,
        lambda s: _try_step(cfg, dense, s, objective, value_fn, params),
        lambda s: _reject(cfg, s),
        state,
    )
    state = state._replace(iterations=state.iterations + 1)
    flat, unravel = ravel_pytree(params)
    return unravel(step.astype(flat.dtype)), state


def _as_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


def _as_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum``, else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def levenberg_marquardt(
    *,
    damping: float = 1e-3,
    scaling: str = "identity",
    solver: str = "auto",
    dense_max_params: int = DENSE_MAX_PARAMS,
    memory_limit: float = _BYTES_24_GIB,
    geodesic: bool = False,
    geodesic_ratio: float = _ACCELERATION_DEFAULT,
    jacobian_chunk: int | None = None,
    cg_tolerance: float = 1e-2,
    max_cg_iterations: int = 100,
    sketch_size: int = 60,
    sketch_refresh: int = 20,
    seed: int = 0,
    max_damping: float = 1e16,
) -> optax.GradientTransformationExtraArgs:
    """Levenberg-Marquardt with Nielsen's damping, a second phase for least squares.

    ``update(updates, state, params, value_fn=f)`` with ``f`` in residual form,
    :func:`twophase.gauss_newton_objective` or (faster Jacobians)
    :func:`twophase.pointwise_residuals`; ``updates`` is ignored. Each call
    solves ``(G + mu D) d = -g`` (``G = w J^T J``, ``g = w J^T r``), evaluates the
    objective once at ``params + d`` and returns ``d`` when it fell (gain ratio
    ``rho > 0``), else a zero update with ``mu`` raised (a trust-region test; the
    failure counts in ``consecutive_failures``). Nothing non-finite reaches the
    parameters: a non-finite residual, Jacobian, step or trial value is a
    rejected step. The Jacobian is rebuilt only after the point moved.

    **Dense or matrix-free.** With ``P`` parameters, the dense path (``P <=
    dense_max_params`` under ``solver="auto"``) forms ``G`` from chunks of
    Jacobian rows and solves by Cholesky: ``O(M P^2 + P^3)`` time and three
    ``P x P`` matrices (``G`` kept in the state, ``G + mu D``, its factor), i.e.
    ``24 P^2`` bytes in float64 and ``12 P^2`` in float32 (P = 5,000: 0.6 GB;
    P = 20,000: 9.6 GB), plus a chunk of Jacobian rows (about 128 MiB). The
    largest ``P`` a 24 GiB machine serves is about **32,000** in float64
    (45,000 in float32); above ``memory_limit`` the dense path raises
    ``ValueError`` at ``init`` (trace time), naming ``P`` and the estimate. The
    matrix-free path solves by linear CG on Gauss-Newton products ``G v`` (one
    ``jax.jvp`` and one ``jax.vjp``, never forming ``J``) in the variables
    ``D^{1/2} d``, preconditioned by a rank-``sketch_size`` randomized Nystrom
    sketch refreshed every ``sketch_refresh`` linearizations: memory
    ``sketch_size + O(1)`` parameter vectors. The default crossover
    :data:`DENSE_MAX_PARAMS` (3000) comes from ``benchmarks/lm_crossover.py``
    (see there and the constant's note: the matrix-free step is cheaper but
    much less effective at small ``P``; on a GPU raise it). On a CPU shared
    with other processes, limit OpenBLAS to one thread
    (``OPENBLAS_NUM_THREADS=1`` or ``threadpoolctl``) for the Cholesky.

    **Jacobian.** Built by :func:`twophase.second_phase.jacobian.linearize`:
    per point (reverse mode under ``jax.vmap``) for
    :func:`twophase.pointwise_residuals`, else rows by reverse mode or columns
    by forward mode of the whole residual vector, whichever is fewer; chunked
    (``jacobian_chunk`` rows, default about 128 MiB) so that ``J`` is never held
    whole. Each build counts in ``jacobian_evals``, worth about
    :data:`JACOBIAN_COST` evaluations.

    **Damping.** ``mu_0 = damping * max_i G_ii / D_ii`` (Madsen, Nielsen &
    Tingleff 2004; on the matrix-free path with ``D = I``, the sketch's largest
    eigenvalue stands for ``max G_ii``); then Nielsen's rule ``mu *= max(1/3,
    1 - (2 rho - 1)^3)`` after a success, ``mu *= nu, nu *= 2`` after a failure,
    ``mu`` at most ``max_damping``.

    Args:
      damping: ``tau`` of the first damping, a positive finite number.
      scaling: ``"identity"`` (``D = I``, Levenberg) or ``"marquardt"`` (``D`` the
        running maximum of ``diag G``, Marquardt and Moré: invariant to the
        parameters' units; on the matrix-free path it costs a Jacobian per
        linearization).
      solver: ``"auto"``, ``"dense"`` or ``"matrix_free"``.
      dense_max_params: the crossover, an int ``>= 0``: ``"auto"`` takes the
        dense path for at most this many parameters.
      memory_limit: bytes the dense path's matrices may take (default 24 GiB),
        a positive number.
      geodesic: add Transtrum & Sethna's geodesic acceleration ``a / 2`` (a second
        directional derivative of the residuals and one more solve per step).
      geodesic_ratio: ``alpha``: the acceleration is used when ``2 ||a||_D <=
        alpha ||d||_D`` (else the plain step), a positive finite number.
      jacobian_chunk: points (or rows, or columns) per chunk, a positive int, or
        ``None`` for about 128 MiB of Jacobian per chunk.
      cg_tolerance: relative residual at which CG stops (matrix-free path), in
        ``(0, 1)``.
      max_cg_iterations: CG iterations per solve, an int ``>= 1``.
      sketch_size: rank of the Nystrom sketch (capped at ``P``), an int ``>= 1``.
      sketch_refresh: linearizations between sketches, an int ``>= 1``.
      seed: seed of the sketches' test matrices, an int ``>= 0``.
      max_damping: the ceiling of ``mu``, a positive finite number.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`LevenbergMarquardtState`, honouring the second-phase contract.

    Raises:
      ValueError: an argument out of range (the message names it), at
        construction; the dense path above ``memory_limit`` (at ``init``).
      TypeError: ``update`` without ``value_fn``, or with one not in residual
        form (naming :func:`twophase.gauss_newton_objective`), at trace time.
    """
    cfg = _Config(
        tau=as_positive_finite("damping", damping),
        scaling=_as_choice("scaling", scaling, SCALINGS),
        solver=_as_choice("solver", solver, SOLVERS),
        dense_max_params=_as_count("dense_max_params", dense_max_params, 0),
        memory_limit=int(as_positive_finite("memory_limit", memory_limit)),
        geodesic=bool(geodesic),
        geodesic_ratio=as_positive_finite("geodesic_ratio", geodesic_ratio),
        chunk=as_positive_int("jacobian_chunk", jacobian_chunk, allow_none=True),
        cg_tolerance=as_open_unit("cg_tolerance", cg_tolerance),
        max_cg_iterations=_as_count("max_cg_iterations", max_cg_iterations, 1),
        sketch_size=_as_count("sketch_size", sketch_size, 1),
        sketch_refresh=_as_count("sketch_refresh", sketch_refresh, 1),
        seed=_as_count("seed", seed, 0),
        max_damping=as_positive_finite("max_damping", max_damping),
    )
    if cfg.max_damping <= cfg.tau:
        raise ValueError(
            f"`max_damping` must exceed `damping`, got max_damping={max_damping!r}, "
            f"damping={damping!r}."
        )

    def init_fn(params):
        return _init_state(cfg, params)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        return _update(cfg, updates, state, params, value_fn)

    return common.second_phase_transformation(init_fn, update_fn)
