"""Thin helpers for Flax (``flax.nnx`` and ``flax.linen``): an optional import.

The core never imports this module; import it explicitly::

    import twophase.flax as tpf

**nnx.** ``nnx.Optimizer(model, tp.adam_cg(...), wrt=nnx.Param)`` works as is:
``optimizer.update(model, grads, value=loss, value_fn=value_fn)`` forwards the
keyword arguments to ``tx.update``. Flax (0.12) passes ``tx.update`` the
parameters as an ``nnx.State`` of plain arrays (``nnx.as_pure`` of
``nnx.state(model, wrt)``), so ``value_fn`` must take such a State;
:func:`nnx_value_fn` builds it from the model and a loss::

    @nnx.jit
    def train_step(model, optimizer, batch, data):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        value_fn = tpf.nnx_value_fn(model, loss_fn, data, batch_size=1024)
        optimizer.update(model, grads, value=loss, value_fn=value_fn)
        return loss

``tp.info(optimizer.opt_state)`` (and ``tp.info(optimizer)``) see through the
``OptArray`` wrappers nnx puts around every optimizer-state leaf.

**linen.** ``flax.training.train_state.TrainState.apply_gradients(grads=...,
**kwargs)`` does *not* forward ``kwargs`` to ``tx.update`` (it ``replace``-s
dataclass fields with them), so ``value``/``value_fn`` cannot reach the
optimizer that way; use :func:`linen_apply_gradients` instead, and
:func:`linen_value_fn` for the full-batch objective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from twophase.objectives import full_batch

__all__ = ["linen_apply_gradients", "linen_value_fn", "nnx_value_fn"]

PyTree = Any


def nnx_value_fn(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, PyTree], jax.Array],
    data: PyTree,
    *,
    batch_size: int | None = None,
    wrt: Any = nnx.Param,
) -> Callable[[nnx.State], jax.Array]:
    """The full-batch objective of an nnx model, as the ``value_fn`` CG needs.

    Args:
      model: the ``nnx.Module`` being trained. Its graph structure and its
        variables *not* selected by ``wrt`` (batch statistics, RNG counters, ...)
        are captured now; build the ``value_fn`` inside the jitted train step
        from the step's ``model`` argument so that they are the current ones
        (and are not baked into the compiled step as constants).
      loss_fn: ``loss_fn(model, batch) -> jax.Array`` of shape ``()``: the MEAN
        loss over ``batch`` (a pytree like ``data`` with a leading example axis).
        It must be a pure function of the parameters: run the model
        deterministically (no dropout; batch norm in inference mode). Any
        mutation it makes to the model is discarded.
      data: pytree of arrays with a common leading example axis ``(N, ...)``;
        pass it into the jitted step as an argument to avoid constant folding.
      batch_size: chunk size of the full-batch mean (:func:`twophase.full_batch`);
        ``None`` evaluates all ``N`` examples at once.
      wrt: the filter given to ``nnx.Optimizer(..., wrt=...)`` (default
        ``nnx.Param``).

    Returns:
      ``value_fn(params) -> jax.Array`` (shape ``()``), where ``params`` is what
      ``nnx.Optimizer.update`` passes to ``tx.update``: the ``nnx.State`` of
      the ``wrt`` variables, holding plain arrays (``nnx.as_pure``) or
      Variables. Pure and differentiable in ``params``.

    Raises:
      ValueError: from :func:`twophase.full_batch` (bad ``data`` or ``batch_size``).
    """
    graphdef, _, rest = nnx.split(model, wrt, ...)

    def model_loss(params: nnx.State, batch: PyTree) -> jax.Array:
        return loss_fn(nnx.merge(graphdef, params, rest, copy=True), batch)

    return full_batch(model_loss, data, batch_size=batch_size)


def linen_value_fn(
    apply_fn: Callable[..., Any],
    loss_fn: Callable[[Any, PyTree], jax.Array],
    data: PyTree,
    *,
    batch_size: int | None = None,
) -> Callable[[PyTree], jax.Array]:
    """The full-batch objective of a linen model (``TrainState.apply_fn``).

    Args:
      apply_fn: ``module.apply`` (``state.apply_fn``).
      loss_fn: ``loss_fn(outputs_fn, batch) -> jax.Array`` of shape ``()``, the
        MEAN loss over ``batch``, where ``outputs_fn(*inputs, **kw)`` is
        ``apply_fn({"params": params}, *inputs, **kw)``, i.e. the model with its
        parameters bound. Example:
        ``lambda f, b: jnp.mean((f(b["x"]) - b["y"]) ** 2)``.
      data: pytree of arrays with a common leading example axis.
      batch_size: chunk size of the full-batch mean; ``None``: one chunk.

    Returns:
      ``value_fn(params) -> jax.Array`` with ``params`` the ``TrainState.params``
      (the ``"params"`` collection, as passed to ``tx.update``).
    """

    def model_loss(params: PyTree, batch: PyTree) -> jax.Array:
        def outputs_fn(*args, **kwargs):
            return apply_fn({"params": params}, *args, **kwargs)

        return loss_fn(outputs_fn, batch)

    return full_batch(model_loss, data, batch_size=batch_size)


def linen_apply_gradients(state: Any, grads: PyTree, **extra_args: Any) -> Any:
    """``state.apply_gradients(grads=grads)`` that forwards keyword arguments to
    ``tx.update`` (``value=``, ``value_fn=``, ...), which ``TrainState`` does not.

    Args:
      state: a ``flax.training.train_state.TrainState`` (or a subclass; any
        dataclass with ``step``, ``params``, ``tx``, ``opt_state`` and
        ``replace``).
      grads: gradients with the structure of ``state.params``.
      **extra_args: passed to ``state.tx.update``, e.g. ``value=loss,
        value_fn=f``.

    Returns:
      The new state with ``step + 1`` and updated ``params`` and ``opt_state``.
    """
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra_args)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
