"""Objectives: turning a loss into the ``value_fn`` the second phases evaluate.

How :func:`full_batch` evaluates the full-data mean chunk by chunk:

**Precision.** The chunk losses are summed, weighted and added to the remainder
in at least float32 (``promote_types(loss dtype, float32)``), and only the
final value is cast back to ``loss_fn``'s dtype. Likewise the gradient (and
forward-mode tangent) over the full chunks is accumulated in at least
float32: ``params`` leaves narrower than float32 enter the chunk loop as a
float32 copy, cast back to their own dtype inside each chunk (exactly, so
``loss_fn`` sees the original values), and the summed gradient is cast to
the leaf's dtype once. A bfloat16/float16 loss or parameters thus give the
full-data mean and gradient to within the dtype's rounding, whatever the
number of chunks. float32 and float64 losses and parameters are unaffected
(no casts are added).

**Weighting.** With ``B = min(batch_size, N)``, ``C = N // B`` full chunks and
``R = N - C * B`` leftover examples,
``value = (B * sum_c loss_fn(params, chunk_c) + R * loss_fn(params, rest)) / N``,
i.e. each full chunk has weight ``B / N`` and the remainder chunk (exactly
``R`` real examples, evaluated once outside the loop, no padding) weight
``R / N``. This is the exact mean over all ``N`` examples.

**Memory.** The ``C`` full chunks run in a ``lax.scan`` whose body is wrapped in
``jax.checkpoint``, with the chunk sliced inside the checkpointed body. The
forward pass therefore holds one chunk's activations at a time, and the
backward pass saves only the chunk index per step and recomputes one chunk's
forward pass just before its backward pass: peak temporary memory scales
with ``B``, not ``N`` (about one extra forward pass of compute under
``jax.grad``). ``data`` itself is never copied; ``params`` leaves narrower
than float32 get one float32 copy, and a float32 gradient accumulator
(see "Precision").

**Chunk layout and sharding.** Each leaf is viewed (a free reshape) as
``(Q, N // Q, ...)`` with ``Q = gcd(N, B)``; chunk ``c`` is the column block
``[:, c * B // Q : (c + 1) * B // Q]`` (``Q`` strided groups of ``B // Q``
consecutive examples) and the remainder is the last ``R // Q`` columns. For
data sharded along the example axis over ``D`` devices (a 1-D mesh,
``PartitionSpec('data')``), when ``D`` divides both ``N`` and ``batch_size``
then ``D`` divides ``Q``: the reshape keeps the sharding on the ``Q`` axis,
every chunk (and the remainder) is split evenly over all devices, slicing a
chunk is device-local, and the only communication is whatever ``loss_fn``'s
mean and the gradient reduction need. Otherwise the result is still exact,
but XLA may reshard (move) data to build the chunks.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from twophase import auxiliary as _aux
from twophase._checks import num_examples
from twophase.auxiliary import holds_masked, is_masked

__all__ = ["as_value_and_grad", "fill_masked", "full_batch", "with_weight_decay"]

PyTree = Any


def as_value_and_grad(
    value_fn: Callable[[PyTree], Any], params: PyTree
) -> Callable[[PyTree], tuple[jax.Array, PyTree]]:
    """``jax.value_and_grad(value_fn)``, checking at trace time that ``value_fn``
    maps ``params`` to a real scalar, or to a pair ``(loss, aux)`` whose ``aux``
    is dropped here (:mod:`twophase.auxiliary`).

    Raises:
      TypeError: ``value_fn`` is not callable, or returns something other than a
        real floating scalar (shape ``()`` or ``(1,)``) or such a pair.
      ValueError: the ``aux`` of a pair holds a leaf that is not a scalar.
    """
    if not callable(value_fn):
        raise TypeError(f"`value_fn` must be callable (params -> scalar), got {value_fn!r}.")
    _aux.aux_shape(value_fn, params)
    return jax.value_and_grad(_aux.scalar_objective(value_fn))


def fill_masked(
    value_fn: Callable[[PyTree], jax.Array], params: PyTree
) -> Callable[[PyTree], jax.Array]:
    """``value_fn`` for an optimizer inside ``optax.masked`` / ``optax.partition``.

    Those wrappers hand their inner transformation the parameters with
    ``optax.MaskedNode`` in place of the leaves it does not own, and pass
    ``value_fn`` on unchanged. The returned function accepts such a tree and
    evaluates ``value_fn`` at ``params`` with the given leaves put in, so a
    second phase differentiates (and moves) only its own leaves while the others
    stay at their values in ``params``::

        updates, state = opt.update(grads, state, params, value=loss,
                                    value_fn=tp.fill_masked(full_loss, params))

    A tree without ``MaskedNode`` is passed through unchanged.
    """

    def filled(partial: PyTree) -> jax.Array:
        if not holds_masked(partial):
            return value_fn(partial)
        full = jax.tree.map(
            lambda p, q: q if is_masked(p) else p, partial, params, is_leaf=is_masked
        )
        return value_fn(full)

    return filled


def with_weight_decay(
    fn: Callable[..., jax.Array], weight_decay: float, *, mask: Any = None
) -> Callable[..., jax.Array]:
    """``fn(params, *args) + weight_decay / 2 * ||params||^2``.

    The regularised loss whose gradient is what ``optax.add_decayed_weights(
    weight_decay, mask)`` adds to the gradient. Use it for a two-phase optimizer
    instead of ``add_decayed_weights`` chained before it, which only acts in
    the first phase (CG takes its steps from ``value_fn``): wrap the mini-batch
    loss (both phases then minimise the same objective), or a ``value_fn``.

    Args:
      fn: ``fn(params, *args) -> scalar`` (a loss ``(params, batch)`` or a
        ``value_fn(params)``).
      weight_decay: a number >= 0 (may be a traced scalar).
      mask: ``None`` (every leaf), a pytree of bools like ``params``, or a
        callable ``params -> such a pytree``, as for optax.
    """
    if not callable(fn):
        raise ValueError(f"`fn` must be callable, got {fn!r}.")
    if isinstance(weight_decay, (int, float)) and (
        isinstance(weight_decay, bool) or not 0 <= weight_decay < math.inf
    ):
        raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}.")

    def regularized(params, *args, **kwargs):
        chosen = mask(params) if callable(mask) else mask
        leaves = jax.tree.leaves(params)
        if chosen is not None:
            flags = jax.tree.leaves(chosen)
            leaves = [x for x, keep in zip(leaves, flags, strict=True) if keep]
        penalty = sum((jnp.sum(jnp.square(x)) for x in leaves), jnp.zeros([]))
        return fn(params, *args, **kwargs) + 0.5 * weight_decay * penalty

    return regularized


def _global_leaves(data: PyTree) -> list[str]:
    """Shapes of ``data``'s concrete leaves that span other processes' devices."""
    return [
        f"{x.dtype}{list(x.shape)}"
        for x in jax.tree.leaves(data)
        if isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and not x.is_fully_addressable
    ]


def _is_traced(x: Any) -> bool:
    """Whether ``x`` is an abstract tracer (as under ``jax.jit``); tracers of
    concrete values (eager ``jax.grad``) do not count."""
    if not isinstance(x, jax.core.Tracer):
        return False
    try:
        return x.to_concrete_value() is None
    except AttributeError:  # pragma: no cover - older JAX
        return True


def _check_not_closing_over(global_leaves: list[str], params: PyTree) -> None:
    """A traced ``value_fn`` would close over global (multi-process) data: jit
    cannot embed it as a constant, and says so only when lowering, away from here."""
    if global_leaves and any(_is_traced(p) for p in jax.tree.leaves(params)):
        raise ValueError(
            "`full_batch`: `data` holds jax.Arrays spanning several processes "
            f"({', '.join(global_leaves)}), and a traced function (jax.jit) cannot close "
            "over them. Pass `data` as an argument of the jitted function and build "
            "`value_fn = tp.full_batch(loss_fn, data, ...)` inside it (or use `tp.train`, "
            'which does). See "Many devices and many hosts" in docs/choosing.md.'
        )


def _accumulation_dtype(dtype: Any) -> Any:
    """``dtype`` for float32/float64 (and non-floating) dtypes; float32 for narrower
    floats (bfloat16, float16, float8), whose sums over many chunks round badly."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.promote_types(dtype, jnp.float32)
    return dtype


