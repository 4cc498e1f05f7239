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
``jacobian_evals``                int32, cumulative residual Jacobians built.
                                  Optional; each counts :data:`JACOBIAN_COST`.
================================  =============================================

:func:`twophase.nonlinear_cg` exposes all of them. A transformation that
exposes no ``value_and_grad_evals`` and takes ``value``, ``grad`` and
``value_fn`` as extra arguments, as ``optax.lbfgs()`` does, is wrapped by
:func:`twophase.evaluating` (:mod:`twophase.second_phase.evaluating`).

Every lookup by field name in the package goes through :func:`states_with_field`,
:func:`field` and :func:`replace_states`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax.tree
from optax.tree_utils import NamedTupleKey

__all__ = [
    "HVP_COST",
    "JACOBIAN_COST",
    "aux",
    "cost",
    "current_value",
    "evaluates_itself",
    "failures",
    "field",
    "has_field",
    "hessian_vector_products",
    "jacobian_evals",
    "linesearch_failures",
    "replace_states",
    "states_with_field",
    "value_and_grad_evals",
]

PyTree = Any

HVP_COST: float = 1.5
"""Wall time of one Hessian-vector product in units of one value+gradient evaluation,
to put both on one cost axis: ``cost = value_and_grad_evals + HVP_COST * hessian_vector_products``.
How it was measured: ``benchmarks/RESULTS.md``, section "Newton-CG"."""

JACOBIAN_COST: float = 17.0
"""Wall time of one residual Jacobian (per-point reverse mode under ``jax.vmap``, a
tanh PINN of about 900 parameters and 1200 residuals) in units of one value+gradient
evaluation; it grows with the parameter count. ``jacobian_evals`` times this is the
lower bound a second phase's Jacobians add to the cost axis (forming ``J^T J`` costs
more). How it was measured: ``benchmarks/RESULTS.md``, section "Levenberg-Marquardt"."""


def cost(evals: jax.Array, hvps: jax.Array, jacobians: jax.Array) -> jax.Array:
    """float32 evaluation-equivalents of ``evals`` value+gradient evaluations,
    ``hvps`` Hessian-vector products and ``jacobians`` residual Jacobians."""
    as32 = lambda x: jnp.asarray(x).astype(jnp.float32)
    return as32(evals) + HVP_COST * as32(hvps) + JACOBIAN_COST * as32(jacobians)


def has_field(node: Any, name: str) -> bool:
    """Whether ``node`` is a NamedTuple with the field ``name``."""
    return isinstance(node, tuple) and name in getattr(node, "_fields", ())


def states_with_field(tree: PyTree, name: str) -> list:
    """Every NamedTuple in ``tree`` that has the field ``name``, in the order of
    ``jax.tree.leaves`` (through any registered pytree), not looking inside
    those that have it: how the contract finds second-phase states."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: has_field(x, name))
    return [node for node in nodes if has_field(node, name)]


def field(tree: PyTree, name: str, default: Any = None) -> Any:
    """``name`` of the first NamedTuple in ``tree`` that has it, else ``default``.

    Built on :func:`optax.tree.get_all_with_path`, restricted to NamedTuple
    fields (a parameter dict with a key ``"value"`` is not a match); its first
    match is the outermost state of the first subtree that holds one.
    """
    found = optax.tree.get_all_with_path(
        tree, name, filtering=lambda path, _: bool(path) and isinstance(path[-1], NamedTupleKey)
    )
    return found[0][1] if found else default


def replace_states(tree: PyTree, name: str, fn: Callable[[Any], Any]) -> PyTree:
    """``tree`` with every NamedTuple that has the field ``name`` (as
    :func:`states_with_field` finds them) replaced by ``fn(node)``."""
    return jax.tree.map(
        lambda node: fn(node) if has_field(node, name) else node,
        tree,
        is_leaf=lambda x: has_field(x, name),
    )


def evaluates_itself(state: PyTree) -> bool:
    """Whether a second phase with this state evaluates ``value_fn`` itself."""
    return field(state, "value_and_grad_evals") is not None


def _int_field(state: PyTree, name: str) -> jax.Array:
    found = field(state, name)
    return jnp.zeros([], jnp.int32) if found is None else jnp.asarray(found, jnp.int32)


def value_and_grad_evals(state: PyTree) -> jax.Array:
    """int32 cumulative evaluations a second-phase state reports (0 if none)."""
    return _int_field(state, "value_and_grad_evals")


def hessian_vector_products(state: PyTree) -> jax.Array:
    """int32 cumulative Hessian-vector products a second-phase state reports (0 if none)."""
    return _int_field(state, "hessian_vector_products")


def jacobian_evals(state: PyTree) -> jax.Array:
    """int32 cumulative residual Jacobians a second-phase state reports (0 if none)."""
    return _int_field(state, "jacobian_evals")


def failures(state: PyTree) -> jax.Array:
    """int32 current run of failed iterations a second-phase state reports (0 if none)."""
    return _int_field(state, "consecutive_failures")


def linesearch_failures(state: PyTree) -> jax.Array:
    """Cumulative line searches that found no decrease (0 if not counted)."""
    return _int_field(state, "linesearch_failures")


def aux(state: PyTree) -> PyTree | None:
    """The auxiliary output at the current point (``None`` without one)."""
    return field(state, "aux")


def current_value(state: PyTree) -> jax.Array:
    """The objective at the current point as the state holds it (``inf`` if none)."""
    found = field(state, "value")
    return jnp.asarray(jnp.inf, jnp.float32) if found is None else jnp.asarray(found)
