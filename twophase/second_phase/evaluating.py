"""``evaluating``: the adapter that makes ``optax.lbfgs`` and friends second phases.

A transformation that exposes no ``value_and_grad_evals`` and takes ``value``,
``grad`` and ``value_fn`` as extra arguments, as ``optax.lbfgs()`` does, is
wrapped by :func:`evaluating`, which evaluates for it, counts, guards against
non-finite values and computes in float32 for lower-precision parameters.
:func:`twophase.two_phase` applies it by itself where needed.

Stages of one ``update`` (module-level functions): :func:`cached_value_and_grad`
(the inner state's stored point, else an evaluation), the inner step,
:func:`linesearch_evals` (what its line search cost), :func:`aux_at` (the
auxiliary output at the new point) and :func:`accept_or_reset`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree
from jax import lax

from twophase import auxiliary as _aux
from twophase._control import run_if
from twophase._numerics import all_finite
from twophase.objectives import as_value_and_grad
from twophase.second_phase import common
from twophase.second_phase.contract import field

__all__ = [
    "EvaluatingState",
    "accept_or_reset",
    "aux_at",
    "cached_value_and_grad",
    "evaluating",
    "init_state",
    "linesearch_evals",
    "update",
]

PyTree = Any


class EvaluatingState(NamedTuple):
    """State of :func:`evaluating`.

    Attributes:
      inner: the wrapped transformation's state (initialised on float32 copies
        of lower-precision parameters; ``optax.EmptyState()`` for parameters
        without leaves).
      value: objective at the current point, ``+inf`` before the first
        evaluation and after a non-finite step.
      value_and_grad_evals: int32 cumulative evaluations: at the current point
        when the inner state holds no finite ``value``/``grad``, plus the
        ``num_linesearch_steps`` an optax zoom line search in ``inner`` reports.
        With an ``aux`` (``value_fn`` returning ``(loss, aux)``), plus one per
        step that moved: the forward evaluation for the ``aux`` at the accepted
        point (charged as a full evaluation; an optax line search does not
        return it).
      consecutive_failures: int32 current run of steps that did not lower the
        objective or were not finite (the update was then zero).
      nonfinite_events: int32 steps whose update or new value was not finite.
      linesearch_failures: int32 cumulative finite steps that did not lower the
        objective (a line search that accepted a zero or uphill step); each
        resets ``inner`` (a restart from steepest descent).
      aux: the auxiliary output at the current point when ``value_fn`` returns
        ``(loss, aux)``, else ``None`` (see :mod:`twophase.auxiliary`).
    """

    inner: PyTree
    value: jax.Array
    value_and_grad_evals: jax.Array
    consecutive_failures: jax.Array
    nonfinite_events: jax.Array
    linesearch_failures: jax.Array
    aux: PyTree = None


def evaluating(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """A second phase that evaluates the objective for ``inner``.

    ``inner`` follows ``optax.lbfgs``'s convention: ``update(grad, state,
    params, value=f, grad=g, value_fn=fn)`` with ``f, g`` the objective and its
    gradient at ``params``. The wrapper takes them from the ``value``/``grad``
    stored in ``inner``'s state when finite (as
    :func:`optax.value_and_grad_from_state` does), else evaluates them, so
    nothing is evaluated twice. Arithmetic is in float32 at least: ``inner``
    sees float32 copies of bfloat16/float16 parameters (``value_fn`` is still
    called on parameters of the original dtypes). A step whose update or new
    value is not finite, or that does not lower the objective, is dropped (zero
    update), ``inner`` is reset and the failure counted, so nothing non-finite
    reaches the parameters. Parameters without leaves are a no-op.

    Args:
      inner: an optax transformation, e.g. ``optax.lbfgs()``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`EvaluatingState`, honouring the second-phase contract.

    Raises:
      ValueError: ``inner`` is not a transformation.
      TypeError: ``update`` without ``value_fn`` (at trace time).
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise ValueError(f"`inner` must be an optax GradientTransformation, got {inner!r}.")
    inner = optax.with_extra_args_support(inner)
    return common.second_phase_transformation(
        functools.partial(init_state, inner), functools.partial(update, inner)
    )


def init_state(inner: optax.GradientTransformationExtraArgs, params: PyTree) -> EvaluatingState:
    """A fresh :class:`EvaluatingState`; ``inner`` initialised on the compute-dtype
    parameters (not at all for parameters without leaves: a no-op needs no state)."""
    izero = jnp.zeros([], jnp.int32)
    empty = not jax.tree.leaves(params)
    return EvaluatingState(
        inner=optax.EmptyState()
        if empty
        else common.strongly_typed(inner.init(common.to_compute(params))),
        value=jnp.asarray(jnp.inf, common.scalar_dtype(params)),
        value_and_grad_evals=izero,
        consecutive_failures=izero,
        nonfinite_events=izero,
        linesearch_failures=izero,
        aux=None,
    )


