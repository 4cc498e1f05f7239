"""Switching policies: when a two-phase optimizer switches, and when it returns.

A :class:`Policy` is a pair of pure functions over a state pytree; :func:`safe_resort`
is the default (trials of the second phase, returns to the first), and
:func:`from_detector` makes a one-way policy from any switch detector.
"""

from twophase.policy.safe_resort import (
    Policy,
    SafeResortState,
    configure,
    from_detector,
    safe_resort,
)

__all__ = ["Policy", "SafeResortState", "configure", "from_detector", "safe_resort"]
