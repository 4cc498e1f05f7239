"""Presets: Adam, then a full-batch second phase, switched by the default policy.

:func:`adam_then` is :func:`twophase.two_phase` with
:func:`twophase.gated_adam` as the first phase (its step fused with the
caller's ``apply_updates``), a given second phase, and
:func:`twophase.safe_resort` unless a policy is given. :func:`adam_cg` (the
paper's optimizer), :func:`adam_lbfgs` and :func:`adam_newton_cg` are
:func:`adam_then` with a default second phase; a second phase's options go in
as the second phase itself (``second=twophase.nonlinear_cg(beta="fletcher_reeves")``),
as ``optax.lbfgs(linesearch=...)`` takes its line search. A new second phase
needs one such three-line preset. :func:`adam_second_moment_preconditioner`
is the handover to a preconditioned second phase (``precondition=True``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from twophase import detectors as _det
from twophase import policy as _policy
from twophase._checks import check_budget, check_int
from twophase.first_phase import gated_adam
from twophase.second_phase import cg as _cg
from twophase.second_phase import levenberg_marquardt as _lm
from twophase.second_phase.newton_cg import newton_cg as _newton_cg
from twophase.switch import two_phase

__all__ = [
    "adam_cg",
    "adam_lbfgs",
    "adam_lm",
    "adam_newton_cg",
    "adam_second_moment_preconditioner",
    "adam_then",
]

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


_NEW_SPELLING = {
    "window": "steps_per_epoch=...",
    "detector": "policy=... (a Detector or a Policy)",
    "fallback": (
        "policy=twophase.safe_resort(max_failures=k) for the default policy, or "
        "policy=twophase.from_detector(detector, fallback=k)"
    ),
    "min_steps": "policy=twophase.safe_resort(min_steps=...)",
    "ratio": "policy=twophase.grad_norm_peak(ratio, window)",
    "b1": "twophase.two_phase(twophase.gated_adam(learning_rate, b1, b2, eps), second, policy)",
    "beta": "second=twophase.nonlinear_cg(beta, linesearch)",
    "memory_size": "second=optax.lbfgs(memory_size=...)",
    "curvature": "second=twophase.newton_cg(curvature=..., damping=..., ...)",
}
_NEW_SPELLING.update(b2=_NEW_SPELLING["b1"], eps=_NEW_SPELLING["b1"])
_NEW_SPELLING["linesearch"] = _NEW_SPELLING["beta"]
for _name in ("max_inner_iterations", "damping", "sketch_size", "sketch_refresh"):
    _NEW_SPELLING[_name] = _NEW_SPELLING["curvature"]


def reject_removed(preset: str, removed: dict) -> None:
    """TypeError for keyword arguments a preset no longer takes, naming the new
    spelling (or, for unknown ones, the usual unexpected-keyword error).
    ``optax.inject_hyperparams`` passes the collected ``**removed`` on as one
    keyword ``removed``, unpacked here."""
    nested = removed.get("removed")
    if isinstance(nested, dict):
        removed = {**nested, **{k: v for k, v in removed.items() if k != "removed"}}
    for name in removed:
        if name in _NEW_SPELLING:
            raise TypeError(f"{preset}() no longer takes `{name}`: use {_NEW_SPELLING[name]}.")
        raise TypeError(f"{preset}() got an unexpected keyword argument {name!r}.")


def default_policy(
    policy: _det.Detector | _policy.Policy | None,
    steps_per_epoch: int | None,
    budget: float | None,
) -> _det.Detector | _policy.Policy:
    """``policy``, or :func:`twophase.safe_resort` with ``steps_per_epoch`` and
    ``budget`` when it is ``None`` (those two are for the default policy only)."""
    if steps_per_epoch is not None:
        check_int("steps_per_epoch", steps_per_epoch, 1)
    check_budget(budget)
    if policy is None:
        if steps_per_epoch is None:
            return _policy.safe_resort(budget=budget)
        return _policy.safe_resort(steps_per_epoch=steps_per_epoch, budget=budget)
    if budget is not None or steps_per_epoch is not None:
        raise ValueError(
            "`budget` and `steps_per_epoch` are for the default policy; with `policy=` "
            "pass them to the policy (e.g. twophase.safe_resort(steps_per_epoch, budget=...))."
        )
    if not isinstance(policy, (_det.Detector, _policy.Policy)):
        raise ValueError(f"`policy` must be a twophase Detector, Policy or None, got {policy!r}.")
    return policy


def adam_then(
    second: optax.GradientTransformation,
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    steps_per_epoch: int | None = None,
    budget: float | None = None,
    policy: _det.Detector | _policy.Policy | None = None,
    precondition: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then ``second``: ``two_phase(gated_adam(learning_rate), second, policy)``.

    Adam's step is fused (:func:`twophase.gated_adam`): in phase 0 a step
    costs ``optax.adam``'s plus one reduction over the gradient (its norm, for
    the non-finite check and the policy). Call ``update(grads, state, params,
    value=loss, value_fn=full_batch_loss)`` with the mini-batch gradient and
    loss; ``value_fn(params)`` is the full-batch objective the second phase
    evaluates itself.

    With ``policy=None`` the phases are chosen by :func:`twophase.safe_resort`
    (``steps_per_epoch``, ``budget``): the second phase is tried early and at
    growing intervals, kept while its pace beats Adam's, and Adam resumes,
    with its moments intact, when it does not. It needs ``value=`` at every
    update; :func:`twophase.train` hands its ``cost_budget`` and steps per
    epoch to it. Pass ``policy=`` a :class:`twophase.Detector` for a one-way
    switch (e.g. ``grad_norm_peak(0.9, window)``, Algorithm 1 as published, or
    ``switch_at(k)``), or any :class:`twophase.Policy`.

    ``optax.inject_hyperparams(twophase.adam_cg, static_args=("second",
    "policy"))`` makes the learning rate injectable.

    Args:
      second: the second phase, an optax transformation (e.g.
        ``twophase.nonlinear_cg(...)``, ``optax.lbfgs()``).
      learning_rate: Adam's learning rate or schedule.
      steps_per_epoch: phase-0 steps per epoch, the default policy's unit of
        cost (``None``: the policy's default).
      budget: the run's budget in epoch-equivalents for the default policy
        (like optax schedules' ``decay_steps``), or ``None``.
      policy: a :class:`twophase.Detector` or :class:`twophase.Policy`, or
        ``None`` for the default.
      precondition: hand Adam's second moments to ``second`` at each switch
        (:func:`adam_second_moment_preconditioner`); ``second`` must store a
        preconditioner (``preconditioner="state"``).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`twophase.TwoPhaseState`.

    Raises:
      ValueError: a bad ``learning_rate``, ``steps_per_epoch``, ``budget`` (or
        one of them given with ``policy``), ``policy`` or ``precondition``.
      TypeError: at trace time, ``update`` without ``value_fn``, or without
        ``value`` for a policy that needs it.
    """
    if not isinstance(precondition, bool):
        raise ValueError(f"`precondition` must be a bool, got {precondition!r}.")
    return two_phase(
        gated_adam(learning_rate),
        second,
        default_policy(policy, steps_per_epoch, budget),
        handover=adam_second_moment_preconditioner if precondition else None,
    )