def update(inner, updates, state, params=None, *, value_fn=None, **extra_args):
    """One step of ``inner`` with the objective evaluated for it: the ``update``
    of :func:`evaluating`."""
    del updates
    extra_args.pop("grad", None)
    extra_args.pop("value", None)
    if value_fn is None:
        raise TypeError(
            "the second phase requires the keyword argument `value_fn` "
            "(params -> full-batch objective)."
        )
    if params is None:
        raise TypeError("the second phase requires `params`.")
    state = _aux.prepare_aux(state, value_fn, params)
    scalar_fn = _aux.scalar_objective(value_fn)

    def objective(wide_params):
        return scalar_fn(optax.tree.cast_like(wide_params, params))

    wide = common.to_compute(params)
    dtype = state.value.dtype
    value, grad, evaluated = cached_value_and_grad(
        state.inner, wide, as_value_and_grad(objective, wide), dtype
    )
    new_updates, inner_state = inner.update(
        grad, state.inner, wide, value=value, grad=grad, value_fn=objective, **extra_args
    )
    inner_state = common.strongly_typed(inner_state)
    new_value = field(inner_state, "value")
    new_value = value if new_value is None else jnp.asarray(new_value, dtype)
    evals = evaluated.astype(jnp.int32) + linesearch_evals(inner_state)
    step = (value, new_value, new_updates, inner_state, evals)
    return accept_or_reset(inner, state, params, value_fn, step)


def cached_value_and_grad(inner_state, params, value_and_grad, dtype):
    """(value, grad, evaluated) at ``params``: from the ``value``/``grad`` the
    inner state stored when finite, else evaluated (``evaluated`` says which)."""
    stored_value = field(inner_state, "value")
    stored_grad = field(inner_state, "grad")
    if stored_value is None or stored_grad is None:
        value, grad = value_and_grad(params)
        return jnp.asarray(value, dtype), grad, jnp.ones([], bool)
    cached = jnp.isfinite(stored_value)
    value, grad = lax.cond(
        cached,
        lambda: (jnp.asarray(stored_value, dtype), optax.tree.cast_like(stored_grad, params)),
        lambda: jax.tree.map(
            lambda x, ref: jnp.asarray(x).astype(ref.dtype),
            value_and_grad(params),
            (jnp.zeros([], dtype), params),
        ),
    )
    return value, grad, ~cached


def linesearch_evals(inner_state) -> jax.Array:
    """Evaluations of the last line search an inner state reports
    (``num_linesearch_steps``, each trial one value-and-gradient), 0 if none."""
    found = field(inner_state, "num_linesearch_steps")
    return jnp.zeros([], jnp.int32) if found is None else jnp.asarray(found, jnp.int32)


def aux_at(value_fn, params, new_updates, progressed, old_aux):
    """The auxiliary output at ``params + new_updates`` when the step
    ``progressed`` (one forward evaluation), else ``old_aux``."""
    new_params = optax.apply_updates(params, optax.tree.cast_like(new_updates, params))
    return run_if(progressed, lambda old: _aux.as_template(value_fn(new_params)[1], old), old_aux)


def accept_or_reset(inner, state: EvaluatingState, params, value_fn, step):
    """The update and state after ``inner``'s step ``step = (value, new_value,
    new_updates, inner_state, evals)``: kept when finite and lower, else a zero
    update, ``inner`` reset and the failure counted."""
    value, new_value, new_updates, inner_state, evals = step
    finite = jnp.isfinite(value) & jnp.isfinite(new_value) & all_finite(new_updates)
    progressed = finite & (new_value < value)
    aux = state.aux
    if aux is not None:
        aux = aux_at(value_fn, params, new_updates, progressed, state.aux)
        evals = evals + progressed.astype(jnp.int32)
    fresh = common.strongly_typed(inner.init(common.to_compute(params)))
    kept = optax.tree.where(progressed, new_updates, optax.tree.zeros_like(new_updates))
    return optax.tree.cast_like(kept, params), EvaluatingState(
        inner=optax.tree.where(progressed, inner_state, fresh),
        value=jnp.where(finite, new_value, jnp.where(jnp.isfinite(value), value, jnp.inf)),
        value_and_grad_evals=state.value_and_grad_evals + evals,
        consecutive_failures=jnp.where(progressed, 0, state.consecutive_failures + 1),
        nonfinite_events=state.nonfinite_events + (~finite).astype(jnp.int32),
        linesearch_failures=state.linesearch_failures + (finite & ~progressed).astype(jnp.int32),
        aux=aux,
    )
