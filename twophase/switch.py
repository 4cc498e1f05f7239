"""The two-phase optimizer: a first-order phase, a detector, a second phase.

Hrycej et al., "A Convexity-dependent Two-Phase Training Algorithm for Deep
Neural Networks", KDIR 2025 (arXiv 2510.25366), Algorithm 1: Adam on
mini-batches while the loss is non-convex; once the gradient norm has peaked,
full-batch nonlinear conjugate gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree
from jax import lax

from twophase import cg as _cg
from twophase import detectors as _det
from twophase import linesearch as _ls
from twophase._checks import concrete, is_number_in
from twophase._control import run_if
from twophase._gated_adam import AdamConstants, gated_adam_update
from twophase._numerics import finite_and_norm
from twophase.objectives import as_value_and_grad

__all__ = ["TwoPhaseState", "adam_cg", "adam_lbfgs", "two_phase"]

PyTree = Any
Handover = Callable[[PyTree, PyTree, PyTree], PyTree]


class TwoPhaseState(NamedTuple):
    """State of :func:`two_phase`.

    Attributes:
      phase: int32 scalar, 0 (first transformation) or 1 (second).
      switch_step: int32 scalar, the step index of the first second-phase step;
        -1 before the switch (it keeps the latest switch after a fallback).
      step: int32 scalar, number of ``update`` calls so far.
      phase0_steps: int32 scalar, first-phase steps since the detector was
        (re-)armed; the ``step`` the detector sees.
      detector_state: the detector's state (its rolling statistics).
      first_state: state of the first transformation.
      second_state: state of the second transformation; fresh at every switch
        (initialised by ``init``, re-initialised at every fallback).
      skipped_steps: int32, first-phase steps skipped because the incoming
        gradient or loss was not finite.
      fallbacks: int32, returns from phase 1 to phase 0 (``fallback=k``).
      second_phase_evals: int32, full-batch value-and-gradient evaluations made
        for a second phase that does not count its own (one that is not a
        :func:`twophase.nonlinear_cg`, e.g. ``optax.lbfgs()``): the evaluation
        at the current point when its state holds no finite ``value``, plus the
        ``num_linesearch_steps`` of an optax zoom line search in its state. 0 for
        a nonlinear CG second phase, which counts its own.
    """

    phase: jax.Array
    switch_step: jax.Array
    step: jax.Array
    phase0_steps: jax.Array
    detector_state: Any
    first_state: Any
    second_state: Any
    skipped_steps: jax.Array
    fallbacks: jax.Array
    second_phase_evals: jax.Array


def _strongly_typed(tree: Any) -> Any:
    """Drops weak types from an inner state (``optax.lbfgs`` initialises some
    scalars weakly typed and returns them strongly typed, which would retrace a
    jitted step once); the switch re-initialises ``second`` inside a loop carry,
    whose branches must agree on types."""
    return jax.tree.map(lambda x: lax.convert_element_type(x, jnp.asarray(x).dtype), tree)


def _holds(tree: Any, kind: type) -> bool:
    return any(
        isinstance(n, kind) for n in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
    )


def _consecutive_cg_failures(second_state) -> jax.Array:
    found = [
        n
        for n in jax.tree.leaves(
            second_state, is_leaf=lambda x: isinstance(x, _cg.NonlinearCGState)
        )
        if isinstance(n, _cg.NonlinearCGState)
    ]
    return found[0].consecutive_failures


def two_phase(
    first: optax.GradientTransformation,
    second: optax.GradientTransformation,
    detector: _det.Detector,
    *,
    fallback: int | None = None,
    handover: Handover | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``first`` until ``detector`` fires, then ``second``.

    ``update(updates, state, params, *, value=None, value_fn, **extra_args)``:

    * **Phase 0**: ``updates`` is the incoming (mini-batch) gradient. The
      detector sees it, its norm and ``value`` (the mini-batch loss: optional,
      except for detectors with ``needs_value``); then ``first`` is applied to
      it. A gradient (or ``value``) with a non-finite entry skips the step: the
      update is zero, neither the detector nor ``first`` sees it, and
      ``skipped_steps`` counts it.
    * **Switch**: if the detector fires at the phase-0 update with step index
      ``t`` (0-based over all ``update`` calls), that update is still ``first``'s
      and **the first second-phase step is step** ``t + 1`` (``switch_step``),
      as in Algorithm 1, which decides after each Adam epoch whether the next
      epoch is CG. ``second``'s state is fresh at the switch (initialised, and
      re-initialised at every fallback) and is passed through
      ``handover(first_state, second_state, params)`` if given, e.g. to hand
      Adam's second moments to CG as a preconditioner.
    * **Phase 1**: ``second`` is applied. A :func:`twophase.nonlinear_cg` (or a
      chain holding one) evaluates ``value_fn`` itself. Any other
      transformation (e.g. ``optax.lbfgs()``) receives ``value``, ``grad`` and
      ``value_fn`` at the current point, taken from the ``value``/``grad`` it
      stored in its state when finite (as :func:`optax.value_and_grad_from_state`
      does), else evaluated: nothing is evaluated twice. The incoming
      ``updates`` are ignored in phase 1, so the caller may skip computing
      mini-batch gradients there. A ``grad=`` keyword (``optax.lbfgs``'s
      convention) is accepted and ignored: the full-batch gradient comes from
      ``value_fn``. Evaluations made for a ``second`` that does not count its
      own are counted in ``second_phase_evals``.

    Inside ``optax.masked`` / ``optax.partition``, ``params`` (and so what
    ``value_fn`` receives in phase 1) is the masked tree, with
    ``optax.MaskedNode`` for the masked-out leaves: ``value_fn`` must accept
    that tree. Usually it is simpler to mask the other transformations.

    The phases are selected on device, with no Python control flow on traced
    values: one phase runs per step and the step compiles once; the switch does
    not recompile. The selection is ``lax.cond``'s semantics written as a
    ``lax.while_loop`` run zero or one time, which updates the state in place
    (a ``lax.cond`` copied the idle phase's buffers every step; see
    ``benchmarks/overhead.py``). Under ``jax.vmap`` with a batched phase (an
    ensemble) *both* phases execute every step and each member keeps its own
    (results stay correct; the cost is that of both phases). Derivatives through
    ``update`` (e.g. meta-gradients w.r.t. an injected learning rate, forward or
    reverse mode) are exact in phase 0; through a phase-1 step they are NaN.

    One-way by default (the paper). With ``fallback=k`` (``second`` must hold a
    ``nonlinear_cg``), ``k`` consecutive failed line searches in phase 1 return to
    phase 0 with the detector re-armed: the paper's "safe resort" when the path
    leaves the convex region.

    Args:
      first: the first-phase transformation (e.g. ``optax.adam(1e-3)``).
      second: the second-phase transformation (e.g. ``twophase.nonlinear_cg()``).
      detector: a :class:`twophase.Detector`.
      fallback: ``None`` or a positive int.
      handover: optional ``(first_state, second_state, params) -> second_state``
        applied at the switch.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`TwoPhaseState`.

    Raises:
      ValueError: ``first``/``second`` not transformations, ``detector`` not a
        Detector, a bad ``fallback`` or ``handover``; at trace time, a
        non-scalar ``value``.
      TypeError: ``update`` without ``value_fn`` (at trace time), or without
        ``value`` for a detector that needs it.
    """
    return _two_phase(first, second, detector, fallback=fallback, handover=handover)


