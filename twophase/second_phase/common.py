"""The shared toolkit of the second phases (public names of an internal module).

Every second phase (:mod:`~twophase.second_phase.cg`,
:mod:`~twophase.second_phase.newton_cg`, :mod:`~twophase.second_phase.evaluating`)
builds its iteration from these pieces, so that a new one (Levenberg-Marquardt,
say) is one module:

* dtypes: :func:`compute_dtype`, :func:`scalar_dtype`, :func:`to_compute`;
* tree arithmetic that keeps dtypes and never lets a NaN through:
  :func:`vdot`, :func:`safe_divide`, :func:`select`, :func:`scaled_update`,
  :func:`zero_if_nonfinite`, :func:`scale_tree`, :func:`add_scaled`,
  :func:`unit_pow2`;
* stages: :func:`value_here` (evaluate here, or reuse the cached point),
  :func:`held` (an iteration that does not move), :func:`line_function` (the
  one-dimensional function a line search evaluates);
* the diagonal preconditioner: :func:`initial_preconditioner`,
  :func:`preconditioner_scales`, :func:`apply_scales`, and
  :func:`set_preconditioner` (the handover from the first phase);
* the shared options: :data:`LINESEARCHES` / :func:`resolve_linesearch`,
  :data:`INITIAL_STEP_RULES` / :func:`warm_step`;
* :func:`second_phase_transformation`, which every second phase's
  ``init``/``update`` pass through: an empty parameter tree is a no-op, a fresh
  state shares no buffer between fields (so it can be donated), and an
  un-jitted ``update`` compiles once per shape (:func:`twophase._control.eager_jit`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.tree
from jax import lax

from twophase._control import eager_jit, fresh_buffers
from twophase._numerics import all_finite, finite_and_norm
from twophase.second_phase import linesearch as _ls
from twophase.second_phase.contract import replace_states

__all__ = [
    "INITIAL_STEP_RULES",
    "LINESEARCHES",
    "add_scaled",
    "apply_scales",
    "check_initial_step",
    "compute_dtype",
    "held",
    "initial_preconditioner",
    "line_function",
    "must_recheck",
    "preconditioner_scales",
    "resolve_linesearch",
    "safe_divide",
    "scalar_dtype",
    "scale_tree",
    "scaled_update",
    "second_phase_transformation",
    "select",
    "set_preconditioner",
    "strongly_typed",
    "to_compute",
    "unchanged",
    "unit_pow2",
    "value_here",
    "vdot",
    "warm_step",
    "zero_if_nonfinite",
]

PyTree = Any

# --------------------------------------------------------------------------- dtypes


def compute_dtype(dtype) -> jnp.dtype:
    """Dtype of a second phase's arithmetic for parameters of ``dtype``: at
    least float32 (bfloat16 and float16 are too coarse for line searches)."""
    return jnp.promote_types(dtype, jnp.float32)


def scalar_dtype(params: PyTree) -> jnp.dtype:
    """Dtype of a second phase's scalars (value, slope, step) for ``params``:
    :func:`compute_dtype` of the inexact leaves, float32 without any."""
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.dtype(jnp.float32)
    return compute_dtype(jnp.result_type(*leaves))


def to_compute(tree: PyTree) -> PyTree:
    """``tree`` with every inexact leaf in :func:`compute_dtype` of its own dtype
    (integer leaves unchanged)."""

    def widen(x):
        dtype = jnp.result_type(x)
        return jnp.asarray(x, compute_dtype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else dtype)

    return jax.tree.map(widen, tree)


def strongly_typed(tree: PyTree) -> PyTree:
    """Drops weak types (``optax.lbfgs`` initialises some scalars weakly typed
    and returns them strongly typed, which would retrace a jitted step once)."""
    return jax.tree.map(lambda x: lax.convert_element_type(x, jnp.asarray(x).dtype), tree)


# --------------------------------------------------------------------------- tree arithmetic


def vdot(a: PyTree, b: PyTree) -> jax.Array:
    """``optax.tree.vdot``; a float32 zero for trees without leaves."""
    if not jax.tree.leaves(a):
        return jnp.zeros([], jnp.float32)
    return jnp.asarray(optax.tree.vdot(a, b))


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, or 0 when the denominator is too small to
    trust in its dtype (below ``tiny / eps``): a beta rule then restarts, a
    step guess falls back to its default."""
    numerator, denominator = jnp.asarray(numerator), jnp.asarray(denominator)
    dtype = jnp.result_type(numerator, denominator)
    tiny = jnp.finfo(dtype).tiny / jnp.finfo(dtype).eps
    ok = jnp.abs(denominator) > tiny
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1), 0).astype(dtype)


