"""Presets: Adam, then a full-batch second phase, switched by the default policy.

:func:`adam_cg` (the paper's optimizer), :func:`adam_lbfgs` and
:func:`adam_newton_cg` are :func:`twophase.two_phase` with Adam as the first
phase (its step fused, :mod:`twophase._gated_adam`), a second phase, and
:func:`twophase.safe_resort` unless a detector is given;
:func:`adam_second_moment_preconditioner` is their handover to a
preconditioned second phase. Each preset only builds its pieces: the switch
itself is :mod:`twophase.switch`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from twophase import detectors as _det
from twophase import policy as _policy
from twophase._checks import check_budget, check_fraction, check_int, concrete, is_number_in
from twophase._gated_adam import AdamConstants
from twophase.second_phase import cg as _cg
from twophase.second_phase import linesearch as _ls
from twophase.second_phase.newton_cg import newton_cg as _newton_cg
from twophase.switch import Handover, _two_phase

__all__ = ["adam_cg", "adam_lbfgs", "adam_newton_cg", "adam_second_moment_preconditioner"]

PyTree = Any


def adam_second_moment_preconditioner(
    first_state: PyTree, second_state: PyTree, params: PyTree
) -> PyTree:
    """Handover: CG preconditioned by Adam's bias-corrected second moments.

    ``P = 1 / (sqrt(nu_hat) + eps')`` per coordinate with ``eps'`` 1e-8 times
    the mean of ``sqrt(nu_hat)``, the diagonal scaling Adam itself applied, set
    into the CG state with :func:`twophase.set_preconditioner`.
    """
    del params
    adam_states = [
        n
        for n in jax.tree.leaves(
            first_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(n, optax.ScaleByAdamState)
    ]
    if len(adam_states) != 1:
        raise ValueError("the first phase must hold exactly one optax.scale_by_adam state.")
    adam = adam_states[0]
    # bias correction with the Adam step count; b2 is not known here, and the
    # correction is a common scalar factor, which CG's line search absorbs.
    root = jax.tree.map(lambda v: jnp.sqrt(jnp.maximum(v, 0)), adam.nu)
    leaves = jax.tree.leaves(root)
    mean_root = (
        sum(jnp.sum(x) for x in leaves) / max(sum(x.size for x in leaves), 1) if leaves else 1.0
    )
    floor = 1e-8 * mean_root + jnp.finfo(jnp.float32).tiny
    scales = jax.tree.map(lambda r: 1.0 / (r + floor), root)
    return _cg.set_preconditioner(second_state, scales)


def _check_adam_constants(learning_rate, b1, b2, eps) -> None:
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


def _default_adam(learning_rate) -> AdamConstants:
    """``optax.adam(learning_rate)``'s constants (its defaults for the others)."""
    return AdamConstants(learning_rate, 0.9, 0.999, 1e-8)


def _adam_then(
    adam: AdamConstants,
    second: optax.GradientTransformation,
    policy: Any,
    fallback: int | None,
    handover: Handover | None,
) -> optax.GradientTransformationExtraArgs:
    """``two_phase(optax.adam(*adam), second, policy)`` with Adam's step fused:
    the one set of constants builds both the transformation and the fused step."""
    first = optax.adam(adam.learning_rate, b1=adam.b1, b2=adam.b2, eps=adam.eps)
    return _two_phase(first, second, policy, fallback=fallback, handover=handover, adam=adam)


def _default_policy(
    window: int, min_steps: int, budget: float | None, fallback: int | None
) -> _policy.Policy:
    return _policy.safe_resort(
        window, budget=budget, min_steps=min_steps, max_failures=2 if fallback is None else fallback
    )


def _ratio_deprecated(ratio) -> None:
    if ratio is None:
        return
    check_fraction("ratio", ratio, closed=True)
    warnings.warn(
        "`ratio` is deprecated and has no effect: the default policy is `safe_resort`; for "
        "the paper's rule pass `detector=twophase.grad_norm_peak(ratio, window)`.",
        DeprecationWarning,
        stacklevel=3,
    )


def _preset_policy(detector, window, min_steps, budget, fallback):
    """(policy or detector, fallback for two_phase) of a preset's arguments."""
    checked = concrete(fallback)
    if fallback is not None and (
        isinstance(checked, bool) or not isinstance(checked, int) or checked < 1
    ):
        raise ValueError(f"`fallback` must be a positive int or None, got {fallback!r}.")
    check_int("window", window, 1)
    check_int("min_steps", min_steps, 0)
    check_budget(budget)
    if detector is None:
        return _default_policy(window, min_steps, budget, fallback), None
    if budget is not None:
        raise ValueError("`budget` is for the default policy; with `detector=` leave it None.")
    if not isinstance(detector, (_det.Detector, _policy.Policy)):
        raise ValueError(
            f"`detector` must be a twophase Detector, Policy or None, got {detector!r}."
        )
    return detector, fallback


def adam_cg(
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    ratio: float | None = None,
    window: int = 100,
    min_steps: int = 0,
    budget: float | None = None,
    detector: _det.Detector | _policy.Policy | None = None,
    beta: str | _cg.BetaFn = "polak_ribiere",
    linesearch: str | _ls.LineSearch = "wolfe",
    fallback: int | None = None,
    precondition: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then full-batch nonlinear CG: the paper's two-phase optimizer.

    ``two_phase(optax.adam(...), twophase.nonlinear_cg(beta, linesearch), policy)``,
    with the same updates and states, except that Adam's step is not run inside
    a loop but switched by scalar coefficients (``twophase._gated_adam``), which
    lets XLA fuse it with ``optax.apply_updates`` as it does ``optax.adam``'s: in
    phase 0 the step costs optax.adam's plus one reduction over the gradient
    (its norm, for the non-finite check and the policy) and one more read of
    it (``benchmarks/overhead.py``). In phase 1 that pass still runs, leaving
    Adam's state unchanged and passing CG's update on.

    Call ``update(grads, state, params, value=loss, value_fn=full_batch_loss)``
    with the mini-batch gradient and loss; ``value_fn(params)`` is the
    full-batch objective that the CG phase evaluates itself.

    With ``detector=None`` the phases are chosen by
    :func:`twophase.safe_resort` (``window``, ``budget``, ``min_steps``,
    ``max_failures=fallback or 2``): CG is tried early and at growing
    intervals, kept while its pace (decrease of log-loss per
    epoch-equivalent) beats Adam's, and Adam resumes, with its moments intact,
    when it does not; from 90% of a known budget CG polishes to the end. It
    needs ``value=`` at every update. :func:`twophase.train` hands its
    ``cost_budget`` and steps per epoch to it. Pass ``detector=`` a
    :class:`twophase.Detector` for a one-way switch (e.g.
    ``grad_norm_peak(0.9, window)``, Algorithm 1 as published, or
    ``switch_at(k)``).

    Memory: Adam's two parameter-sized buffers and CG's two: 2x Adam's state
    (one more with ``precondition=True``).

    ``optax.inject_hyperparams(twophase.adam_cg, static_args=("detector",
    "beta", "linesearch"))`` makes the learning rate (and the other numeric
    arguments) injectable hyperparameters.

    Args:
      learning_rate: Adam's learning rate or schedule.
      b1, b2, eps: Adam's constants.
      ratio: deprecated, no effect (a ``DeprecationWarning`` when given); pass
        ``detector=grad_norm_peak(ratio, window)`` for the paper's rule.
      window: phase-0 steps per epoch (the policy's unit of cost).
      min_steps: never switch before this many steps.
      budget: the run's budget in epoch-equivalents for the default policy
        (like optax schedules' ``decay_steps``), or ``None``.
      detector: a :class:`twophase.Detector` or :class:`twophase.Policy`, or
        ``None`` for the default.
      beta: CG direction rule (see :func:`twophase.nonlinear_cg`).
      linesearch: CG line search.
      fallback: with a detector, see :func:`two_phase`; with the default
        policy, its ``max_failures``.
      precondition: precondition CG with Adam's second-moment estimate at each
        switch (one more parameter-sized buffer; when it pays:
        ``benchmarks/RESULTS.md``; it spoils the early trials of the default
        policy, where the estimate is poor).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`TwoPhaseState`.

    Raises:
      ValueError: a bad learning rate, ``b1``, ``b2``, ``eps``, ``ratio``,
        ``window``, ``min_steps``, ``budget`` (or one given with
        ``detector``), ``detector``, ``beta``, ``linesearch``, ``fallback`` or
        ``precondition``.
      TypeError: at trace time, ``update`` without ``value_fn``, or without
        ``value`` for a policy that needs it.
    """
    _ratio_deprecated(ratio)
    _check_adam_constants(learning_rate, b1, b2, eps)
    if not isinstance(precondition, bool):
        raise ValueError(f"`precondition` must be a bool, got {precondition!r}.")
    policy, fallback = _preset_policy(detector, window, min_steps, budget, fallback)
    second = _cg.nonlinear_cg(beta, linesearch, preconditioner="state" if precondition else None)
    return _adam_then(
        AdamConstants(learning_rate, b1, b2, eps),
        second,
        policy,
        fallback,
        adam_second_moment_preconditioner if precondition else None,
    )


def adam_lbfgs(
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    memory_size: int = 10,
    window: int = 100,
    min_steps: int = 0,
    budget: float | None = None,
    detector: _det.Detector | _policy.Policy | None = None,
    fallback: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then full-batch ``optax.lbfgs(memory_size)``: :func:`adam_cg`'s
    switch with L-BFGS (zoom line search) as the second phase.

    L-BFGS runs through :func:`twophase.second_phase.evaluating`: float32
    arithmetic at least, a step that does not lower the objective or is not
    finite is dropped and counted (``consecutive_failures``), and the default
    policy returns to Adam after ``fallback or 2`` of them in a row.

    Args:
      learning_rate: Adam's learning rate or schedule.
      memory_size: L-BFGS memory, an int ``>= 1`` (static: not injectable).
      window, min_steps, budget, detector, fallback: as in :func:`adam_cg`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`TwoPhaseState`.

    Raises:
      ValueError: a bad ``learning_rate``, ``memory_size``, ``window``,
        ``min_steps``, ``budget``, ``detector`` or ``fallback``.
      TypeError: at trace time, ``update`` without ``value_fn`` or ``value``.
    """
    if isinstance(memory_size, jax.Array):  # a (traced) injected hyperparameter
        raise ValueError(
            "`memory_size` sets the L-BFGS buffers' shapes and cannot be injected: pass "
            "optax.inject_hyperparams(twophase.adam_lbfgs, static_args=('memory_size',))."
        )
    check_int("memory_size", memory_size, 1)
    _check_adam_constants(*_default_adam(learning_rate))
    policy, fallback = _preset_policy(detector, window, min_steps, budget, fallback)
    return _adam_then(
        _default_adam(learning_rate), optax.lbfgs(memory_size=memory_size), policy, fallback, None
    )


def adam_newton_cg(
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    window: int = 100,
    min_steps: int = 0,
    budget: float | None = None,
    detector: _det.Detector | _policy.Policy | None = None,
    fallback: int | None = None,
    precondition: bool | str = False,
    curvature: str = "hessian",
    max_inner_iterations: int = 100,
    damping: float = 1e-3,
    sketch_size: int = 60,
    sketch_refresh: int = 20,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then full-batch Hessian-free Newton-CG (:func:`twophase.second_phase.newton_cg`):
    :func:`adam_cg`'s switch with a truncated Newton second phase.

    Each phase-1 step is one outer Newton iteration; its Hessian-vector products
    are counted in ``info(state).hessian_vector_products`` and charged
    :data:`twophase.HVP_COST` evaluations each by the default policy and by
    :func:`twophase.train`.

    Args:
      learning_rate: Adam's learning rate or schedule.
      window, min_steps, budget, detector, fallback: as in :func:`adam_cg`.
      precondition: ``False`` (no preconditioner); ``True``: the inner CG
        preconditioned with Adam's second moments at the switch (as
        :func:`adam_cg`); ``"nystrom"``: the randomized Nystrom preconditioner
        of the curvature (``newton_cg(preconditioner="nystrom")``, the NNCG of
        Rathore et al., ICML 2024).
      curvature, max_inner_iterations, damping, sketch_size, sketch_refresh:
        passed to :func:`twophase.second_phase.newton_cg`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`TwoPhaseState`.

    Raises:
      ValueError: a bad argument (named), as in :func:`adam_cg` and
        :func:`twophase.second_phase.newton_cg`.
      TypeError: at trace time, ``update`` without ``value_fn`` or ``value``.
    """
    _check_adam_constants(*_default_adam(learning_rate))
    if not (isinstance(precondition, bool) or precondition == "nystrom"):
        raise ValueError(f"`precondition` must be a bool or 'nystrom', got {precondition!r}.")
    handover = precondition is True
    policy, fallback = _preset_policy(detector, window, min_steps, budget, fallback)
    second = _newton_cg(
        curvature=curvature,
        max_inner_iterations=max_inner_iterations,
        damping=damping,
        preconditioner="state" if handover else (precondition or None),
        sketch_size=sketch_size,
        sketch_refresh=sketch_refresh,
    )
    return _adam_then(
        _default_adam(learning_rate),
        second,
        policy,
        fallback,
        adam_second_moment_preconditioner if handover else None,
    )
