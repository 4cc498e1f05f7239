"""Control flow that updates its operand in place."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["run_if"]


def run_if(
    pred: jax.Array, fn: Callable[[Any], Any], operand: Any, *, differentiable: bool = True
) -> Any:
    """``fn(operand)`` where the scalar bool ``pred`` holds, else ``operand``.

    Semantically ``lax.cond(pred, fn, lambda x: x, operand)``: only one of the
    two runs. Written as a ``lax.while_loop`` that runs its body zero or one
    time because XLA updates a loop's carry in place, whereas a ``conditional``
    copies buffers that a branch passes through unchanged (in the compiled
    phase-0 step of ``two_phase``: CG's two parameter-sized buffers, two to four
    times per step; ``benchmarks/overhead.py``). ``fn`` must return a pytree with
    ``operand``'s structure, shapes and dtypes. Under ``jax.vmap`` with a
    batched ``pred`` the body runs for every member and is selected per
    member, like a batched ``lax.cond``.

    Differentiation (forward and reverse mode, e.g. meta-gradients through an
    optimizer step): a custom JVP rule differentiates the equivalent
    ``lax.cond``, so the loop never has to be transposed; the primal
    computation is unchanged. With ``differentiable=False`` (for ``fn`` that is
    not reverse-mode differentiable, e.g. one holding a line search's
    ``while_loop``), the derivative is the identity's where ``pred`` is false
    and NaN where it holds, so a derivative taken through ``fn`` is never
    silently wrong.
    """
    pred = jnp.asarray(pred, bool)
    converted, consts = _closure_convert(fn, operand)
    return _run_if(converted, differentiable, pred, operand, consts)


def _closure_convert(fn, operand):
    """``fn`` as a function of ``(operand, *consts)`` with every value it closes
    over as an explicit argument (``jax.closure_convert`` keeps integer tracers
    closed over, which breaks a jitted step differentiated from outside)."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(operand)
    out_tree = jax.tree.structure(out_shape)

    def converted(x, *consts):
        out = jax.core.eval_jaxpr(closed.jaxpr, consts, *jax.tree.leaves(x))
        return jax.tree.unflatten(out_tree, out)

    return converted, tuple(closed.consts)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _run_if(fn, differentiable, pred, operand, consts):
    del differentiable

    def body(carry):
        flag, x = carry
        return jnp.zeros_like(flag), fn(x, *consts)

    return lax.while_loop(lambda carry: carry[0], body, (pred, operand))[1]


@_run_if.defjvp
def _run_if_jvp(fn, differentiable, primals, tangents):
    pred, operand, consts = primals
    _, operand_dot, consts_dot = tangents
    if differentiable:

        def as_cond(x, c):
            return lax.cond(pred, lambda x, c: fn(x, *c), lambda x, c: x, x, c)

        return jax.jvp(as_cond, (operand, consts), (operand_dot, consts_dot))
    out = _run_if(fn, differentiable, pred, operand, consts)

    def poison(t):
        # A factor, not a `where`: linear in `t`, so reverse mode carries the NaN too.
        if not jnp.issubdtype(t.dtype, jnp.inexact):
            return t
        return t * jnp.where(pred, jnp.nan, 1).astype(t.dtype)

    return out, jax.tree.map(poison, operand_dot)