def select(condition: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise ``jnp.where(condition, on_true, on_false)`` for a scalar condition."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def scaled_update(step: jax.Array, direction: PyTree, params: PyTree) -> PyTree:
    """``step * direction`` cast leafwise to the parameters' dtypes: the exact
    update returned, and the one the line search evaluates."""
    return jax.tree.map(lambda d, p: (step * d).astype(jnp.result_type(p)), direction, params)


def zero_if_nonfinite(tree: PyTree) -> PyTree:
    """``tree``, or zeros like it when any entry is not finite: a NaN never
    reaches the parameters."""
    if not jax.tree.leaves(tree):
        return tree
    finite = all_finite(tree)
    return jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), tree)


def scale_tree(factor: jax.Array, tree: PyTree) -> PyTree:
    """``factor * tree``, each leaf keeping its dtype."""
    return jax.tree.map(lambda x: (factor * x).astype(x.dtype), tree)


def add_scaled(tree: PyTree, factor: jax.Array, other: PyTree) -> PyTree:
    """``tree + factor * other``, each leaf keeping ``tree``'s dtype."""
    return jax.tree.map(lambda x, y: (x + factor * y).astype(x.dtype), tree, other)


def unit_pow2(tree: PyTree) -> jax.Array:
    """A power of two ``c`` with ``c * max|tree|`` in ``[0.5, 1)`` (1 for a zero
    or non-finite tree), in the dtype of ``tree``'s scalars.

    Multiplying by it is exact, and a linear solve scaled by it returns the
    same digits: what keeps cubic inner products such as ``<g, H g>`` (which
    grow like the objective's scale cubed) inside float32's range.
    """
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree) if jnp.size(x) > 0]
    if not leaves:
        return jnp.ones([], jnp.float32)
    big = jnp.max(jnp.stack([x.astype(jnp.result_type(*leaves)) for x in leaves]))
    usable = jnp.isfinite(big) & (big > 0)
    _, exponent = jnp.frexp(jnp.where(usable, big, 1))
    return jnp.where(usable, jnp.ldexp(jnp.ones([], big.dtype), -exponent), 1).astype(big.dtype)


# --------------------------------------------------------------------------- stages


def value_here(state, value_grad_aux, params, recheck=False):
    """A second phase's first stage: ``(value, grad, aux, cached, evals)`` at
    ``params``, from ``state``'s cache (the previous line search's accepted
    point) when its ``value`` is finite and ``recheck`` (bool scalar) is false,
    else evaluated (``evals``: the state's cumulative count including this
    evaluation). Reusing the cache is what makes an iteration cost one
    evaluation less. A second phase passes ``recheck`` after a call that did
    not move (:func:`must_recheck`): the objective may have changed since its
    cache was filled (loss weights, resampled residual points), and only a
    fresh evaluation can tell."""
    dtype = state.value.dtype

    def evaluate(_):
        value, grad, aux = value_grad_aux(params)
        return value.astype(dtype), to_compute(grad), aux, jnp.ones([], jnp.int32)

    def reuse(_):
        return state.value, state.grad, state.aux, jnp.zeros([], jnp.int32)

    cached = jnp.isfinite(state.value) & ~jnp.asarray(recheck, bool)
    value, grad, aux, new_evals = lax.cond(cached, reuse, evaluate, None)
    return value, grad, aux, cached, state.value_and_grad_evals + new_evals


