"""Control flow that updates its operand in place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["run_if"]


def run_if(pred: jax.Array, fn: Callable[[Any], Any], operand: Any) -> Any:
    """``fn(operand)`` where the scalar bool ``pred`` holds, else ``operand``.

    Semantically ``lax.cond(pred, fn, lambda x: x, operand)``: only one of the
    two runs. Written as a ``lax.while_loop`` that runs its body zero or one
    time because XLA updates a loop's carry in place, whereas a ``conditional``
    copies buffers that a branch passes through unchanged (in the compiled
    phase-0 step of ``two_phase``: CG's two parameter-sized buffers, two to four
    times per step; ``benchmarks/overhead.py``). ``fn`` must return a pytree with
    ``operand``'s structure, shapes and dtypes. Under ``jax.vmap`` with a
    batched ``pred`` the body runs for every member and is selected per
    member, like a batched ``lax.cond``. Not reverse-mode differentiable
    (neither is a line search).
    """

    def body(carry):
        flag, x = carry
        return jnp.zeros_like(flag), fn(x)

    return lax.while_loop(lambda carry: carry[0], body, (jnp.asarray(pred, bool), operand))[1]