def _two_phase(
    first: optax.GradientTransformation,
    second: optax.GradientTransformation,
    detector: _det.Detector,
    *,
    fallback: int | None,
    handover: Handover | None,
    adam: AdamConstants | None = None,
) -> optax.GradientTransformationExtraArgs:
    """:func:`two_phase`; with ``adam`` given, ``first`` is ``optax.adam`` with
    those constants and its phase-0 step is the fused :func:`gated_adam_update`
    (same updates and states, fewer passes over the parameters)."""
    for name, transformation in (("first", first), ("second", second)):
        if not (
            callable(getattr(transformation, "init", None))
            and callable(getattr(transformation, "update", None))
        ):
            raise ValueError(
                f"`{name}` must be an optax GradientTransformation, got {transformation!r}."
            )
    if not isinstance(detector, _det.Detector):
        raise ValueError(f"`detector` must be a twophase Detector, got {detector!r}.")
    checked = concrete(fallback)
    if (
        fallback is not None
        and checked is not None
        and (isinstance(checked, bool) or not isinstance(checked, int) or checked < 1)
    ):
        raise ValueError(f"`fallback` must be a positive int or None, got {fallback!r}.")
    if handover is not None and not callable(handover):
        raise ValueError(f"`handover` must be a callable or None, got {handover!r}.")
    first = optax.with_extra_args_support(first)
    second = optax.with_extra_args_support(second)

    def init_fn(params):
        izero = jnp.zeros([], jnp.int32)
        return TwoPhaseState(
            phase=izero,
            switch_step=jnp.full([], -1, jnp.int32),
            step=izero,
            phase0_steps=izero,
            detector_state=detector.init(params),
            first_state=_strongly_typed(first.init(params)),
            second_state=_strongly_typed(second.init(params)),
            skipped_steps=izero,
            fallbacks=izero,
            second_phase_evals=izero,
        )

    def update_fn(updates, state, params=None, *, value=None, value_fn=None, **extra_args):
        if value_fn is None:
            raise TypeError(
                "two_phase.update requires the keyword argument `value_fn` "
                "(params -> full-batch objective), used from the switch on."
            )
        if params is None and jax.tree.leaves(updates):
            raise TypeError("two_phase.update requires `params`.")
        if detector.needs_value and value is None:
            raise TypeError("this detector needs the mini-batch loss: pass `value=` to update.")
        if value is not None and jnp.size(value) != 1:
            raise ValueError(
                "`value` must be the scalar mini-batch loss (the mean over the batch), got "
                f"shape {jnp.shape(value)}."
            )
        second_evaluates_itself = _holds(state.second_state, _cg.NonlinearCGState)
        if fallback is not None and not second_evaluates_itself:
            raise TypeError("`fallback` needs a second phase that holds a nonlinear_cg.")
        # A `grad=` keyword (optax.lbfgs's convention) is the incoming gradient again;
        # the second phase gets the full-batch one from value_fn.
        extra_args.pop("grad", None)
        value_and_grad = as_value_and_grad(value_fn, params)
        value_kwargs = {} if value is None else {"value": value}

        def phase0(carry):
            grad = carry[0]
            # Finite per element (a huge finite gradient is a step, as for optax.adam).
            finite, grad_norm = finite_and_norm(grad)
            grad_norm = grad_norm.astype(jnp.float32)
            if value is not None:
                finite &= jnp.all(jnp.isfinite(value))

            def run(carry):
                grad, state = carry
                detector_state, fire = detector.update(
                    state.detector_state,
                    grad=grad,
                    grad_norm=grad_norm,
                    value=value,
                    step=state.phase0_steps,
                    params=params,
                    value_fn=value_fn,
                )
                new_updates, first_state = first.update(
                    grad,
                    state.first_state,
                    params,
                    value_fn=value_fn,
                    **value_kwargs,
                    **extra_args,
                )
                # The second phase's state is pristine here (initialised, and reset
                # on every fallback), so only a handover touches it at the switch.
                second_state = state.second_state
                if handover is not None:
                    second_state = run_if(
                        fire, lambda s: handover(first_state, s, params), second_state
                    )
                return _like(new_updates, grad), state._replace(
                    phase=fire.astype(jnp.int32),
                    switch_step=jnp.where(fire, state.step + 1, state.switch_step),
                    phase0_steps=state.phase0_steps + 1,
                    detector_state=detector_state,
                    first_state=first_state,
                    second_state=second_state,
                )

            def skip(carry):
                grad, state = carry
                return optax.tree.zeros_like(grad), state._replace(
                    skipped_steps=state.skipped_steps + 1
                )

            return run_if(~finite, skip, run_if(finite, run, carry))

        def phase1(carry):
            _, state = carry
            if second_evaluates_itself:
                new_updates, second_state = second.update(
                    carry[0], state.second_state, params, value_fn=value_fn, **extra_args
                )
            else:
                cur_value, cur_grad, evaluated = _value_and_grad_from_state(
                    state.second_state, params, value_and_grad
                )
                new_updates, second_state = second.update(
                    cur_grad,
                    state.second_state,
                    params,
                    value=cur_value,
                    grad=cur_grad,
                    value_fn=value_fn,
                    **extra_args,
                )
                state = state._replace(
                    second_phase_evals=state.second_phase_evals
                    + evaluated.astype(jnp.int32)
                    + _linesearch_evals(second_state)
                )
            new_state = state._replace(second_state=second_state)
            if fallback is not None:
                give_up = _consecutive_cg_failures(second_state) >= fallback
                new_state = new_state._replace(
                    second_state=run_if(
                        give_up, lambda _: _strongly_typed(second.init(params)), second_state
                    ),
                    phase=jnp.where(give_up, 0, 1).astype(jnp.int32),
                    phase0_steps=jnp.where(give_up, 0, state.phase0_steps),
                    detector_state=run_if(
                        give_up, lambda _: detector.init(params), state.detector_state
                    ),
                    fallbacks=state.fallbacks + give_up.astype(jnp.int32),
                )
            return _like(new_updates, carry[0]), new_state

        def _like(tree, ref):
            return jax.tree.map(lambda x, r: x.astype(r.dtype), tree, ref)

        def fused_adam_step(grad, state):
            # Adam runs outside any loop, switched on and off by scalars, so that XLA
            # fuses it with the caller's apply_updates as it does optax.adam. The
            # second phase runs first and writes its update over the incoming
            # gradient (`slot`), which Adam's pass hands on where it is inactive.
            # Everything reads the gradient through that loop's output: a loop
            # operand with other users would be copied before the loop.
            in_first = state.phase == 0
            slot, state = run_if(~in_first, phase1, (grad, state), differentiable=False)
            grad = slot  # in phase 0, where it is read as a gradient
            finite, grad_norm = finite_and_norm(grad)
            grad_norm = grad_norm.astype(jnp.float32)
            if value is not None:
                finite &= jnp.all(jnp.isfinite(value))
            active = in_first & finite

            def detect(carry):
                _, switch_step, phase0_steps, detector_state = carry
                detector_state, fire = detector.update(
                    detector_state,
                    grad=grad,
                    grad_norm=grad_norm,
                    value=value,
                    step=phase0_steps,
                    params=params,
                    value_fn=value_fn,
                )
                return (
                    fire.astype(jnp.int32),
                    jnp.where(fire, state.step + 1, switch_step),
                    phase0_steps + 1,
                    detector_state,
                )

            phase, switch_step, phase0_steps, detector_state = run_if(
                active,
                detect,
                (state.phase, state.switch_step, state.phase0_steps, state.detector_state),
            )
            state = state._replace(
                phase=phase,
                switch_step=switch_step,
                phase0_steps=phase0_steps,
                detector_state=detector_state,
                skipped_steps=state.skipped_steps + (in_first & ~finite).astype(jnp.int32),
            )
            new_updates, first_state = gated_adam_update(
                adam, slot, state.first_state, active, ~in_first
            )
            state = state._replace(first_state=first_state)
            if handover is not None:
                fired = active & (state.phase == 1)
                state = state._replace(
                    second_state=run_if(
                        fired, lambda s: handover(first_state, s, params), state.second_state
                    )
                )
            return new_updates, state

        # The incoming gradient is the carry that becomes the outgoing update, so
        # phase 0 can write Adam's update over it in place. Its dtype is promoted
        # with the parameters' so that neither phase's update loses precision.
        in_first_phase = state.phase == 0
        grad = jax.tree.map(
            lambda u, p: u.astype(jnp.promote_types(u.dtype, jnp.result_type(p))), updates, params
        )
        if adam is None:
            carry = run_if(in_first_phase, phase0, (grad, state))
            new_updates, new_state = run_if(~in_first_phase, phase1, carry, differentiable=False)
        else:
            new_updates, new_state = fused_adam_step(grad, state)
        new_updates = jax.tree.map(lambda u, p: u.astype(jnp.result_type(p)), new_updates, params)
        return new_updates, new_state._replace(step=optax.safe_increment(state.step))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _value_and_grad_from_state(second_state, params, value_and_grad):
    """(value, grad, evaluated) at ``params``: from the ``value``/``grad`` a
    transformation stored in its state when finite, else evaluated
    (``evaluated``, a bool scalar, says which)."""
    stored_value = optax.tree.get(second_state, "value")
    stored_grad = optax.tree.get(second_state, "grad")
    if stored_value is None or stored_grad is None:
        return *value_and_grad(params), jnp.ones([], bool)
    cached = jnp.isfinite(stored_value)
    value, grad = lax.cond(
        cached,
        lambda: (
            stored_value,
            jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), stored_grad, params),
        ),
        lambda: jax.tree.map(
            lambda x, ref: x.astype(ref.dtype), value_and_grad(params), (stored_value, stored_grad)
        ),
    )
    return value, grad, ~cached


