"""The second-phase contract: what :func:`twophase.two_phase` reads from a second phase.

A second phase is any optax transformation. The switch, :func:`twophase.info`
and :func:`twophase.train` learn what it did from **fields of its state, by
name** (the first ``NamedTuple`` in the state that has the field), never from
its type:

================================  =============================================
field                             meaning
================================  =============================================
``value_and_grad_evals``          int32, cumulative full-batch value-and-gradient
                                  evaluations (line-search trials included). Its
                                  presence says: *this transformation evaluates
                                  ``value_fn`` itself*; ``update`` is called as
                                  ``update(updates, state, params, value_fn=f)``.
``value``                         scalar, the objective at the current (last
                                  accepted) point; ``+inf`` before the first
                                  evaluation.
``consecutive_failures``          int32, the current run of iterations that made
                                  no progress (failed line searches, rejected or
                                  non-finite steps); 0 after a success. Optional.
``hessian_vector_products``       int32, cumulative Hessian-vector products.
                                  Optional; each counts :data:`HVP_COST`
                                  evaluations on the cost axis.
================================  =============================================

:func:`twophase.nonlinear_cg` exposes all of them. A transformation that
exposes no ``value_and_grad_evals`` and takes ``value``, ``grad`` and
``value_fn`` as extra arguments, as ``optax.lbfgs()`` does, is wrapped by
:func:`evaluating`, which evaluates for it, counts, guards against non-finite
values and computes in float32 for lower-precision parameters.
:func:`twophase.two_phase` applies :func:`evaluating` by itself where needed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree
from jax import lax

from twophase import auxiliary as _aux
from twophase._control import eager_jit, owning_init, run_if
from twophase.objectives import as_value_and_grad

__all__ = [
    "HVP_COST",
    "EvaluatingState",
    "aux",
    "current_value",
    "evaluates_itself",
    "evaluating",
    "failures",
    "hessian_vector_products",
    "linesearch_failures",
    "value_and_grad_evals",
]

PyTree = Any

HVP_COST: float = 1.5
"""Wall time of one Hessian-vector product in units of one value+gradient evaluation:
"one HVP counts as 1.5 evaluations".

Measured by ``python benchmarks/cg_suite.py --newton-cg`` (the "HVP cost" table,
recorded in ``benchmarks/RESULTS.md``, section "Newton-CG"), float64 on this
project's 2 shared CPU cores: forward-over-reverse ``jax.jvp`` of ``jax.grad``
against ``jax.value_and_grad``, each called 200 times inside one jitted
``lax.fori_loop`` (no dispatch overhead), compiled first, the fastest of 15
interleaved runs. Problems: a 2-16-1 tanh MLP least squares (256 examples), a
2-64-1 one (4096 examples), the 1000-dimensional chained Rosenbrock function
and a 10000 x 20 logistic regression. An HVP at a new point each call cost
0.6-2.1 evaluations (median over the four problems 1.26, 1.35 and 1.46 in
three runs; the two MLPs 1.2-2.1); 1.5 is that median, rounded up. Pearlmutter's
operation count is about 2 (a forward and a reverse sweep, each carrying a
tangent); XLA's fusion makes it cheaper on these small problems. Inside the
inner CG loop the parameters do not change, and XLA hoists the parts of the
passes that do not depend on the vector out of the ``while_loop``: measured
that way an HVP cost 0.2-1.0 evaluations (median 0.55-0.61), so the constant
overstates the inner solve's cost. Use it to put HVPs and evaluations on one
scale: ``cost = value_and_grad_evals + HVP_COST * hessian_vector_products``.
"""


def nodes_with_field(tree: PyTree, name: str) -> list:
    """Every NamedTuple in ``tree`` that has the field ``name``, depth first (not
    looking inside those that have it): how the contract finds second phases."""

    def is_named(x):
        return isinstance(x, tuple) and hasattr(x, "_fields")

    found = []
    stack = [tree]
    while stack:
        node = stack.pop(0)
        if is_named(node) and name in node._fields:
            found.append(node)
        elif isinstance(node, (tuple, list)):
            stack[:0] = list(node)
        elif isinstance(node, dict):
            stack[:0] = list(node.values())
    return found


def _field(state: PyTree, name: str):
    """``name`` of the first NamedTuple in ``state`` (depth first) that has it, else None."""
    found = nodes_with_field(state, name)
    return getattr(found[0], name) if found else None


def evaluates_itself(state: PyTree) -> bool:
    """Whether a second phase with this state evaluates ``value_fn`` itself."""
    return _field(state, "value_and_grad_evals") is not None


def _int_field(state: PyTree, name: str) -> jax.Array:
    found = _field(state, name)
    return jnp.zeros([], jnp.int32) if found is None else jnp.asarray(found, jnp.int32)


def value_and_grad_evals(state: PyTree) -> jax.Array:
    """int32 cumulative evaluations a second-phase state reports (0 if none)."""
    return _int_field(state, "value_and_grad_evals")


def hessian_vector_products(state: PyTree) -> jax.Array:
    """int32 cumulative Hessian-vector products a second-phase state reports (0 if none)."""
    return _int_field(state, "hessian_vector_products")


def failures(state: PyTree) -> jax.Array:
    """int32 current run of failed iterations a second-phase state reports (0 if none)."""
    return _int_field(state, "consecutive_failures")


def linesearch_failures(state: PyTree) -> jax.Array:
    """Cumulative line searches that found no decrease (0 if not counted)."""
    return _int_field(state, "linesearch_failures")


def aux(state: PyTree) -> PyTree | None:
    """The auxiliary output at the current point (``None`` without one)."""
    return _field(state, "aux")


def current_value(state: PyTree) -> jax.Array:
    """The objective at the current point as the state holds it (``inf`` if none)."""
    found = _field(state, "value")
    return jnp.asarray(jnp.inf, jnp.float32) if found is None else jnp.asarray(found)


class EvaluatingState(NamedTuple):
    """State of :func:`evaluating`.

    Attributes:
      inner: the wrapped transformation's state (initialised on float32 copies
        of lower-precision parameters).
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


