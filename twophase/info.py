"""``twophase.info(state)``: one diagnostics record over any nesting of our states."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax.tree

from twophase.cg import NonlinearCGState

__all__ = ["Info", "info"]


class Info(NamedTuple):
    """Diagnostics of a twophase optimizer state (all scalars).

    Fields that the state does not hold are ``None``.

    Attributes:
      cg_iterations: int32, CG iterations (line searches) made.
      value_and_grad_evals: int32, evaluations of the full-batch objective with its
        gradient made by the CG phase (and by exact-norm detectors, where present).
      restarts: int32, steepest-descent restarts after the first CG iteration.
      linesearch_failures: int32, line searches that found no decrease.
      value: objective at the current point as last evaluated by CG (``inf``
        before the first evaluation).
      grad_norm: Euclidean norm of the gradient stored with ``value``.
      nonfinite_events: int32, updates skipped because of non-finite values.
    """

    cg_iterations: jax.Array | None = None
    value_and_grad_evals: jax.Array | None = None
    restarts: jax.Array | None = None
    linesearch_failures: jax.Array | None = None
    value: jax.Array | None = None
    grad_norm: jax.Array | None = None
    nonfinite_events: jax.Array | None = None


def _find(state: Any, kind: type) -> list:
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
    return [n for n in nodes if isinstance(n, kind)]


def info(state: Any) -> Info:
    """Diagnostics view of ``state``: a bare :func:`twophase.nonlinear_cg` state
    or any pytree that nests one (``optax.chain``, ``optax.inject_hyperparams``,
    ...). Pure and jit-compatible.

    Raises:
      ValueError: ``state`` holds no twophase state, or several (ambiguous).
    """
    found = _find(state, NonlinearCGState)
    if not found:
        raise ValueError("`state` holds no twophase optimizer state.")
    if len(found) > 1:
        raise ValueError(f"`state` holds {len(found)} nonlinear_cg states; pass one of them.")
    cg = found[0]
    return Info(
        cg_iterations=cg.cg_iterations,
        value_and_grad_evals=cg.value_and_grad_evals,
        restarts=cg.restarts,
        linesearch_failures=cg.linesearch_failures,
        value=cg.value,
        grad_norm=optax.tree.norm(cg.grad).astype(jnp.result_type(cg.value)),
        nonfinite_events=cg.nonfinite_events,
    )
