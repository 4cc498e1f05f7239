"""Control flow that updates its operand in place; eager calls that compile once;
states whose fields own their buffers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["eager_jit", "fresh_buffers", "run_if"]


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


def fresh_buffers(tree: Any) -> Any:
    """``tree`` with every array leaf copied into a buffer of its own.

    An ``init`` that returns one array in several fields (or the parameters
    themselves) cannot be donated (``jax.jit(..., donate_argnums=...)``,
    ``nnx.jit`` with an ``nnx.Optimizer``): XLA refuses to donate a buffer
    twice. Under a trace the copies are free.
    """
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def eager_jit(update_fn: Callable[..., Any]) -> Callable[..., Any]:
    """An optax ``update`` that jits itself when called outside a trace.

    Called eagerly, a step built from ``lax.while_loop`` / ``lax.cond`` with
    bodies that are new closures on every call compiles every loop and branch
    again on every call (seconds each). Here an eager call goes through one
    ``jax.jit`` of ``update_fn`` per transformation, with ``value_fn`` static
    (it is a function), so it compiles once per shapes and ``value_fn``, as
    ``optax.adam`` does. Inside ``jit``, ``vmap``, ``grad`` (any tracer among
    the arguments), or with a keyword argument that is not an array (other than
    ``value_fn``), ``update_fn`` is called as is.

    ``update_fn(updates, state, params=None, **kwargs)``.
    """
    jitted = jax.jit(update_fn, static_argnames=("value_fn",))

    @functools.wraps(update_fn)
    def update(updates, state, params=None, **kwargs):
        others = {k: v for k, v in kwargs.items() if k != "value_fn"}
        leaves = jax.tree.leaves((updates, state, params, others))
        eager = (
            not any(_is_tracer(x) for x in leaves)
            and all(isinstance(x, (jax.Array, np.ndarray, np.generic, int, float)) for x in leaves)
            and _hashable(kwargs.get("value_fn"))
        )
        if eager:
            return jitted(updates, state, params, **kwargs)
        return update_fn(updates, state, params, **kwargs)

    return update
