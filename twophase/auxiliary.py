"""Auxiliary outputs of an objective: ``value_fn(params) -> (loss, aux)``.

Every second phase (:func:`twophase.nonlinear_cg`, :func:`twophase.second_phase.newton_cg`,
:func:`twophase.second_phase.evaluating` around ``optax.lbfgs``) and
:func:`twophase.two_phase` accept a ``value_fn`` that returns either the scalar
objective or a pair ``(loss, aux)``, with ``aux`` a pytree of scalars (e.g. the
loss terms of a physics-informed network), as ``jax.value_and_grad(...,
has_aux=True)`` does (optax#1053 asks the same of optax's line searches). The
pair is recognised from the output's structure at trace time. A second phase
keeps the ``aux`` of its accepted point in its state's ``aux`` field (read by
:func:`twophase.info`), riding along with the gradient through its line search,
so it costs nothing extra for CG and Newton-CG.

A state's ``aux`` field is ``None`` until the first ``update`` sees ``value_fn``
(an optimizer's ``init`` sees only the parameters); :func:`prepare_aux` fills it
with zeros of the right structure beforehand, for loops whose carry must keep
one structure (``lax.scan``, ``lax.while_loop``) and to avoid one retrace of a
jitted step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from twophase._checks import check_scalar_output
from twophase.second_phase.contract import replace_states

__all__ = [
    "aux_shape",
    "holds_masked",
    "is_masked",
    "prepare_aux",
    "scalar_objective",
    "value_grad_and_aux",
]

PyTree = Any


def _is_scalar_like(out: Any) -> bool:
    return hasattr(out, "shape") and hasattr(out, "dtype") and out.shape in ((), (1,))


def check_aux(aux: PyTree, who: str = "value_fn") -> None:
    """``ValueError`` unless every leaf of ``aux`` is a scalar (shape ``()`` or ``(1,)``)."""
    bad = [
        f"{jax.tree_util.keystr(path)}: shape {getattr(leaf, 'shape', type(leaf).__name__)}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(aux)
        if not _is_scalar_like(leaf)
    ]
    if bad:
        raise ValueError(
            f"the auxiliary output of `{who}` must be a pytree of scalars (shape () or (1,)); "
            f"got {', '.join(bad)}."
        )


def split_output(out: Any, who: str = "value_fn", has_aux: bool | None = None):
    """``(loss, aux)`` of an (abstract) output, ``aux`` is ``None`` for a bare scalar.

    ``has_aux`` ``None`` recognises either form; ``True``/``False`` demands one.

    Raises:
      TypeError: the output is neither a real floating scalar nor such a pair,
        or it contradicts ``has_aux`` (naming ``has_aux``).
      ValueError: ``aux`` holds a leaf that is not a scalar.
    """
    paired = isinstance(out, tuple) and len(out) == 2 and _is_scalar_like(out[0])
    if has_aux is True and not paired:
        raise TypeError(
            f"`{who}` was declared with has_aux=True but returned "
            f"{_describe(out)}, not a pair (loss, aux) with a scalar loss."
        )
    if has_aux is False and isinstance(out, tuple):
        raise TypeError(
            f"`{who}` returned a tuple ({_describe(out)}); pass has_aux=True if it returns "
            "(loss, aux), or return the scalar loss alone."
        )
    loss, aux = out if paired else (out, None)
    check_scalar_output(who, loss, "a scalar objective (or a pair (loss, aux))")
    if aux is not None:
        check_aux(aux, who)
    return loss, aux


def _describe(out: Any) -> str:
    if isinstance(out, tuple):
        return "a tuple of " + ", ".join(_describe(x) for x in out)
    shape = getattr(out, "shape", None)
    return f"shape {shape}" if shape is not None else type(out).__name__


def aux_shape(value_fn: Callable[[PyTree], Any], params: PyTree) -> PyTree | None:
    """The abstract ``aux`` of ``value_fn(params)`` (``jax.ShapeDtypeStruct``
    leaves), or ``None`` when ``value_fn`` returns the scalar alone.

    Raises:
      TypeError, ValueError: as :func:`split_output`; ``TypeError`` naming
        :func:`twophase.fill_masked` when ``value_fn`` fails on parameters
        holding ``optax.MaskedNode`` (inside ``optax.masked`` / ``partition``).
    """
    try:
        out = jax.eval_shape(value_fn, params)
    except Exception as error:  # MaskedNode is an empty tuple: TypeError, IndexError, ...
        if not holds_masked(params):
            raise
        raise TypeError(
            "`value_fn` failed on parameters holding optax.MaskedNode (the optimizer runs "
            "inside optax.masked / optax.partition, which hide the other leaves). Pass "
            "`value_fn=twophase.fill_masked(value_fn, params)` with the full parameters "
            f"(twophase.train does this itself). The error was: {error}"
        ) from error
    return split_output(out)[1]


def is_masked(x: Any) -> bool:
    """Whether ``x`` is an ``optax.MaskedNode`` (what optax.masked / partition
    put where another label owns the leaf)."""
    return isinstance(x, optax.MaskedNode)


def holds_masked(tree: Any) -> bool:
    """Whether ``tree`` holds an ``optax.MaskedNode`` (a leaf another label owns)."""
    return any(is_masked(x) for x in jax.tree.leaves(tree, is_leaf=is_masked))


def scalar_objective(value_fn: Callable[[PyTree], Any]) -> Callable[[PyTree], jax.Array]:
    """``params -> loss`` (shape ``()``) of a ``value_fn`` with or without ``aux``."""

    def objective(params):
        out = value_fn(params)
        loss = out[0] if isinstance(out, tuple) else out
        return jnp.reshape(loss, ())

    return objective


def value_grad_and_aux(value_fn: Callable[[PyTree], Any], params: PyTree):
    """``p -> (value, grad, aux)`` for ``value_fn``; ``aux`` is ``None`` when
    ``value_fn`` returns the scalar alone (one evaluation either way).

    Raises:
      TypeError, ValueError: as :func:`split_output` (checked at trace time).
    """
    shape = aux_shape(value_fn, params)
    if shape is None:
        value_and_grad = jax.value_and_grad(scalar_objective(value_fn))

        def without_aux(p):
            value, grad = value_and_grad(p)
            return value, grad, None

        return without_aux

    def paired(p):
        loss, aux = value_fn(p)
        return jnp.reshape(loss, ()), as_template(aux, shape)

    value_and_grad = jax.value_and_grad(paired, has_aux=True)

    def with_aux(p):
        (value, aux), grad = value_and_grad(p)
        return value, grad, aux

    return with_aux


def as_template(aux: PyTree, shape: PyTree) -> PyTree:
    """``aux`` reshaped and cast leafwise like ``shape`` (arrays or
    ``jax.ShapeDtypeStruct``s): one structure for every evaluation."""
    return jax.tree.map(lambda x, s: jnp.reshape(jnp.asarray(x, s.dtype), s.shape), aux, shape)


def zeros_aux(shape: PyTree | None) -> PyTree | None:
    """Zeros of an abstract ``aux`` (``None`` stays ``None``)."""
    if shape is None:
        return None
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)


def prepare_aux(state: PyTree, value_fn: Callable[[PyTree], Any], params: PyTree) -> PyTree:
    """``state`` with every second-phase ``aux`` field that is still ``None``
    set to zeros shaped like ``value_fn``'s ``aux`` (nothing changes when
    ``value_fn`` has no ``aux``).

    Found by field name: every NamedTuple with an ``aux`` field, at any depth
    (inside :func:`twophase.two_phase`, ``optax.chain``, ...). Call it once after
    ``init`` when the step runs inside ``lax.scan`` / ``lax.while_loop`` (whose
    carry must keep its structure), and on the fresh state a checkpoint is
    restored into (:func:`twophase.restore_checkpoint` needs the saved
    structure); a plain jitted step works without it and retraces once after
    its first call. Trace-time only: no evaluation of
    ``value_fn`` (``jax.eval_shape``).

    Args:
      state: an optimizer state (any pytree).
      value_fn: ``params -> loss`` or ``params -> (loss, aux)``.
      params: the parameters ``value_fn`` takes.

    Returns:
      The state, same structure except the filled ``aux`` fields.

    Raises:
      TypeError, ValueError: ``value_fn``'s output is malformed (see
        :func:`split_output`).
    """
    shape = aux_shape(value_fn, params)
    if shape is None:
        return state

    def fill(node):
        return node._replace(aux=zeros_aux(shape)) if node.aux is None else node

    return replace_states(state, "aux", fill)