def _linesearch_evals(second_state) -> jax.Array:
    """Evaluations of the last optax zoom line search held in ``second_state``
    (``num_linesearch_steps``; each trial evaluates the value and gradient), 0
    if it holds none."""
    kind = optax.ScaleByZoomLinesearchState
    found = [
        node.info.num_linesearch_steps
        for node in jax.tree.leaves(second_state, is_leaf=lambda x: isinstance(x, kind))
        if isinstance(node, kind)
    ]
    return sum((jnp.asarray(n, jnp.int32) for n in found), jnp.zeros([], jnp.int32))


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


def _default_detector(window: int, min_steps: int) -> _det.Detector:
    return _det.loss_plateau(window, patience=5, history=10, z_score=1.0, min_steps=min_steps)


def adam_cg(
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    ratio: float = 0.9,
    window: int = 100,
    min_steps: int = 0,
    detector: _det.Detector | None = None,
    beta: str | _cg.BetaFn = "polak_ribiere",
    linesearch: str | _ls.LineSearch = "wolfe",
    fallback: int | None = None,
    precondition: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then full-batch nonlinear CG: the paper's two-phase optimizer.

    ``two_phase(optax.adam(...), twophase.nonlinear_cg(beta, linesearch), detector)``,
    with the same updates and states, except that Adam's step is not run inside
    a loop but switched by scalar coefficients (``twophase._gated_adam``), which
    lets XLA fuse it with ``optax.apply_updates`` as it does ``optax.adam``'s: in
    phase 0 the step costs optax.adam's plus one reduction over the gradient
    (its norm, for the non-finite check and the detector) and one more read of
    it (``benchmarks/overhead.py``). In phase 1 that pass still runs, leaving
    Adam's state unchanged and passing CG's update on (a few elementwise passes,
    small beside a full-batch evaluation).

    Call ``update(grads, state, params, value=loss, value_fn=full_batch_loss)``
    with the mini-batch gradient and loss; ``value_fn(params)`` is the
    full-batch objective that the CG phase evaluates itself.

    With ``detector=None`` the switch is decided by
    :func:`twophase.loss_plateau` (``window``, ``history=10``, ``patience=5``,
    ``z_score=1``, ``min_steps``): it keeps the mean mini-batch loss of every
    window since the start (merging windows as they accumulate) and fires once
    a least-squares line through the last 10 means, which span the last half of
    the run or more, has shown no clear decrease for 5 consecutive windows; so
    it needs ``value=`` at every update. Why this default (measured,
    ``benchmarks/RESULTS.md``): at equal cost a switch to full-batch CG lost
    wherever Adam was still making progress, and paid off as a final polish
    once Adam had stalled. This detector costs nothing (no full-batch
    evaluation, no buffer), so while it waits Adam+CG *is* Adam, and it waits
    until Adam's loss has stopped falling at the run's own time scale. The
    alternatives lose at equal cost: the paper's own rule,
    :func:`twophase.grad_norm_peak` (``ratio``), fires at epoch 2 on every
    problem we measured (the full-batch norm falls from epoch 1 to 2 and
    fluctuates by tens of percent between epochs) and loses 2.8x-4.2x;
    :func:`twophase.norm_loss_slope` with exact full-batch checks pays one
    evaluation per window (up to 1.9x); a fixed-length loss window fired in
    short flat stretches that Adam later left (1.2x-1.3x); mini-batch estimates
    of the full-batch gradient norm sit at the noise floor or collapse to 0
    along Adam's path. Set ``window`` to the steps per epoch. Pass
    ``detector=grad_norm_peak(ratio, window)`` for Algorithm 1 as published.

    Memory: Adam's two parameter-sized buffers and CG's two: 2x Adam's state
    (one more with ``precondition=True``; L-BFGS with memory 10 holds 23).

    ``optax.inject_hyperparams(twophase.adam_cg, static_args=("detector",
    "beta", "linesearch"))`` makes the learning rate (and the other numeric
    arguments) injectable hyperparameters.

    Args:
      learning_rate: Adam's learning rate or schedule.
      b1, b2, eps: Adam's constants.
      ratio: the paper's tolerance, used by ``grad_norm_peak`` when requested
        through ``detector``; validated here.
      window: detector window in steps (typically the steps per epoch).
      min_steps: never switch before this many steps.
      detector: a :class:`twophase.Detector`, or ``None`` for the default.
      beta: CG direction rule (see :func:`twophase.nonlinear_cg`).
      linesearch: CG line search.
      fallback: see :func:`two_phase`.
      precondition: precondition CG with Adam's second-moment estimate at the
        switch (one more parameter-sized buffer). Measured worth it for a
        switch after a long Adam phase (four small ViTs after 900 of 1000
        epochs: 0.90x-0.98x Adam's loss, plain CG 1.06x-1.15x); it lost after a
        very short one, where the estimate is poor (``benchmarks/RESULTS.md``).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.
    """
    _det._check_ratio(ratio)
    _det._check_int("window", window, 1)
    _det._check_int("min_steps", min_steps, 0)
    _check_adam_constants(learning_rate, b1, b2, eps)
    if not isinstance(precondition, bool):
        raise ValueError(f"`precondition` must be a bool, got {precondition!r}.")
    if detector is None:
        detector = _default_detector(window, min_steps)
    elif not isinstance(detector, _det.Detector):
        raise ValueError(f"`detector` must be a twophase Detector or None, got {detector!r}.")
    second = _cg.nonlinear_cg(beta, linesearch, preconditioner="state" if precondition else None)
    return _two_phase(
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
        second,
        detector,
        fallback=fallback,
        handover=adam_second_moment_preconditioner if precondition else None,
        adam=AdamConstants(learning_rate, b1, b2, eps),
    )


def adam_lbfgs(
    learning_rate: float | optax.ScalarOrSchedule = 1e-3,
    *,
    memory_size: int = 10,
    window: int = 100,
    min_steps: int = 0,
    detector: _det.Detector | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adam, then full-batch ``optax.lbfgs(memory_size)``: the same switch as
    :func:`adam_cg` with L-BFGS (zoom line search) as the second phase."""
    _det._check_int("window", window, 1)
    _det._check_int("min_steps", min_steps, 0)
    if isinstance(memory_size, jax.Array):  # a (traced) injected hyperparameter
        raise ValueError(
            "`memory_size` sets the L-BFGS buffers' shapes and cannot be injected: pass "
            "optax.inject_hyperparams(twophase.adam_lbfgs, static_args=('memory_size',))."
        )
    _det._check_int("memory_size", memory_size, 1)
    _check_adam_constants(learning_rate, 0.9, 0.999, 1e-8)
    if detector is None:
        detector = _default_detector(window, min_steps)
    return _two_phase(
        optax.adam(learning_rate),
        optax.lbfgs(memory_size=memory_size),
        detector,
        fallback=None,
        handover=None,
        adam=AdamConstants(learning_rate, 0.9, 0.999, 1e-8),
    )
