"""The :class:`Policy` record and :func:`from_detector`, the one-way policy of a detector."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from twophase import detectors as _det

__all__ = ["Policy", "from_detector"]

PyTree = Any


class Policy(NamedTuple):
    """A switching policy: three pure functions and a flag.

    Attributes:
      init: ``params -> state``.
      first: ``(state, *, grad, grad_norm, value, step, params, value_fn) ->
        (state, switch)`` after each phase-0 step (arguments as a
        :class:`twophase.Detector`'s ``update``); ``switch`` (bool scalar) makes
        the next step a second-phase step.
      second: ``(state, *, value, cost, failures, finite, params) -> (state,
        back)`` after each phase-1 step: ``value`` is the objective at the point
        the second phase accepted (its state's ``value``), ``cost`` the step's
        cost in evaluations (value-and-gradient evaluations, Hessian-vector
        products at :data:`twophase.second_phase.HVP_COST`), ``failures`` the
        second phase's current run of failed iterations, ``finite`` whether the
        step was finite. ``back`` returns to phase 0 for the next step.
      rearm: ``(state, params) -> state`` applied at a return.
      needs_value: whether ``first`` requires the mini-batch loss ``value``.
      probe: ``None`` or ``(state, *, value, params, value_fn) -> state``,
        called before every step's other stages, for the evaluations of
        ``value_fn`` that a policy makes in phase 0 (e.g. once, at the first
        step, under its own ``lax.cond``). Kept apart from ``first``, which runs
        inside a conditional: there, reading ``params`` makes XLA copy them on
        every step (``benchmarks/overhead.py``).
    """

    init: Callable[[PyTree], Any]
    first: Callable[..., tuple[Any, jax.Array]]
    second: Callable[..., tuple[Any, jax.Array]]
    rearm: Callable[[Any, PyTree], Any]
    needs_value: bool = False
    probe: Callable[..., Any] | None = None


def from_detector(detector: _det.Detector, fallback: int | None = None) -> Policy:
    """The one-way policy of ``detector``: switch when it fires; with
    ``fallback=k``, return after ``k`` consecutive failed second-phase
    iterations, or a non-finite one, and re-arm the detector.

    Args:
      detector: a :class:`twophase.Detector`.
      fallback: consecutive failed second-phase iterations that return, or
        ``None`` (never return).

    Returns:
      A :class:`Policy` whose state is the detector's.
    """

    def second(state, *, value, cost, failures, finite, params):
        del value, cost, params
        if fallback is None:
            return state, jnp.zeros([], bool)
        return state, (failures >= fallback) | ~finite

    return Policy(
        detector.init,
        detector.update,
        second,
        lambda state, params: detector.init(params),
        detector.needs_value,
    )