def _chunk_size(batch_size: Any, n: int) -> int:
    """Validated chunk size in ``[1, n]``; ``None`` means one chunk of ``n``."""
    if batch_size is None:
        return n
    if isinstance(batch_size, bool):
        raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}.")
    try:
        size = operator.index(batch_size)
    except TypeError:
        raise ValueError(
            f"`batch_size` must be a positive int or None, got {batch_size!r}."
        ) from None
    if size <= 0:
        raise ValueError(f"`batch_size` must be a positive int or None, got {size}.")
    return min(size, n)


def full_batch(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    data: PyTree,
    *,
    batch_size: int | None = None,
    has_aux: bool = False,
) -> Callable[[PyTree], Any]:
    """The exact full-data mean of a per-batch mean loss, evaluated chunk by chunk.

    ``value_fn(params)`` equals ``loss_fn(params, data)`` (up to float rounding)
    without ever feeding more than ``batch_size`` examples to ``loss_fn`` at once.

    Args:
      loss_fn: ``loss_fn(params, batch) -> jax.Array`` of shape ``()`` (or ``(1,)``),
        real floating dtype: the MEAN loss over the examples of ``batch``, where
        ``batch`` has ``data``'s structure with leading size ``B``. The mean is
        assumed permutation invariant; which examples share a chunk is an
        implementation detail (see "Chunk layout").
      data: any pytree of arrays, every leaf of shape ``(N, ...)`` with the same
        ``N >= 1`` (the example axis). May be concrete arrays (closed over by
        ``value_fn``) or tracers (build ``full_batch`` inside a jitted function
        that takes ``data`` as an argument, to avoid baking it in as a constant).
        In a multi-process run, global arrays (``jax.make_array_from_process_local_data``)
        must be tracers, i.e. arguments of the jitted function: jit cannot close
        over arrays on other processes' devices.
      batch_size: examples per chunk, a positive int or ``None`` (one chunk: a
        plain ``loss_fn(params, data)``). Values ``>= N`` also mean one chunk.
      has_aux: ``loss_fn`` returns a pair ``(loss, aux)``, ``aux`` a pytree of
        scalars that are means over the batch like the loss (e.g. the terms of
        a physics-informed loss); ``value_fn`` then returns ``(loss, aux)`` with
        ``aux`` the full-data means, weighted like the loss. Every second phase
        and :func:`twophase.two_phase` accept such a ``value_fn``
        (:mod:`twophase.auxiliary`).

    Returns:
      ``value_fn(params) -> jax.Array`` of shape ``()`` and ``loss_fn``'s dtype
      (with ``has_aux``: ``(loss, aux)``, each ``aux`` leaf of shape ``()``).
      Pure, jit-able, and differentiable in forward and reverse mode with
      respect to ``params`` (and ``data``).

    Precision, weighting, memory and chunk layout: see the module docstring.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.arange(10.0)[:, None]; y = 2.0 * x[:, 0]
      >>> def loss_fn(w, batch):
      ...     xb, yb = batch
      ...     return jnp.mean((xb @ w - yb) ** 2)
      >>> value_fn = full_batch(loss_fn, (x, y), batch_size=4)  # chunks 4, 4, rest 2
      >>> w = jnp.ones(1)
      >>> bool(jnp.allclose(value_fn(w), loss_fn(w, (x, y))))
      True
      >>> g = jax.grad(value_fn)(w)  # exact full-data gradient

    Raises:
      ValueError: ``data`` has no leaves, a scalar leaf, leaves with different
        leading sizes, or 0 examples; ``batch_size`` is not a positive int;
        (when ``value_fn`` is traced, e.g. under ``jax.jit``) ``data`` holds
        concrete global arrays of a multi-process run, which a traced function
        cannot close over: pass ``data`` as an argument and build ``full_batch``
        inside the traced function.
      TypeError: (when ``value_fn`` is traced) ``loss_fn`` returns something
        other than a real floating scalar; it returns a pair ``(loss, aux)``
        without ``has_aux=True``, or the loss alone with it (naming ``has_aux``).
      ValueError: (traced) an ``aux`` leaf is not a scalar.
    """
    if not isinstance(has_aux, bool):
        raise ValueError(f"`has_aux` must be a bool, got {has_aux!r}.")
    n = num_examples("data", data)
    layout = _chunk_layout(n, _chunk_size(batch_size, n))
    return functools.partial(_chunked_value, loss_fn, data, layout, has_aux, _global_leaves(data))


