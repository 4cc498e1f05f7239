"""Nonlinear CG direction rules ("beta" formulas): small pure functions, one signature.

Each rule is written in the inner product of a diagonal preconditioner ``P``
(``z = P * g`` is the preconditioned gradient, ``P = 1`` without
preconditioning); the search direction is ``d_k = -z_k + beta_k d_{k-1}``. A
vanishing denominator gives ``beta = 0`` (:func:`~twophase.second_phase.common.safe_divide`),
a steepest-descent restart. Pass a name in :data:`BETA_RULES` or any
:class:`BetaFn` to :func:`twophase.nonlinear_cg`; adding a rule is one function
and one line in :data:`BETA_RULES`.

References:
  * Fletcher & Reeves (1964), Polak & Ribiere (1969), Hestenes & Stiefel (1952),
    Dai & Yuan (1999), Hager & Zhang (2005, "CG_DESCENT"); Hager & Zhang (2006),
    "A survey of nonlinear conjugate gradient methods".
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax.tree

from twophase.second_phase.common import safe_divide, vdot

__all__ = [
    "BETA_RULES",
    "JAMMING_RULES",
    "BetaFn",
    "dai_yuan",
    "fletcher_reeves",
    "hager_zhang",
    "hestenes_stiefel",
    "polak_ribiere",
    "resolve_beta",
]

PyTree = Any


class BetaFn(Protocol):
    """Signature of a CG direction rule.

    Args:
      grad: gradient ``g_k`` at the current point (pytree).
      grad_prev: gradient ``g_{k-1}`` at the previous point (pytree).
      direction_prev: previous search direction ``d_{k-1}`` (pytree).
      precond_grad: ``z_k = P * g_k`` (pytree; equals ``grad`` without
        preconditioning).
      precond_grad_prev: ``z_{k-1} = P * g_{k-1}`` (pytree).

    Returns:
      ``beta_k``, a scalar of the trees' floating dtype. A non-finite value makes
      the caller restart with steepest descent.
    """

    def __call__(
        self,
        grad: PyTree,
        grad_prev: PyTree,
        direction_prev: PyTree,
        precond_grad: PyTree,
        precond_grad_prev: PyTree,
    ) -> jax.Array: ...


def fletcher_reeves(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Fletcher-Reeves (1964): ``beta = <g_k, z_k> / <g_{k-1}, z_{k-1}>``."""
    del direction_prev
    return safe_divide(vdot(grad, precond_grad), vdot(grad_prev, precond_grad_prev))


def polak_ribiere(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Polak-Ribiere-Polyak with Powell's non-negativity (PR+, Gilbert & Nocedal 1992).

    ``beta = max(0, <z_k, g_k - g_{k-1}> / <g_{k-1}, z_{k-1}>)``.
    """
    del direction_prev
    y = optax.tree.sub(grad, grad_prev)
    beta = safe_divide(vdot(precond_grad, y), vdot(grad_prev, precond_grad_prev))
    return jnp.maximum(beta, 0)


def hestenes_stiefel(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Hestenes-Stiefel (1952): ``beta = <z_k, y> / <d_{k-1}, y>``, ``y = g_k - g_{k-1}``."""
    del precond_grad_prev
    y = optax.tree.sub(grad, grad_prev)
    return safe_divide(vdot(precond_grad, y), vdot(direction_prev, y))


def dai_yuan(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Dai-Yuan (1999): ``beta = <g_k, z_k> / <d_{k-1}, y>``, ``y = g_k - g_{k-1}``."""
    del precond_grad_prev
    y = optax.tree.sub(grad, grad_prev)
    return safe_divide(vdot(grad, precond_grad), vdot(direction_prev, y))


def hager_zhang(grad, grad_prev, direction_prev, precond_grad, precond_grad_prev):
    """Hager-Zhang CG_DESCENT (2005), preconditioned as in Hager & Zhang (2013).

    With ``y = g_k - g_{k-1}``, ``Py = z_k - z_{k-1}`` and ``dy = <d_{k-1}, y>``::

        beta_N = <y, z_k> / dy - 2 <y, Py> <d_{k-1}, g_k> / dy**2
        beta   = max(beta_N, -1 / (||d_{k-1}|| * min(0.01, ||g_{k-1}||)))

    the lower bound that gives global convergence without restarts.
    """
    y = optax.tree.sub(grad, grad_prev)
    precond_y = optax.tree.sub(precond_grad, precond_grad_prev)
    dy = vdot(direction_prev, y)
    beta_n = safe_divide(vdot(y, precond_grad), dy) - 2 * safe_divide(
        vdot(y, precond_y) * vdot(direction_prev, grad), dy * dy
    )
    # Euclidean norms, as in Hager & Zhang (2005); the bound is a safeguard only.
    g_prev_norm = jnp.sqrt(vdot(grad_prev, grad_prev))
    d_norm = jnp.sqrt(vdot(direction_prev, direction_prev))
    eta = safe_divide(jnp.asarray(-1.0, beta_n.dtype), d_norm * jnp.minimum(0.01, g_prev_norm))
    return jnp.where(eta < 0, jnp.maximum(beta_n, eta), beta_n)


BETA_RULES: dict[str, BetaFn] = {
    "fletcher_reeves": fletcher_reeves,
    "polak_ribiere": polak_ribiere,
    "hestenes_stiefel": hestenes_stiefel,
    "dai_yuan": dai_yuan,
    "hager_zhang": hager_zhang,
}


JAMMING_RULES = ("fletcher_reeves", "dai_yuan")
"""Rules that jam (tiny steps for many iterations) without Powell's restarts;
``restart_threshold="auto"`` turns the restarts on for them."""


def resolve_beta(beta: str | BetaFn) -> BetaFn:
    """The rule ``beta`` names in :data:`BETA_RULES`, or ``beta`` itself if callable.

    Raises:
      ValueError: neither.
    """
    if callable(beta):
        return beta
    if isinstance(beta, str) and beta in BETA_RULES:
        return BETA_RULES[beta]
    raise ValueError(f"`beta` must be one of {sorted(BETA_RULES)} or a callable, got {beta!r}.")
