"""Objectives: turning a loss into the ``value_fn`` the CG phase evaluates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["as_value_and_grad"]

PyTree = Any


def as_value_and_grad(
    value_fn: Callable[[PyTree], jax.Array], params: PyTree
) -> Callable[[PyTree], tuple[jax.Array, PyTree]]:
    """``jax.value_and_grad(value_fn)``, checking at trace time that ``value_fn``
    maps ``params`` to a real scalar.

    Raises:
      TypeError: ``value_fn`` is not callable, or returns something other than a
        real floating scalar (shape ``()`` or ``(1,)``).
    """
    if not callable(value_fn):
        raise TypeError(f"`value_fn` must be callable (params -> scalar), got {value_fn!r}.")
    out = jax.eval_shape(value_fn, params)
    if not hasattr(out, "shape") or out.shape not in ((), (1,)):
        raise TypeError(
            "`value_fn` must return a scalar objective, got "
            f"{getattr(out, 'shape', type(out).__name__)}."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"`value_fn` must return a real floating scalar, got dtype {out.dtype}.")

    def scalar_fn(p):
        return jnp.reshape(value_fn(p), ())

    return jax.value_and_grad(scalar_fn)
