"""``optax.adam``'s update, switched on and off by a scalar, in one fused pass."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree

__all__ = ["AdamConstants", "gated_adam_update"]


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


def gated_adam_update(
    adam: AdamConstants,
    slot: Any,
    adam_state: Any,
    active: jax.Array,
    pass_slot: jax.Array,
) -> tuple[Any, Any]:
    """One step of ``optax.adam`` where ``active`` holds, else a pass-through.

    Where the bool scalar ``active`` holds this is ``optax.adam(...).update(slot,
    adam_state)`` (Kingma and Ba 2014, Algorithm 1, with optax's arithmetic).
    Elsewhere the state comes back unchanged (the moments are updated with decay
    1 and weight 0, the step counts are not incremented) and the update is
    ``slot`` where ``pass_slot`` holds, else zero.

    Why not ``lax.cond``/``run_if`` around ``optax.adam``: gating by scalar
    coefficients keeps the moments, the update and (in the caller's jitted
    step) ``optax.apply_updates`` in the single elementwise pass that XLA emits
    for ``optax.adam`` alone; inside a conditional or loop the update must be
    written out and read back (``benchmarks/overhead.py``).

    Args:
      adam: Adam's constants.
      slot: pytree like the parameters: the gradient where ``active``, the
        update to pass through where ``pass_slot``; may be non-finite
        elsewhere (it is never read there).
      adam_state: the state of ``optax.adam(...)``: ``(ScaleByAdamState,
        EmptyState | ScaleByScheduleState)``.
      active: bool scalar.
      pass_slot: bool scalar, not used where ``active`` holds.

    Returns:
      ``(updates, new_adam_state)``, the updates in ``slot``'s dtypes.
    """
    moments, lr_state = adam_state
    b1, b2, eps = adam.b1, adam.b2, adam.eps
    count = jnp.where(active, optax.safe_increment(moments.count), moments.count)
    # The bias correction is unused where inactive; a count of at least 1 keeps
    # it finite there.
    corrected_count = jnp.maximum(count, 1)
    weight1, decay1 = jnp.where(active, 1 - b1, 0), jnp.where(active, b1, 1)
    weight2, decay2 = jnp.where(active, 1 - b2, 0), jnp.where(active, b2, 1)
    if callable(adam.learning_rate):
        step_size = -adam.learning_rate(lr_state.count)
        lr_state = lr_state._replace(
            count=jnp.where(active, optax.safe_increment(lr_state.count), lr_state.count)
        )
    else:
        step_size = -adam.learning_rate

    def leaf(g, mu, nu):
        g_in = jnp.where(active, g, jnp.zeros_like(g))
        new_mu = weight1 * g_in + decay1 * mu
        new_nu = weight2 * (g_in**2) + decay2 * nu
        mu_hat = optax.tree.bias_correction(new_mu, b1, corrected_count)
        nu_hat = optax.tree.bias_correction(new_nu, b2, corrected_count)
        direction = mu_hat / (jnp.sqrt(nu_hat) + eps)
        if callable(adam.learning_rate):
            step = jnp.array(step_size, dtype=direction.dtype) * direction
        else:
            step = step_size * direction
        passed = jnp.where(pass_slot, g, jnp.zeros_like(g))
        update = jnp.where(active, step.astype(g.dtype), passed)
        return update, new_mu.astype(mu.dtype), new_nu.astype(nu.dtype)

    outputs = jax.tree.map(leaf, slot, moments.mu, moments.nu)
    treedef = jax.tree.structure(slot)
    updates, mu, nu = (
        jax.tree.unflatten(treedef, [t[i] for t in treedef.flatten_up_to(outputs)])
        for i in range(3)
    )
    return updates, (moments._replace(count=count, mu=mu, nu=nu), lr_state)