def must_recheck(state, grad_tol) -> jax.Array:
    """bool scalar: the cache of ``state`` is not to be trusted, because the
    previous call did not move: it failed (``consecutive_failures > 0``) or
    held at a cached gradient no larger than ``grad_tol``. Repeating such a
    call on the cache would repeat it forever, even after the objective has
    changed."""
    _, cached_norm = finite_and_norm(state.grad)
    converged = cached_norm.astype(state.value.dtype) <= jnp.asarray(grad_tol, state.value.dtype)
    return (state.consecutive_failures > 0) | converged


def unchanged(value: jax.Array, cached: jax.Array) -> jax.Array:
    """bool scalar: a fresh ``value`` equals the ``cached`` one at the same
    point up to the rounding of a differently compiled evaluation (a relative
    ``1000 eps``): the objective did not change."""
    eps = jnp.finfo(jnp.result_type(value)).eps
    size = jnp.maximum(jnp.abs(value), jnp.abs(cached))
    return jnp.abs(value - cached) <= 1000 * eps * size


def held(state, finite_here, value, grad, aux, evals):
    """A second phase's state after an iteration that does not move (converged,
    or no finite value or gradient here): keeps a finite evaluation, counts a
    non-finite one as a failure."""
    nonfinite = (~finite_here).astype(jnp.int32)
    return state._replace(
        value=jnp.where(finite_here, value, jnp.inf).astype(state.value.dtype),
        grad=select(finite_here, grad, state.grad),
        aux=select(finite_here, aux, state.aux),
        value_and_grad_evals=evals,
        nonfinite_events=state.nonfinite_events + nonfinite,
        consecutive_failures=state.consecutive_failures + nonfinite,
    )


def line_function(value_grad_aux, params, direction, dtype):
    """``step -> (value, (grad, aux), slope)`` at ``params + step * direction``:
    the function a :class:`~twophase.second_phase.linesearch.LineSearch`
    searches. The auxiliary output rides with the gradient, which the search
    only carries, so it comes back for the accepted point."""

    def evaluate(step):
        delta = scaled_update(step, direction, params)
        f, g, a = value_grad_aux(optax.apply_updates(params, delta))
        g = to_compute(g)
        return f.astype(dtype), (g, a), vdot(g, direction).astype(dtype)

    return evaluate


# --------------------------------------------------------------------------- preconditioner


def initial_preconditioner(preconditioner: Any, params: PyTree) -> PyTree | None:
    """The stored diagonal preconditioner a second phase starts with: ``None``
    unless ``preconditioner`` is stored (``"state"``: ones, to be set by a
    handover; a pytree: broadcast to the parameters); in the compute dtype."""
    if preconditioner is None or callable(preconditioner):
        return None
    if isinstance(preconditioner, str):
        return to_compute(optax.tree.ones_like(params))
    return jax.tree.map(
        lambda p, x: jnp.broadcast_to(jnp.asarray(p, compute_dtype(x.dtype)), x.shape),
        preconditioner,
        params,
    )


def preconditioner_scales(state, preconditioner, params):
    """The diagonal preconditioner of this iteration: the one stored in
    ``state``, else a callable's ``preconditioner(params, state)``, else ``None``."""
    if state.preconditioner is not None:
        return state.preconditioner
    if callable(preconditioner):
        return to_compute(preconditioner(params, state))
    return None


def apply_scales(scales: PyTree | None, tree: PyTree) -> PyTree:
    """``scales * tree`` leafwise (``tree`` itself without a preconditioner)."""
    return tree if scales is None else optax.tree.mul(scales, tree)


