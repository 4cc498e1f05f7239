"""An exact cost account in epoch-equivalents, for runs of any length.

Phase-0 steps cost ``1 / steps_per_epoch`` each and second-phase steps whole or
half evaluations; summed in float32 (``cost += 1 / steps_per_epoch``) the
account drifts by whole epochs over a long run. A :class:`Clock` keeps the
whole epoch-equivalents in an int32, the phase-0 steps of the current epoch in
an int32 and only the second phase's sub-unit remainder in float32, so it is
exact for runs of up to ``2**31 - 1`` epoch-equivalents and epoch boundaries
are counted, never rounded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Clock", "elapsed", "elapsed_since", "spend", "start", "tick"]


class Clock(NamedTuple):
    """A cost account (all scalars).

    Attributes:
      whole: int32, whole epoch-equivalents spent: completed phase-0 epochs
        plus the whole part of the second phase's cost.
      steps: int32, phase-0 steps in the current epoch.
      remainder: float32 in ``[0, 1)``, the second phase's cost beyond ``whole``.
    """

    whole: jax.Array
    steps: jax.Array
    remainder: jax.Array


def start() -> Clock:
    """A clock at zero."""
    return Clock(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32))


def tick(clock: Clock, steps_per_epoch: jax.Array) -> tuple[Clock, jax.Array]:
    """One phase-0 step: ``(clock, epoch_end)``, ``epoch_end`` (bool) when the
    step completes an epoch of ``steps_per_epoch`` (int32, >= 1) steps."""
    steps = clock.steps + 1
    epoch_end = steps >= steps_per_epoch
    return clock._replace(
        whole=clock.whole + epoch_end.astype(jnp.int32),
        steps=jnp.where(epoch_end, 0, steps),
    ), epoch_end


def spend(clock: Clock, cost: jax.Array) -> Clock:
    """``cost`` (float32 scalar, >= 0, e.g. a second-phase step's evaluations)
    added: its whole part to ``whole``, the rest to ``remainder``."""
    total = clock.remainder + jnp.asarray(cost, jnp.float32)
    carried = jnp.floor(total)
    return clock._replace(whole=clock.whole + carried.astype(jnp.int32), remainder=total - carried)


def elapsed(clock: Clock, steps_per_epoch: jax.Array) -> jax.Array:
    """float32 reading of the account (rounded once, never accumulated)."""
    part = clock.remainder + clock.steps.astype(jnp.float32) / steps_per_epoch.astype(jnp.float32)
    return clock.whole.astype(jnp.float32) + part


def elapsed_since(clock: Clock, steps_per_epoch: jax.Array, mark: jax.Array) -> jax.Array:
    """float32 ``elapsed(clock) - mark`` for a float32 ``mark``, with the whole
    parts subtracted in int32 (accurate near a budget's end however long the run)."""
    mark = jnp.asarray(mark, jnp.float32)
    mark_whole = jnp.floor(mark)
    part = clock.remainder + clock.steps.astype(jnp.float32) / steps_per_epoch.astype(jnp.float32)
    return (clock.whole - mark_whole.astype(jnp.int32)).astype(jnp.float32) + (
        part - (mark - mark_whole)
    )
