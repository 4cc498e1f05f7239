"""Switching policies: when a two-phase optimizer switches, and when it returns.

A :class:`Policy` is a pair of pure functions over a state pytree (``base``);
:func:`safe_resort` is the default (trials of the second phase, returns to the
first; ``safe_resort``), its constants in :class:`SafeResortConfig` (``config``)
and its cost account a :class:`~twophase.policy.clock.Clock` (``clock``);
:func:`from_detector` makes a one-way policy from any switch detector.
"""

from twophase.policy.base import Policy, from_detector
from twophase.policy.config import SafeResortConfig
from twophase.policy.safe_resort import SafeResortState, configure, safe_resort

__all__ = [
    "Policy",
    "SafeResortConfig",
    "SafeResortState",
    "configure",
    "from_detector",
    "safe_resort",
]
