"""``twophase.info(state)``: one diagnostics record over any nesting of our states."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from twophase._numerics import safe_norm
from twophase.second_phase.contract import cost as second_phase_cost
from twophase.second_phase.contract import field, has_field, states_with_field
from twophase.switch import TwoPhaseState

__all__ = ["Info", "info", "info_all"]


class Info(NamedTuple):
    """Diagnostics of a twophase optimizer state (all scalars).

    Fields that the state does not hold are ``None`` (e.g. the phase fields of a
    bare :func:`twophase.nonlinear_cg` state, or the CG fields of a two-phase
    optimizer whose second phase is L-BFGS).

    Attributes:
      cg_iterations: int32, CG iterations (line searches) made.
      value_and_grad_evals: int32, evaluations of the full-batch objective with
        its gradient: by the second phase (CG's own count; for another second
        phase such as ``optax.lbfgs()``, ``TwoPhaseState.second_phase_evals``),
        plus those of every exact-norm detector (all members of ``any_of`` /
        ``all_of``).
      restarts: int32, steepest-descent restarts after the first CG iteration.
      linesearch_failures: int32, line searches of the current second-phase
        state that found no decrease (since its latest switch in a two-phase
        state).
      value: objective at the current point as last evaluated by CG (``inf``
        before the first evaluation).
      grad_norm: Euclidean norm of the gradient stored with ``value`` (``inf``
        before the first evaluation, like ``value``).
      nonfinite_events: int32, CG updates skipped because the objective or its
        gradient at the current point was not finite.
      consecutive_failures: int32, the current run of CG iterations that made no
        progress (failed line searches or non-finite current points); 0 after a
        successful step. While it is positive the update was zero.
      phase: int32, 0 (first phase) or 1 (second phase).
      switch_step: int32, index of the first second-phase step, -1 before.
      step: int32, ``update`` calls so far.
      grad_norm_stat: float32, the detector's gradient-norm statistic (the full-batch
        norm for ``grad_norm_peak``/``norm_loss_slope`` with ``"exact"``; the RMS of the
        window's mini-batch norms for ``loss_plateau``); in ``any_of`` / ``all_of``,
        that of the first member detector holding one.
      grad_norm_max: float32, its running maximum (same detector).
      skipped_steps: int32, first-phase steps skipped for non-finite gradients.
      fallbacks: int32, returns from phase 1 to phase 0.
      switches: int32, switches from phase 0 to phase 1 (trials of the second
        phase under :func:`twophase.safe_resort`).
      return_step: int32, index of the latest return's first phase-0 step, -1
        before the first return.
      hessian_vector_products: int32, Hessian-vector products made by the
        second phase (over all trials in a two-phase state).
      foreign_updates: int32, second-phase steps at which the parameters had not
        advanced by the update returned before (a transformation chained after
        the optimizer changed it); each restarted the second phase.
      zero_steps: int32, second-phase iterations whose line search found no
        decrease, so that the step was zero, by any second phase (CG, Newton-CG,
        L-BFGS through :func:`twophase.second_phase.evaluating`), over all trials
        of a two-phase state: stalls are counted, never silent. Each is handled:
        the next iteration restarts (steepest descent), and a run of
        ``max_failures`` returns to the first phase under
        :func:`twophase.safe_resort` (``fallback=k`` for a detector).
      aux: the second phase's auxiliary output at its current point when
        ``value_fn`` returns ``(loss, aux)`` (a pytree of scalars, e.g. the loss
        terms of a physics-informed network; :mod:`twophase.auxiliary`), else
        ``None``.
      jacobian_evals: int32, residual Jacobians built by the second phase
        (:func:`twophase.levenberg_marquardt`), over all trials.
      cost: float32, the second phase's cost in evaluation-equivalents:
        ``value_and_grad_evals + HVP_COST * hessian_vector_products +
        JACOBIAN_COST * jacobian_evals`` (:mod:`twophase.second_phase.contract`).
    """

    cg_iterations: jax.Array | None = None
    value_and_grad_evals: jax.Array | None = None
    restarts: jax.Array | None = None
    linesearch_failures: jax.Array | None = None
    value: jax.Array | None = None
    grad_norm: jax.Array | None = None
    nonfinite_events: jax.Array | None = None
    consecutive_failures: jax.Array | None = None
    phase: jax.Array | None = None
    switch_step: jax.Array | None = None
    step: jax.Array | None = None
    grad_norm_stat: jax.Array | None = None
    grad_norm_max: jax.Array | None = None
    skipped_steps: jax.Array | None = None
    fallbacks: jax.Array | None = None
    switches: jax.Array | None = None
    return_step: jax.Array | None = None
    hessian_vector_products: jax.Array | None = None
    cost: jax.Array | None = None
    zero_steps: jax.Array | None = None
    foreign_updates: jax.Array | None = None
    jacobian_evals: jax.Array | None = None
    aux: Any = None


def _find(state: Any, kind: type) -> list:
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
    return [_unwrap_variables(n) for n in nodes if isinstance(n, kind)]


def _is_flax_variable(x: Any) -> bool:
    """Duck-typed test for a ``flax.nnx.Variable`` (e.g. the ``OptArray`` leaves
    of an ``nnx.Optimizer``'s ``opt_state``), without importing flax."""
    return type(x).__module__.startswith("flax.") and callable(getattr(x, "get_value", None))


def _unwrap_variables(node: Any) -> Any:
    """``node`` with every flax Variable replaced by its value."""
    return jax.tree.map(
        lambda x: x.get_value() if _is_flax_variable(x) else x, node, is_leaf=_is_flax_variable
    )


def _only(found: list, what: str):
    if len(found) > 1:
        raise ValueError(
            f"`state` holds {len(found)} {what} states (e.g. optax.partition over several "
            "twophase optimizers): use twophase.info_all(state) for one Info per state, "
            "or pass info() the part of the state that holds one."
        )
    return found[0] if found else None


def info(state: Any) -> Info:
    """Diagnostics view of ``state``: a second-phase state (e.g.
    :func:`twophase.nonlinear_cg`, :func:`twophase.second_phase.newton_cg`) or a
    :func:`twophase.two_phase` state, or any pytree that nests one
    (``optax.chain``, ``optax.inject_hyperparams``, ``optax.masked``,
    ``optax.partition``, ``optax.MultiSteps``, an ``nnx.Optimizer``'s
    ``opt_state``, ...). Second-phase fields are read by name
    (:mod:`twophase.second_phase`). Pure and jit-compatible.

    Raises:
      ValueError: ``state`` holds no twophase state, or several (the message
        points to :func:`info_all`).
    """
    two = _only(_find(state, TwoPhaseState), "two_phase")
    inner = _only(
        states_with_field(state if two is None else two.second_state, "value_and_grad_evals"),
        "second-phase",
    )
    if two is None and inner is None:
        raise ValueError("`state` holds no twophase optimizer state.")
    return _info_of(two, inner)


def info_all(state: Any) -> tuple[Info, ...]:
    """One :class:`Info` per twophase optimizer held in ``state``, in the order
    of ``jax.tree.leaves`` (e.g. the labels of an ``optax.partition``, sorted):
    every :func:`twophase.two_phase` state, then every second-phase state (a
    NamedTuple with ``value_and_grad_evals``) that is not the second phase of
    one. Empty if ``state`` holds none. Pure and jit-compatible.
    """
    twos = _find(state, TwoPhaseState)
    found = [
        _info_of(two, _only(states_with_field(two.second_state, "value_and_grad_evals"), ""))
        for two in twos
    ]

    def is_two(x):
        return isinstance(x, TwoPhaseState)

    def is_either(x):
        return is_two(x) or has_field(x, "value_and_grad_evals")

    for node in jax.tree.leaves(state, is_leaf=is_either):
        if is_either(node) and not is_two(node):
            found.append(_info_of(None, node))
    return tuple(found)


_SECOND_PHASE_FIELDS = (
    "cg_iterations",
    "value_and_grad_evals",
    "restarts",
    "linesearch_failures",
    "value",
    "nonfinite_events",
    "consecutive_failures",
    "hessian_vector_products",
    "jacobian_evals",
    "aux",
)


def _info_of(two: TwoPhaseState | None, inner: Any) -> Info:
    fields: dict[str, Any] = {}
    if inner is not None:
        inner = _unwrap_variables(inner)
        fields.update({name: getattr(inner, name, None) for name in _SECOND_PHASE_FIELDS})
        grad = getattr(inner, "grad", None)
        if grad is not None:
            fields["grad_norm"] = jnp.where(
                jnp.isfinite(inner.value),
                jnp.asarray(safe_norm(grad)).astype(jnp.result_type(inner.value)),
                jnp.inf,
            )
    if two is not None:
        two = _unwrap_variables(two)
        fields["value_and_grad_evals"] = two.second_phase_evals
        fields["hessian_vector_products"] = two.second_phase_hvps
        fields["jacobian_evals"] = two.second_phase_jacobians
        fields["zero_steps"] = two.second_phase_linesearch_failures
        for detector in states_with_field(two.detector_state, "value_and_grad_evals"):
            fields["value_and_grad_evals"] = (
                fields["value_and_grad_evals"] + detector.value_and_grad_evals
            )
        fields.update(
            phase=two.phase,
            switch_step=two.switch_step,
            step=two.step,
            grad_norm_stat=field(two.detector_state, "grad_norm_stat"),
            grad_norm_max=field(two.detector_state, "grad_norm_max"),
            skipped_steps=two.skipped_steps,
            fallbacks=two.fallbacks,
            foreign_updates=two.foreign_updates,
            switches=two.switches,
            return_step=two.return_step,
        )
    if two is None and fields.get("linesearch_failures") is not None:
        fields["zero_steps"] = fields["linesearch_failures"]
    evals = fields.get("value_and_grad_evals")
    if evals is not None:
        fields["cost"] = second_phase_cost(
            evals,
            _or_zero(fields.get("hessian_vector_products")),
            _or_zero(fields.get("jacobian_evals")),
        )
    return Info(**fields)


def _or_zero(count: jax.Array | None) -> jax.Array:
    return jnp.zeros((), jnp.int32) if count is None else count
