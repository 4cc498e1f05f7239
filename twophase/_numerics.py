"""Finiteness checks, norms and inner products that neither overflow nor
underflow for finite inputs (private).

A float32 gradient with entries above about 1.8e19 has a squared norm beyond
float32's range, and one with entries below about 1e-20 a squared norm of
zero; ``optax.tree.norm`` then reports ``inf`` or ``0`` for a finite, nonzero
gradient. Here finiteness is decided per element (the largest magnitude is
finite) and norms are rescaled by a power of two (exact) when the plain sum of
squares would leave the safe range.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["all_finite", "fingerprint", "finite_and_norm", "max_abs", "pow2_scale", "safe_norm"]

PyTree = Any


def max_abs(tree: PyTree) -> jax.Array:
    """Largest ``|x|`` over all leaves (NaN if any entry is NaN; 0 without leaves)."""
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree) if jnp.size(x) > 0]
    if not leaves:
        return jnp.zeros([], jnp.float32)
    dtype = jnp.result_type(*leaves)
    return jnp.max(jnp.stack([x.astype(dtype) for x in leaves]))


def _real_dtype(dtype):
    """The dtype of ``|x|`` for ``x`` of ``dtype`` (float32 for integers)."""
    return jnp.finfo(jnp.promote_types(dtype, jnp.float32)).dtype


def _compute_dtype(tree: PyTree):
    """Real, and at least float32: float16's range is too small for squares."""
    leaves = jax.tree.leaves(tree)
    return _real_dtype(jnp.result_type(*leaves))


def _sum_squares(tree: PyTree, dtype, scale=None) -> jax.Array:
    total = jnp.zeros([], dtype)
    for x in jax.tree.leaves(tree):
        x = jnp.abs(x).astype(dtype) if jnp.iscomplexobj(x) else x.astype(dtype)
        if scale is not None:
            x = x * scale
        total = total + jnp.sum(jnp.square(jnp.abs(x) if jnp.iscomplexobj(x) else x))
    return total


def _safe_range(dtype) -> tuple[float, float]:
    """``[low, high]`` magnitudes whose squares, summed over up to 2**24 terms,
    stay normal numbers of ``dtype`` (entries below ``2**-24`` times the largest
    one matter less than rounding)."""
    info = jnp.finfo(dtype)
    return float(2.0 ** (info.minexp // 2 + 12)), float(2.0 ** ((info.maxexp - 26) // 2))


def _inverse_pow2(magnitude: jax.Array) -> jax.Array:
    """A power of two near ``1 / magnitude`` (1 for zero or non-finite ``magnitude``)."""
    dtype = jnp.result_type(magnitude)
    usable = jnp.isfinite(magnitude) & (magnitude > 0)
    _, exponent = jnp.frexp(jnp.where(usable, magnitude, 1))
    return jnp.where(usable, jnp.ldexp(jnp.ones([], dtype), -exponent), 1).astype(dtype)


def pow2_scale(magnitude: jax.Array) -> jax.Array:
    """A power of two ``s`` with ``s * magnitude`` near 1 when ``magnitude`` is
    outside the safe range of its dtype, else exactly 1 (so ordinary values are
    computed exactly as before). 1 for zero or non-finite magnitudes."""
    low, high = _safe_range(jnp.result_type(magnitude))
    outside = (magnitude < low) | (magnitude > high)
    return jnp.where(outside, _inverse_pow2(magnitude), 1).astype(jnp.result_type(magnitude))


def finite_and_norm(tree: PyTree) -> tuple[jax.Array, jax.Array]:
    """``(all entries finite, Euclidean norm)``.

    One pass in the common case: the plain sum of squares, which is finite and
    not below the safe range exactly when no entry is non-finite and nothing
    overflowed or underflowed. Otherwise (rare) a ``lax.cond`` branch decides
    finiteness per element (the largest magnitude) and recomputes the norm
    with the entries scaled by a power of two. The norm of a finite tree is
    finite unless the norm itself exceeds the dtype's range. Differentiable.
    """
    if not jax.tree.leaves(tree):
        return jnp.ones([], bool), jnp.zeros([], jnp.float32)
    dtype = _compute_dtype(tree)
    sum_sq = _sum_squares(tree, dtype)
    low, _ = _safe_range(dtype)
    plain = jnp.isfinite(sum_sq) & (sum_sq >= low * low)

    def careful(_):
        big = max_abs(tree).astype(dtype)
        scale = _inverse_pow2(big)
        norm = jnp.where(big > 0, jnp.sqrt(_sum_squares(tree, dtype, scale)) / scale, 0)
        finite = jnp.isfinite(big)
        return finite, jnp.where(finite, norm, big).astype(dtype)  # inf or NaN otherwise

    return lax.cond(plain, lambda _: (jnp.ones([], bool), jnp.sqrt(sum_sq)), careful, None)


@jax.jit
def safe_norm(tree: PyTree) -> jax.Array:
    """The Euclidean norm of ``tree`` without overflow or underflow (see
    :func:`finite_and_norm`). Jitted: called eagerly (e.g. by ``info`` in a
    Python loop) it compiles once per tree structure, not once per call."""
    return finite_and_norm(tree)[1]


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every entry of every leaf is finite (per element, not through a norm)."""
    return jnp.isfinite(max_abs(tree))


def fingerprint(tree: PyTree) -> jax.Array:
    """float32 ``(3,)``: ``[sum x, sum |x|, sum x^2]`` over all entries of all
    leaves (complex entries as their real and imaginary parts), in float32 at
    least. Two trees whose fingerprints differ by more than rounding differ;
    equal fingerprints do not prove equal trees."""
    sums = jnp.zeros([3], jnp.float32)
    for x in jax.tree.leaves(tree):
        parts = (x.real, x.imag) if jnp.iscomplexobj(x) else (x,)
        for part in parts:
            part = part.astype(_real_dtype(part.dtype))
            sums = sums + jnp.stack(
                [jnp.sum(part), jnp.sum(jnp.abs(part)), jnp.sum(part * part)]
            ).astype(jnp.float32)
    return sums