def set_preconditioner(state: PyTree, scales: PyTree) -> PyTree:
    """Returns ``state`` with every nested second-phase state's stored
    preconditioner replaced by ``scales`` (positive, shaped like the parameters).

    The states are found by field name: every NamedTuple with a
    ``preconditioner`` field (:class:`twophase.NonlinearCGState`, whose next direction is
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
        if node.preconditioner is None:
            raise ValueError(
                f"`state` holds a {type(node).__name__} without a stored preconditioner; "
                "build it with preconditioner='state'."
            )
        new = jax.tree.map(lambda s, old: jnp.asarray(s, old.dtype), scales, node.preconditioner)
        node = node._replace(preconditioner=new)
        if "restart_next" in node._fields:
            node = node._replace(restart_next=jnp.asarray(True))
        return node

    return replace_states(state, "preconditioner", replace)


# --------------------------------------------------------------------------- options

LINESEARCHES: dict[str, Callable[..., _ls.LineSearch]] = {
    "wolfe": _ls.wolfe_linesearch,
    "golden": _ls.golden_section_linesearch,
}
"""The line searches a second phase accepts by name."""


def resolve_linesearch(linesearch: str | _ls.LineSearch, **wolfe_options) -> _ls.LineSearch:
    """``linesearch`` itself, or the search its name in :data:`LINESEARCHES`
    builds (``"wolfe"`` with ``wolfe_options``, a phase's own defaults).

    Raises:
      ValueError: neither a name in :data:`LINESEARCHES` nor a ``LineSearch``.
    """
    if isinstance(linesearch, _ls.LineSearch):
        return linesearch
    if isinstance(linesearch, str) and linesearch in LINESEARCHES:
        options = wolfe_options if linesearch == "wolfe" else {}
        return LINESEARCHES[linesearch](**options)
    raise ValueError(
        f"`linesearch` must be one of {sorted(LINESEARCHES)} or a twophase.LineSearch, "
        f"got {linesearch!r}."
    )


INITIAL_STEP_RULES = ("unit", "slope", "quadratic", "max")
"""First trial steps of a line search after the first iteration (each phase
accepts a subset): ``"unit"`` 1; ``"slope"`` Nocedal & Wright (3.60),
``step_{k-1} <g_{k-1}, d_{k-1}> / <g_k, d_k>``; ``"quadratic"``
``1.01 * 2 (f_k - f_{k-1}) / <g_k, d_k>`` (scipy's); ``"max"`` the larger."""


def check_initial_step(initial_step: str, allowed: tuple[str, ...]) -> None:
    """ValueError unless ``initial_step`` is one of ``allowed``."""
    if initial_step not in allowed:
        raise ValueError(f"`initial_step` must be one of {list(allowed)}, got {initial_step!r}.")


def warm_step(rule: str, value, value_prev, slope, step_prev, slope_prev) -> jax.Array:
    """The first trial step ``rule`` (in :data:`INITIAL_STEP_RULES`) suggests from
    the last iteration; may be non-finite or non-positive (the caller falls back)."""
    if rule == "unit":
        return jnp.ones([], jnp.result_type(slope))
    by_slope = step_prev * safe_divide(slope_prev, slope)
    by_quadratic = 1.01 * 2.0 * safe_divide(value - value_prev, slope)
    return {
        "slope": by_slope,
        "quadratic": by_quadratic,
        "max": jnp.maximum(by_slope, by_quadratic),
    }[rule]


# --------------------------------------------------------------------------- transformations


def second_phase_transformation(
    init_fn: Callable[[PyTree], PyTree], update_fn: Callable[..., Any]
) -> optax.GradientTransformationExtraArgs:
    """A second phase from its ``init_fn`` and ``update_fn``, with the guarantees
    every second phase gives:

    * a parameter tree without leaves ({}, or an ``optax.partition`` label that
      owns none) is a no-op: ``update`` returns it as the (empty) update and
      the state unchanged, without calling ``value_fn``;
    * ``init`` returns a state whose arrays are buffers of their own
      (:func:`twophase._control.fresh_buffers`);
    * an un-jitted ``update`` compiles once per shape (:func:`twophase._control.eager_jit`).
    """
    compiled = eager_jit(update_fn)

    def init(params):
        return fresh_buffers(init_fn(params))

    def update(updates, state, params=None, *, value_fn=None, **extra_args):
        tree = updates if params is None else params
        if not jax.tree.leaves(tree):
            return tree, state
        return compiled(updates, state, params, value_fn=value_fn, **extra_args)

    return optax.GradientTransformationExtraArgs(init, update)