class _ChunkLayout(NamedTuple):
    """How :func:`full_batch` cuts ``n`` examples: ``num_chunks`` chunks of
    ``size`` and a remainder of ``rest``; each leaf viewed as ``(groups, n //
    groups, ...)``, a chunk being ``cols`` consecutive columns."""

    n: int
    size: int
    num_chunks: int
    rest: int
    groups: int
    cols: int


def _chunk_layout(n: int, size: int) -> _ChunkLayout:
    num_chunks, rest = divmod(n, size)
    groups = math.gcd(n, size)
    return _ChunkLayout(n, size, num_chunks, rest, groups, size // groups)


def _as_groups(layout: _ChunkLayout, x):
    """``(N, ...) -> (Q, N // Q, ...)``: a free row-major reshape."""
    return jnp.reshape(x, (layout.groups, layout.n // layout.groups, *jnp.shape(x)[1:]))


def _merge(x):
    """``(Q, k, ...) -> (Q * k, ...)``."""
    return jnp.reshape(x, (-1, *jnp.shape(x)[2:]))


def _batch_parts(loss_fn, has_aux: bool, params, batch):
    """``(loss, aux)`` of one batch, leaves of shape ``()`` (``aux`` ``()`` without aux)."""
    out = loss_fn(params, batch)
    loss, aux = out if has_aux else (out, ())
    return jax.tree.map(lambda x: jnp.reshape(x, ()), (loss, aux))


def _output_dtypes(loss_fn, data, layout: _ChunkLayout, has_aux: bool, params):
    """Dtypes of ``(loss, aux)`` for one chunk (checked: a real scalar loss)."""
    chunk_spec = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((layout.size, *jnp.shape(x)[1:]), jnp.result_type(x)), data
    )
    out, aux_out = _aux.split_output(
        jax.eval_shape(loss_fn, params, chunk_spec), "loss_fn", has_aux=has_aux
    )
    return jax.tree.map(lambda x: x.dtype, (out, () if aux_out is None else aux_out))


def _chunked_value(loss_fn, data, layout: _ChunkLayout, has_aux, global_leaves, params) -> Any:
    """The ``value_fn`` :func:`full_batch` returns: the weighted chunk means."""
    _check_not_closing_over(global_leaves, params)
    dtypes = _output_dtypes(loss_fn, data, layout, has_aux, params)
    if layout.num_chunks == 1 and layout.rest == 0:
        total = _batch_parts(loss_fn, has_aux, params, data)
    else:
        total = _chunk_sum(loss_fn, data, layout, has_aux, params, dtypes)
    total = jax.tree.map(lambda x, d: x.astype(d), total, dtypes)
    return total if has_aux else total[0]


def _widen(x, dtype):
    if dtype is None or _accumulation_dtype(dtype) == dtype:
        return x
    return x.astype(_accumulation_dtype(dtype))


def _narrow(x, dtype):
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def _chunk_sum(loss_fn, data, layout: _ChunkLayout, has_aux, params, dtypes):
    """``(B * sum_c loss_c + R * loss_rest) / N`` (and the same for ``aux``), in
    the accumulation dtypes: full chunks in a checkpointed ``lax.scan``, the
    remainder once outside it."""
    grouped = jax.tree.map(functools.partial(_as_groups, layout), data)
    acc_dtypes = jax.tree.map(_accumulation_dtype, dtypes)
    # The scan's reverse pass sums the cotangents of closed-over `params` in
    # their own dtype: entering the loop as float32 makes that sum float32.
    param_dtypes = jax.tree.map(lambda x: getattr(x, "dtype", None), params)
    wide_params = jax.tree.map(_widen, params, param_dtypes)

    def accumulated(tree):
        return jax.tree.map(lambda x, d: x.astype(d), tree, acc_dtypes)

    @jax.checkpoint
    def chunk_loss(wide_params, c):
        chunk = jax.tree.map(
            lambda x: _merge(lax.dynamic_slice_in_dim(x, c * layout.cols, layout.cols, axis=1)),
            grouped,
        )
        narrow_params = jax.tree.map(_narrow, wide_params, param_dtypes)
        return accumulated(_batch_parts(loss_fn, has_aux, narrow_params, chunk))

    def body(total, c):
        return jax.tree.map(jnp.add, total, chunk_loss(wide_params, c)), None

    zeros = jax.tree.map(lambda d: jnp.zeros((), d), acc_dtypes)
    total, _ = lax.scan(body, zeros, jnp.arange(layout.num_chunks))
    total = jax.tree.map(lambda x: x * (layout.size / layout.n), total)
    if layout.rest:
        start = layout.num_chunks * layout.cols
        remainder = jax.tree.map(lambda x: _merge(x[:, start:]), grouped)
        last = accumulated(_batch_parts(loss_fn, has_aux, params, remainder))
        total = jax.tree.map(lambda x, r: x + r * (layout.rest / layout.n), total, last)
    return total
