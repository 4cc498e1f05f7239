"""Randomized Nystrom preconditioner for the inner solve of :func:`twophase.second_phase.newton_cg`.

A rank-``r`` sketch of the curvature ``H`` (Hessian or Gauss-Newton matrix) from
``r`` curvature-vector products along random orthonormal directions ``Q``:
``H_nys = (H Q) (Q^T H Q)^+ (H Q)^T = U diag(lam) U^T``. The damped system
``H + mu I`` is then preconditioned by

    P^{-1} = (lam_min + mu) U (diag(lam) + mu I)^{-1} U^T + (I - U U^T),

which maps the ``r`` largest curvature directions onto the scale of the rest, so
linear CG on an ill-conditioned ``H`` whose spectrum has a few large
eigenvalues (physics-informed losses are the standard example) converges as if
they were not there.

Sources:
  * Frangella, Tropp & Udell, "Randomized Nystrom preconditioning", SIAM J.
    Matrix Anal. Appl. 44 (2023): Algorithm 2.1 (the stable shifted sketch) and
    the preconditioner (5.3).
  * Rathore, Lei, Frangella, Lu & Udell, "Challenges in Training PINNs: A Loss
    Landscape Perspective", ICML 2024: Nystrom-preconditioned Newton-CG (NNCG)
    after Adam and L-BFGS, sketch size 60, refreshed every 20 iterations.

Difference from Frangella et al.: the core matrix ``Q^T H Q`` is
eigendecomposed instead of Cholesky-factorised, and its non-positive
eigenvalues are dropped, so that an indefinite Hessian (away from a minimiser)
gives a positive semi-definite sketch of its positive part instead of a failed
factorisation. Directions dropped this way are left unpreconditioned.

Everything is a flat vector of the parameters (``jax.flatten_util.ravel_pytree``)
in the arithmetic dtype; the basis ``U`` is an ``(n, r)`` matrix, ``n`` the
number of parameters: ``r`` parameter-sized buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["NystromSketch", "empty_sketch", "nystrom_inverse", "nystrom_sketch"]


class NystromSketch(NamedTuple):
    """A rank-``r`` Nystrom approximation ``U diag(eigenvalues) U^T`` of the curvature.

    Attributes:
      basis: ``(n, r)`` array ``U`` with orthonormal columns (``n`` parameters), in
        the arithmetic dtype; zeros before the first sketch.
      eigenvalues: ``(r,)`` approximate curvature along ``U``'s columns, ``>= 0``
        (units of the objective per squared parameter unit); ``0`` marks a column
        not used (no sketch yet, a non-positive direction of an indefinite
        Hessian, or a sketch that was not finite).
      age: int32 outer iterations since the sketch was taken (a fresh state
        starts "due": ``age`` equals the refresh period).
      sketches: int32 sketches taken; each cost ``r`` curvature-vector products.
    """

    basis: jax.Array
    eigenvalues: jax.Array
    age: jax.Array
    sketches: jax.Array


def empty_sketch(size: int, rank: int, dtype, age: int) -> NystromSketch:
    """An unused sketch (identity preconditioner) of ``rank`` columns for ``size``
    parameters, due for a refresh when ``age`` reaches the refresh period."""
    return NystromSketch(
        basis=jnp.zeros((size, rank), dtype),
        eigenvalues=jnp.zeros((rank,), dtype),
        age=jnp.asarray(age, jnp.int32),
        sketches=jnp.zeros([], jnp.int32),
    )


def nystrom_sketch(
    product: Callable[[jax.Array], jax.Array], key: jax.Array, size: int, rank: int, dtype
) -> tuple[jax.Array, jax.Array]:
    """The basis ``U`` (``(size, rank)``) and eigenvalues (``(rank,)``, descending,
    ``>= 0``) of a Nystrom sketch of the symmetric matrix ``v -> product(v)``.

    ``rank`` products, batched with ``jax.vmap``. A sketch that is not finite
    comes back as zeros (the identity preconditioner).

    Args:
      product: flat ``(size,)`` vector to flat vector, the curvature product.
      key: a PRNG key for the Gaussian test matrix.
      size: ``n``, the number of parameters (Python int).
      rank: ``r``, ``1 <= r <= n`` (Python int).
      dtype: the arithmetic dtype (float32 or float64).
    """
    if size == 0:  # no parameters: nothing to sketch
        return jnp.zeros((0, rank), dtype), jnp.zeros((rank,), dtype)
    test = jax.random.normal(key, (size, rank), dtype)
    q, _ = jnp.linalg.qr(test)
    y = jax.vmap(product, in_axes=1, out_axes=1)(q).astype(dtype)
    eps = jnp.finfo(dtype).eps
    # Frangella et al.'s stabilising shift nu (Frobenius norm for the spectral).
    shift = jnp.sqrt(jnp.asarray(size, dtype)) * eps * jnp.linalg.norm(y)
    y = y + shift * q
    core = q.T @ y
    core = 0.5 * (core + core.T)
    d, v = jnp.linalg.eigh(core)
    kept = d > rank * eps * jnp.max(jnp.abs(d))
    inv_sqrt = jnp.where(kept, 1 / jnp.sqrt(jnp.where(kept, d, 1)), 0)
    u, s, _ = jnp.linalg.svd(y @ (v * inv_sqrt), full_matrices=False)
    eigenvalues = jnp.maximum(s * s - shift, 0)
    finite = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(eigenvalues))
    return (
        jnp.where(finite, u, 0).astype(dtype),
        jnp.where(finite, eigenvalues, 0).astype(dtype),
    )


def nystrom_inverse(
    basis: jax.Array, eigenvalues: jax.Array, damping: jax.Array
) -> Callable[[jax.Array], jax.Array]:
    """``r -> P^{-1} r`` for ``H + damping I`` (Frangella et al. (5.3)), flat vectors.

    Columns with eigenvalue 0 are left out (scale 1), so an empty sketch gives
    the identity. Symmetric positive definite for ``damping > 0``.
    """
    used = eigenvalues > 0
    smallest = jnp.min(jnp.where(used, eigenvalues, jnp.inf))
    smallest = jnp.where(jnp.isfinite(smallest), smallest, 0)
    scale = jnp.where(used, (smallest + damping) / (eigenvalues + damping), 1) - 1

    def apply(r: jax.Array) -> jax.Array:
        return r + basis @ (scale * (basis.T @ r))

    return apply
