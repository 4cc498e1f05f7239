"""Argument checks, one module for the whole package (private).

Every error names the argument. Factories take Python numbers, NumPy scalars
and, under ``optax.inject_hyperparams``, 0-d JAX arrays: concrete at ``init``,
traced inside ``update``, where they were already checked. So there is one
rule for traced values:

* ``check_*`` functions return nothing and let a tracer pass (it was checked
  when the transformation was built); a concrete value is checked.
* ``as_*`` functions return the Python number that the caller goes on to use
  (a static shape, a Python float folded into the program); a tracer has no
  such value and is rejected, as any other non-number.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def concrete(value: Any) -> Any:
    """A Python scalar for a NumPy scalar or a concrete 0-d array; ``None`` for a
    tracer (checked when the transformation was built); anything else as is."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_number_in(value: Any, low: float, high: float, *, include_high: bool = False) -> bool:
    """Whether ``value`` is a real number (not a bool) in ``[low, high)`` (or
    ``[low, high]``); a tracer passes (checked when the transformation was
    built), ``None`` and NaN do not."""
    checked = concrete(value)
    if checked is None:
        return value is not None
    if not _is_real(checked):
        return False
    return low <= checked <= high if include_high else low <= checked < high


# --------------------------------------------------------------------------- #
# check_*: None, or ValueError naming the argument; a tracer passes.


def check_int(name: str, value: Any, minimum: int) -> None:
    """ValueError unless ``value`` is an int (not a bool) ``>= minimum``."""
    if _is_traced(value):
        return
    checked = concrete(value)
    if isinstance(checked, bool) or not isinstance(checked, int) or checked < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {checked!r}.")


def check_positive(name: str, value: Any) -> None:
    """ValueError unless ``value`` is a positive finite real number."""
    if _is_traced(value):
        return
    checked = concrete(value)
    if not _is_real(checked) or not 0 < checked < math.inf:
        raise ValueError(f"`{name}` must be a positive finite number, got {checked!r}.")


def check_fraction(name: str, value: Any, *, closed: bool = False) -> None:
    """ValueError unless ``value`` is in ``(0, 1)`` (``(0, 1]`` if ``closed``)."""
    if _is_traced(value):
        return
    checked = concrete(value)
    if not _is_real(checked) or not (0 < checked and (checked <= 1 if closed else checked < 1)):
        raise ValueError(f"`{name}` must be in (0, 1{']' if closed else ')'}, got {value!r}.")


def check_budget(budget: Any) -> None:
    """ValueError unless ``budget`` is None or a positive finite number."""
    checked = concrete(budget)
    if budget is None or checked is None:
        return
    if not _is_real(checked) or not 0 < checked < math.inf:
        raise ValueError(
            f"`budget` must be a positive finite number of epoch-equivalents or None, "
            f"got {budget!r}."
        )


def check_max_evaluations(max_evaluations: Any) -> None:
    """ValueError unless ``max_evaluations`` is an int ``>= 1``."""
    if _is_traced(max_evaluations):
        return
    checked = concrete(max_evaluations)
    if isinstance(checked, bool) or not isinstance(checked, int):
        raise ValueError(f"`max_evaluations` must be an int, got {max_evaluations!r}.")
    if checked < 1:
        raise ValueError(f"`max_evaluations` must be >= 1, got {checked}.")


def check_one_of(name: str, value: Any, choices: Iterable[Any]) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


# --------------------------------------------------------------------------- #
# as_*: the Python number, or ValueError naming the argument (a tracer too).


def as_positive_finite(name: str, value: Any) -> float:
    """``value`` as a Python float, if a positive finite number."""
    checked = concrete(value)
    if not _is_real(checked) or not 0 < checked < math.inf:
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
    return float(checked)


def as_open_unit(name: str, value: Any) -> float:
    """``value`` as a Python float, if in ``(0, 1)``."""
    checked = concrete(value)
    if not _is_real(checked) or not 0 < checked < 1:
        raise ValueError(f"`{name}` must be in (0, 1), got {value!r}.")
    return float(checked)


def as_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """``value`` as a Python int ``>= 1`` (``None`` passes with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool) and not _is_traced(value):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
        if number is not None and number >= 1:
            return number
    expected = "a positive int" + (" or None" if allow_none else "")
    raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


def as_non_negative_int(name: str, value: Any) -> int:
    """``value`` as a Python int ``>= 0``."""
    if isinstance(value, (bool, jax.core.Tracer)):
        raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.") from None
    if number < 0:
        raise ValueError(f"`{name}` must be a non-negative int, got {number}.")
    return number


def as_positive_or_none(name: str, value: Any) -> float | None:
    """``None``, or ``value`` as a Python float if a positive finite real number
    (any ``numbers.Real``, e.g. a ``Fraction``)."""
    if value is None:
        return None
    checked = concrete(value)
    real = isinstance(checked, numbers.Real) and not isinstance(checked, bool)
    if not real or not math.isfinite(checked) or checked <= 0:
        raise ValueError(f"`{name}` must be a positive number or None, got {value!r}.")
    return float(checked)


def num_examples(name: str, data: PyTree) -> int:
    """The common leading (example) size of ``data``'s leaves; ValueError naming
    ``name`` when there is none (no leaf, a scalar leaf, sizes that differ, 0)."""
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError(f"`{name}` must contain at least one array leaf, got an empty pytree.")
    sizes = set()
    for leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"`{name}` leaves need a leading example axis, got a scalar leaf "
                f"(shapes: {[jnp.shape(x) for x in leaves]})."
            )
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(
            f"`{name}` leaves must share the leading (example) size, got leading sizes "
            f"{sorted(sizes)} (shapes: {[jnp.shape(x) for x in leaves]})."
        )
    (n,) = sizes
    if n == 0:
        raise ValueError(f"`{name}` is empty: its leaves have 0 examples.")
    return n


# --------------------------------------------------------------------------- #
# Arguments of ``update`` and of user functions (at trace time: TypeError).


def require_value(value: Any, who: str) -> None:
    """TypeError when a policy or detector that needs the mini-batch loss gets none."""
    if value is None:
        raise TypeError(
            f"{who} needs the mini-batch loss: pass `value=` to update (the loss at the "
            "incoming gradient)."
        )


def require_update_args(who: str, updates: PyTree, params: PyTree, value_fn: Any) -> None:
    """TypeError when a second phase's ``update`` lacks ``value_fn`` or ``params``."""
    if value_fn is None:
        raise TypeError(
            f"{who}.update requires the keyword argument `value_fn` "
            "(params -> full-batch objective, a scalar)."
        )
    if params is None and jax.tree.leaves(updates):  # (None is also an empty pytree)
        raise TypeError(f"{who}.update requires `params`.")


def check_scalar_output(name: str, out: Any, expected: str) -> None:
    """TypeError unless ``out``, what the user's function ``name`` returned, is a
    real floating scalar (shape ``()`` or ``(1,)``); ``expected`` describes it."""
    if not hasattr(out, "shape") or out.shape not in ((), (1,)):
        raise TypeError(
            f"`{name}` must return {expected}, got {getattr(out, 'shape', type(out).__name__)}."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"`{name}` must return a real floating scalar, got dtype {out.dtype}.")