def _preset(
    name: str,
    removed: dict,
    second: optax.GradientTransformation,
    learning_rate: Any,
    steps_per_epoch: int | None,
    budget: float | None,
    policy: Any,
    precondition: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """A preset's body: its removed arguments rejected (:func:`reject_removed`),
    then :func:`adam_then`."""
    reject_removed(name, removed)
    return adam_then(
        second,
        learning_rate,
        steps_per_epoch=steps_per_epoch,
        budget=budget,
        policy=policy,
        precondition=precondition,
    )


def adam_cg(
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    second: optax.GradientTransformation | None = None,
    steps_per_epoch: int | None = None,
    budget: float | None = None,
    policy: _det.Detector | _policy.Policy | None = None,
    precondition: bool = False,
    **removed: Any,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then full-batch nonlinear CG: the paper's two-phase optimizer.

    :func:`adam_then` with ``second`` defaulting to
    ``twophase.nonlinear_cg(preconditioner="state" if precondition else None)``
    (Polak-Ribiere, Wolfe line search). Memory: Adam's two parameter-sized
    buffers and CG's two (one more with ``precondition=True``, which
    preconditions CG with Adam's second-moment estimate at each switch; it
    spoils the early trials of the default policy, where the estimate is poor).

    Args:
      learning_rate, steps_per_epoch, budget, policy, precondition: as in
        :func:`adam_then`.
      second: the CG phase with its options (``twophase.nonlinear_cg(beta,
        linesearch, ...)``), or ``None`` for the default.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`twophase.TwoPhaseState`.

    Raises:
      TypeError: a removed argument (``window``, ``detector``, ``beta``, ...),
        naming its new spelling.
      ValueError: as :func:`adam_then`.
    """
    if second is None:
        second = _cg.nonlinear_cg(preconditioner="state" if precondition is True else None)
    common = (learning_rate, steps_per_epoch, budget, policy, precondition)
    return _preset("adam_cg", removed, second, *common)


def adam_lbfgs(
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    second: optax.GradientTransformation | None = None,
    steps_per_epoch: int | None = None,
    budget: float | None = None,
    policy: _det.Detector | _policy.Policy | None = None,
    **removed: Any,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then full-batch L-BFGS: :func:`adam_then` with ``second``
    defaulting to ``optax.lbfgs()`` (pass ``second=optax.lbfgs(memory_size=100)``
    for another memory).

    L-BFGS runs through :func:`twophase.evaluating`: float32 arithmetic at
    least, a step that does not lower the objective or is not finite is dropped
    and counted (``consecutive_failures``), and the default policy returns to
    Adam after 2 of them in a row.

    Args:
      learning_rate, steps_per_epoch, budget, policy: as in :func:`adam_then`.
      second: the L-BFGS phase, or ``None`` for ``optax.lbfgs()``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`twophase.TwoPhaseState`.

    Raises:
      TypeError: a removed argument (``memory_size``, ``window``, ...), naming
        its new spelling.
      ValueError: as :func:`adam_then`.
    """
    second = optax.lbfgs() if second is None else second
    return _preset("adam_lbfgs", removed, second, learning_rate, steps_per_epoch, budget, policy)


def adam_newton_cg(
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    second: optax.GradientTransformation | None = None,
    steps_per_epoch: int | None = None,
    budget: float | None = None,
    policy: _det.Detector | _policy.Policy | None = None,
    precondition: bool = False,
    **removed: Any,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then full-batch Hessian-free Newton-CG: :func:`adam_then` with
    ``second`` defaulting to ``twophase.newton_cg(preconditioner="state" if
    precondition else None)``.

    Each phase-1 step is one outer Newton iteration; its Hessian-vector
    products are counted in ``info(state).hessian_vector_products`` and charged
    :data:`twophase.HVP_COST` evaluations each by the default policy and by
    :func:`twophase.train`. The randomized Nystrom preconditioner (the NNCG of
    Rathore et al., ICML 2024) is ``second=twophase.newton_cg(preconditioner="nystrom")``.

    Args:
      learning_rate, steps_per_epoch, budget, policy, precondition: as in
        :func:`adam_then`.
      second: the Newton-CG phase with its options, or ``None`` for the default.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`twophase.TwoPhaseState`.

    Raises:
      TypeError: a removed argument (``curvature``, ``damping``, ...), naming
        its new spelling.
      ValueError: as :func:`adam_then`; ``precondition="nystrom"`` (now
        ``second=twophase.newton_cg(preconditioner="nystrom")``).
    """
    if precondition == "nystrom":
        raise ValueError(
            "`precondition` is a bool; for the Nystrom preconditioner pass "
            "second=twophase.newton_cg(preconditioner='nystrom')."
        )
    if second is None:
        second = _newton_cg(preconditioner="state" if precondition is True else None)
    common = (learning_rate, steps_per_epoch, budget, policy, precondition)
    return _preset("adam_newton_cg", removed, second, *common)


def adam_lm(
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    second: optax.GradientTransformation | None = None,
    steps_per_epoch: int | None = None,
    budget: float | None = None,
    policy: _det.Detector | _policy.Policy | None = None,
    **removed: Any,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then full-batch Levenberg-Marquardt: :func:`adam_then` with
    ``second`` defaulting to ``twophase.levenberg_marquardt()``.

    For residual losses (PINNs, nonlinear least squares): ``value_fn`` must be
    in residual form, :func:`twophase.pointwise_residuals` (per-point Jacobians,
    the cheap path) or :func:`twophase.gauss_newton_objective`. Each phase-1 step
    builds the residuals' Jacobian once (counted in ``jacobian_evals`` and
    charged :data:`twophase.JACOBIAN_COST` evaluations each on the cost axis).

    Args:
      learning_rate, steps_per_epoch, budget, policy: as in :func:`adam_then`.
      second: the LM phase with its options, or ``None`` for the defaults.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`twophase.TwoPhaseState`.

    Raises:
      TypeError: a removed argument, naming its new spelling; at trace time, a
        ``value_fn`` not in residual form (naming ``gauss_newton_objective``).
      ValueError: as :func:`adam_then`.
    """
    second = _lm.levenberg_marquardt() if second is None else second
    return _preset("adam_lm", removed, second, learning_rate, steps_per_epoch, budget, policy)