def _compute(tree: PyTree) -> PyTree:
    """Floating leaves below float32 promoted to float32."""
    return jax.tree.map(
        lambda x: (
            x.astype(jnp.promote_types(x.dtype, jnp.float32))
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
        ),
        tree,
    )


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
    reaches the parameters.

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

    def init_fn(params):
        izero = jnp.zeros([], jnp.int32)
        return EvaluatingState(
            inner=_strongly_typed(inner.init(_compute(params))),
            value=jnp.asarray(jnp.inf, _value_dtype(params)),
            value_and_grad_evals=izero,
            consecutive_failures=izero,
            nonfinite_events=izero,
            linesearch_failures=izero,
            aux=None,
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
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
        with_aux = state.aux is not None

        scalar_fn = _aux.scalar_objective(value_fn)

        def objective(wide_params):
            return scalar_fn(optax.tree.cast_like(wide_params, params))

        wide = _compute(params)
        dtype = state.value.dtype
        value_and_grad = as_value_and_grad(objective, wide)
        value, grad, evaluated = _value_and_grad_from_state(
            state.inner, wide, value_and_grad, dtype
        )
        new_updates, inner_state = inner.update(
            grad, state.inner, wide, value=value, grad=grad, value_fn=objective, **extra_args
        )
        inner_state = _strongly_typed(inner_state)
        evals = evaluated.astype(jnp.int32) + _linesearch_evals(inner_state)
        new_value = _field(inner_state, "value")
        new_value = value if new_value is None else jnp.asarray(new_value, dtype)
        finite = jnp.isfinite(value) & jnp.isfinite(new_value) & _all_finite(new_updates)
        progressed = finite & (new_value < value)
        fresh = _strongly_typed(inner.init(wide))
        aux = state.aux
        if with_aux:
            new_params = optax.apply_updates(params, optax.tree.cast_like(new_updates, params))
            aux = run_if(
                progressed, lambda old: _aux.as_template(value_fn(new_params)[1], old), state.aux
            )
            evals = evals + progressed.astype(jnp.int32)
        return (
            optax.tree.cast_like(
                optax.tree.where(progressed, new_updates, optax.tree.zeros_like(new_updates)),
                params,
            ),
            EvaluatingState(
                inner=optax.tree.where(progressed, inner_state, fresh),
                value=jnp.where(finite, new_value, jnp.where(jnp.isfinite(value), value, jnp.inf)),
                value_and_grad_evals=state.value_and_grad_evals + evals,
                consecutive_failures=jnp.where(progressed, 0, state.consecutive_failures + 1),
                nonfinite_events=state.nonfinite_events + (~finite).astype(jnp.int32),
                linesearch_failures=state.linesearch_failures
                + (finite & ~progressed).astype(jnp.int32),
                aux=aux,
            ),
        )

    return optax.GradientTransformationExtraArgs(owning_init(init_fn), eager_jit(update_fn))


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _strongly_typed(tree: PyTree) -> PyTree:
    """Drops weak types (``optax.lbfgs`` initialises some scalars weakly typed
    and returns them strongly typed, which would retrace a jitted step once)."""
    return jax.tree.map(lambda x: lax.convert_element_type(x, jnp.asarray(x).dtype), tree)


def _value_dtype(params: PyTree) -> jnp.dtype:
    leaves = [
        x for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    return jnp.promote_types(jnp.result_type(*leaves) if leaves else jnp.float32, jnp.float32)


def _value_and_grad_from_state(inner_state, params, value_and_grad, dtype):
    """(value, grad, evaluated) at ``params``: from the ``value``/``grad`` the
    inner state stored when finite, else evaluated (``evaluated`` says which)."""
    stored_value = _field(inner_state, "value")
    stored_grad = _field(inner_state, "grad")
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


def _linesearch_evals(inner_state) -> jax.Array:
    """Evaluations of the last line search an inner state reports
    (``num_linesearch_steps``, each trial one value-and-gradient), 0 if none."""
    found = _field(inner_state, "num_linesearch_steps")
    return jnp.zeros([], jnp.int32) if found is None else jnp.asarray(found, jnp.int32)
