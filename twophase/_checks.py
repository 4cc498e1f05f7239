"""Argument checks shared by the factories (private).

Factories take Python numbers, NumPy scalars and, under
``optax.inject_hyperparams``, 0-d JAX arrays (concrete at ``init``, traced
inside ``update``, where they were already checked).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def concrete(value: Any) -> Any:
    """A Python scalar for a NumPy scalar or a concrete 0-d array; ``None`` for a
    tracer (checked when the transformation was built); anything else as is."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def is_number_in(value: Any, low: float, high: float, *, include_high: bool = False) -> bool:
    """Whether ``value`` is a real number (not a bool) in ``[low, high)`` (or
    ``[low, high]``); a tracer passes (checked when the transformation was
    built), ``None`` and NaN do not."""
    checked = concrete(value)
    if checked is None:
        return value is not None
    if isinstance(checked, bool) or not isinstance(checked, (int, float)):
        return False
    return low <= checked <= high if include_high else low <= checked < high
