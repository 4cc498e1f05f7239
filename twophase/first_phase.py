"""First phases that :func:`twophase.two_phase` fuses: Adam, switched by a scalar.

A *gated* first phase is an optax transformation with one more method,
``gated_update(slot, state, active, pass_slot)`` (:class:`GatedFirstPhase`):
one step where the bool scalar ``active`` holds, else a pass-through that
leaves the state unchanged. ``two_phase`` runs such a phase outside any loop or
conditional, so that XLA fuses it with the caller's ``optax.apply_updates`` as
it fuses ``optax.adam`` alone; any other first phase runs inside a
conditional. :func:`gated_adam` is ``optax.adam`` in that form.

Arithmetic (Kingma and Ba 2014, Algorithm 1, with optax's conventions):
float32, float64 and bfloat16 leaves compute exactly as ``optax.adam``;
float16 leaves compute in float32 and store the moments in float16 (so
``eps=1e-8`` does not round to zero and squares do not overflow); complex
leaves use ``|g|^2 = conj(g) g`` for the second moment, as optax does;
integer and bool leaves are left alone (zero update, state unchanged).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax
import optax.tree

from twophase._checks import is_number_in

__all__ = [
    "AdamConstants",
    "GatedAdam",
    "GatedFirstPhase",
    "check_adam_constants",
    "gated_adam",
    "gated_adam_update",
    "reset_momentum",
]


@runtime_checkable
class GatedFirstPhase(Protocol):
    """A first phase that :func:`twophase.two_phase` can fuse.

    ``init(params)`` and ``update(updates, state, params=None, **extra)`` as any
    optax transformation, and ``gated_update(slot, state, active, pass_slot)``:

    * ``slot``: pytree like the parameters (the gradient where ``active``, the
      update to pass on where ``pass_slot``; anything, even non-finite,
      elsewhere: it must not be read there);
    * ``active``, ``pass_slot``: bool scalars (possibly batched under ``vmap``);
    * returns ``(updates, new_state)``: where ``active``, ``update(slot,
      state)``; elsewhere ``state`` unchanged and ``slot`` (``pass_slot``) or
      zeros as the update.

    It must use no loop or conditional over parameter-sized buffers (that is
    the point: the step stays one fused elementwise pass). Optionally, a
    ``resume(state) -> state`` that :func:`twophase.two_phase` applies at every
    return from the second phase (see :func:`reset_momentum`).
    """

    def init(self, params: Any) -> Any: ...

    def update(self, updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any: ...

    def gated_update(
        self, slot: Any, state: Any, active: jax.Array, pass_slot: jax.Array
    ) -> tuple[Any, Any]: ...


class AdamConstants(NamedTuple):
    """The arguments of ``optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)``.

    Attributes:
      learning_rate: float, scalar array or schedule ``count -> float``.
      b1, b2, eps: floats or scalar arrays (injected hyperparameters).
    """

    learning_rate: Any
    b1: Any
    b2: Any
    eps: Any


def check_adam_constants(learning_rate: Any, b1: Any, b2: Any, eps: Any) -> None:
    """ValueError naming the first bad Adam argument (traced ones pass)."""
    if not callable(learning_rate) and not is_number_in(learning_rate, 0.0, math.inf):
        raise ValueError(
            "`learning_rate` must be a finite number >= 0 or a schedule (step -> number), "
            f"got {learning_rate!r}."
        )
    for name, value in (("b1", b1), ("b2", b2)):
        if not is_number_in(value, 0.0, 1.0):
            raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
    if not is_number_in(eps, 0.0, math.inf):
        raise ValueError(f"`eps` must be a finite number >= 0, got {eps!r}.")


def _compute_dtype(dtype) -> Any:
    """float32 for float16 (whose range cannot hold ``eps=1e-8`` or the square of
    a gradient above 256), the dtype itself otherwise (bfloat16 has float32's
    range, and computes exactly as ``optax.adam``)."""
    return jnp.float32 if dtype == jnp.float16 else dtype


def _adam_leaf(coefficients: dict, g, mu, nu, pass_slot):
    """One leaf of :func:`gated_adam_update` (``coefficients``: its scalars)."""
    if not jnp.issubdtype(mu.dtype, jnp.inexact):  # integer or bool parameters
        return jnp.zeros(g.shape, g.dtype), mu, nu
    active = coefficients["active"]
    dtype = _compute_dtype(g.dtype)
    g_in = jnp.where(active, g, jnp.zeros_like(g)).astype(dtype)
    new_mu = coefficients["weight1"] * g_in + coefficients["decay1"] * mu.astype(dtype)
    square = (jnp.conj(g_in) * g_in).real if jnp.iscomplexobj(g_in) else g_in * g_in
    new_nu = coefficients["weight2"] * square + coefficients["decay2"] * nu.astype(dtype)
    count = coefficients["count"]
    mu_hat = optax.tree.bias_correction(new_mu, coefficients["b1"], count)
    nu_hat = optax.tree.bias_correction(new_nu, coefficients["b2"], count)
    denominator = jnp.sqrt(nu_hat) + jnp.asarray(coefficients["eps"]).astype(dtype)
    # A zero denominator (eps = 0 and a zero second moment) is a zero step, not 0/0.
    nonzero = denominator != 0
    direction = jnp.where(nonzero, mu_hat / jnp.where(nonzero, denominator, 1), 0)
    step = (jnp.asarray(coefficients["step_size"]).astype(dtype) * direction).astype(g.dtype)
    passed = jnp.where(pass_slot, g, jnp.zeros_like(g))
    update = jnp.where(active, step, passed)
    return update, new_mu.astype(mu.dtype), new_nu.astype(nu.dtype)


def gated_adam_update(
    adam: AdamConstants,
    slot: Any,
    adam_state: Any,
    active: jax.Array,
    pass_slot: jax.Array,
) -> tuple[Any, Any]:
    """One step of ``optax.adam`` where ``active`` holds, else a pass-through.

    Where the bool scalar ``active`` holds this is ``optax.adam(...).update(slot,
    adam_state)`` (Kingma and Ba 2014, Algorithm 1, with optax's arithmetic;
    the dtype rules of the module docstring). Elsewhere the state comes back
    unchanged (the moments are updated with decay 1 and weight 0, the step
    counts are not incremented) and the update is ``slot`` where ``pass_slot``
    holds, else zero.

    Why not ``lax.cond`` around ``optax.adam``: gating by scalar coefficients
    keeps the moments, the update and (in the caller's jitted step)
    ``optax.apply_updates`` in the single elementwise pass that XLA emits for
    ``optax.adam`` alone; inside a conditional or loop the update must be
    written out and read back.

    Args:
      adam: Adam's constants.
      slot: pytree like the parameters (see :class:`GatedFirstPhase`).
      adam_state: the state of ``optax.adam(...)``: ``(ScaleByAdamState,
        EmptyState | ScaleByScheduleState)``.
      active: bool scalar.
      pass_slot: bool scalar, not used where ``active`` holds.

    Returns:
      ``(updates, new_adam_state)``, the updates in ``slot``'s dtypes (zeros for
      integer leaves).
    """
    moments, lr_state = adam_state
    count = jnp.where(active, optax.safe_increment(moments.count), moments.count)
    if callable(adam.learning_rate):
        step_size = -adam.learning_rate(lr_state.count)
        lr_state = lr_state._replace(
            count=jnp.where(active, optax.safe_increment(lr_state.count), lr_state.count)
        )
    else:
        step_size = -adam.learning_rate
    coefficients = {
        "active": active,
        "b1": adam.b1,
        "b2": adam.b2,
        "eps": adam.eps,
        # The bias correction is unused where inactive; a count of at least 1
        # keeps it finite there.
        "count": jnp.maximum(count, 1),
        "weight1": jnp.where(active, 1 - adam.b1, 0),
        "decay1": jnp.where(active, adam.b1, 1),
        "weight2": jnp.where(active, 1 - adam.b2, 0),
        "decay2": jnp.where(active, adam.b2, 1),
        "step_size": step_size,
    }
    outputs = jax.tree.map(
        lambda g, mu, nu: _adam_leaf(coefficients, g, mu, nu, pass_slot),
        slot,
        moments.mu,
        moments.nu,
    )
    treedef = jax.tree.structure(slot)
    updates, mu, nu = (
        jax.tree.unflatten(treedef, [t[i] for t in treedef.flatten_up_to(outputs)])
        for i in range(3)
    )
    return updates, (moments._replace(count=count, mu=mu, nu=nu), lr_state)


def reset_momentum(adam_state: Any) -> Any:
    """``adam_state`` with its first moment (``optax.ScaleByAdamState.mu``) at
    zero, its second moment and step count kept: a ``resume`` for a first
    phase (:class:`GatedFirstPhase`) that should restart its momentum after a
    return from the second phase. Not :func:`gated_adam`'s default: it removed
    one blow-up after a return but cost other workloads more
    (``benchmarks/RESULTS.md``, section 15)."""

    def reset(node):
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(mu=optax.tree.zeros_like(node.mu))
        return node

    is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)
    return jax.tree.map(reset, adam_state, is_leaf=is_adam)


class GatedAdam(NamedTuple):
    """``optax.adam`` as a :class:`GatedFirstPhase` (built by :func:`gated_adam`).

    Attributes:
      init: ``optax.adam``'s ``init`` (the state is ``optax.adam``'s).
      update: ``(updates, state, params=None, **extra) -> (updates, state)``,
        one Adam step with this module's dtype rules.
      gated_update: see :class:`GatedFirstPhase`.
      constants: the :class:`AdamConstants`.
      resume: ``None`` (Adam's state is kept as it is at a return), or e.g.
        :func:`reset_momentum`.
    """

    init: Any
    update: Any
    gated_update: Any
    constants: AdamConstants
    resume: Any = None


def gated_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> GatedAdam:
    """``optax.adam(learning_rate, b1, b2, eps)`` that :func:`twophase.two_phase` fuses.

    Same state as ``optax.adam`` and the same updates (bitwise for float32 and
    float64 parameters); float16 leaves compute in float32, so a zero
    gradient gives a zero step where ``optax.adam`` gives 0/0 = NaN; integer
    leaves get a zero update (module docstring).

    Args:
      learning_rate: a number >= 0, a scalar array or a schedule ``count -> number``.
      b1, b2: decay rates of the moment estimates, in ``[0, 1)``.
      eps: added to the denominator, ``>= 0``.

    Returns:
      A :class:`GatedAdam` (an optax transformation with ``gated_update``).

    Raises:
      ValueError: a bad ``learning_rate``, ``b1``, ``b2`` or ``eps`` (named);
        traced (injected) values pass.
    """
    check_adam_constants(learning_rate, b1, b2, eps)
    constants = AdamConstants(learning_rate, b1, b2, eps)
    reference = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)

    def init_fn(params):
        return reference.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        on = jnp.ones([], bool)
        return gated_adam_update(constants, updates, state, on, ~on)

    def gated_update_fn(slot, state, active, pass_slot):
        return gated_adam_update(constants, slot, state, active, pass_slot)

    return GatedAdam(init_fn, update_fn, gated_update_fn, constants)
