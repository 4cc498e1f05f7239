"""The two-phase optimizer: a first-order phase, a detector, a second phase.

Hrycej et al., "A Convexity-dependent Two-Phase Training Algorithm for Deep
Neural Networks", KDIR 2025 (arXiv 2510.25366), Algorithm 1: Adam on
mini-batches while the loss is non-convex; once the gradient norm has peaked,
full-batch nonlinear conjugate gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree
from jax import lax

from twophase import auxiliary as _aux
from twophase import detectors as _det
from twophase import policy as _policy
from twophase._checks import concrete
from twophase._control import run_if
from twophase._gated_adam import AdamConstants, gated_adam_update
from twophase._numerics import finite_and_norm
from twophase.second_phase import contract as _sp
from twophase.second_phase.evaluating import evaluating

__all__ = ["TwoPhaseState", "two_phase"]

_PRESETS = ("adam_cg", "adam_lbfgs", "adam_newton_cg", "adam_second_moment_preconditioner")


def __getattr__(name: str) -> Any:
    """The presets, which moved to :mod:`twophase.presets`, under their old
    address (imported on first use: the presets import this module)."""
    if name in _PRESETS:
        from twophase import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PyTree = Any
Handover = Callable[[PyTree, PyTree, PyTree], PyTree]


class TwoPhaseState(NamedTuple):
    """State of :func:`two_phase`.

    Attributes:
      phase: int32 scalar, 0 (first transformation) or 1 (second).
      switch_step: int32 scalar, the step index of the latest switch's first
        second-phase step; -1 before the first switch.
      step: int32 scalar, number of ``update`` calls so far.
      phase0_steps: int32 scalar, first-phase steps since the policy was
        (re-)armed; the ``step`` a detector sees.
      detector_state: the policy's (or detector's) state, e.g. its rolling
        statistics.
      first_state: state of the first transformation.
      second_state: state of the second transformation; fresh at every switch
        (initialised by ``init``, re-initialised at every return).
      skipped_steps: int32, first-phase steps skipped because the incoming
        gradient or loss was not finite.
      fallbacks: int32, returns from phase 1 to phase 0.
      second_phase_evals: int32, full-batch value-and-gradient evaluations of
        the second phase over all its trials (the increases of its state's
        ``value_and_grad_evals``; :mod:`twophase.second_phase`).
      second_phase_hvps: int32, its Hessian-vector products over all trials.
      switches: int32, switches from phase 0 to phase 1.
      return_step: int32, the step index of the latest return's first
        phase-0 step; -1 before the first return.
      second_phase_nonfinite: int32, second-phase steps whose update was not
        finite (dropped: the update was zero).
      second_phase_linesearch_failures: int32, line searches of the second
        phase over all its trials that found no decrease (a zero step; the
        increases of its state's ``linesearch_failures``). Each makes the next
        iteration a restart, and repeated ones return to the first phase under
        :func:`twophase.safe_resort`.
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
    second_phase_hvps: jax.Array
    switches: jax.Array
    return_step: jax.Array
    second_phase_nonfinite: jax.Array
    second_phase_linesearch_failures: jax.Array


def _strongly_typed(tree: Any) -> Any:
    """Drops weak types from an inner state (``optax.lbfgs`` initialises some
    scalars weakly typed and returns them strongly typed, which would retrace a
    jitted step once); the switch re-initialises ``second`` inside a loop carry,
    whose branches must agree on types."""
    return jax.tree.map(lambda x: lax.convert_element_type(x, jnp.asarray(x).dtype), tree)


def _as_policy(detector: Any, fallback: int | None) -> _policy.Policy:
    """A :class:`Policy` for a policy or a detector (told apart by their fields)."""
    if isinstance(detector, _policy.Policy):
        if fallback is not None:
            raise ValueError(
                "`fallback` applies to a detector; a policy decides its returns itself "
                "(e.g. `safe_resort(max_failures=k)`)."
            )
        return detector
    if isinstance(detector, _det.Detector):
        return _policy.from_detector(detector, fallback)
    raise ValueError(f"`detector` must be a twophase Detector or Policy, got {detector!r}.")


def two_phase(
    first: optax.GradientTransformation,
    second: optax.GradientTransformation,
    detector: _det.Detector | _policy.Policy,
    *,
    fallback: int | None = None,
    handover: Handover | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``first`` until the policy switches, then ``second`` until it returns.

    ``update(updates, state, params, *, value=None, value_fn, **extra_args)``:

    * **Phase 0**: ``updates`` is the incoming (mini-batch) gradient. The
      policy sees it, its norm and ``value`` (the mini-batch loss: optional,
      except for policies with ``needs_value``); then ``first`` is applied to
      it. A gradient (or ``value``) with a non-finite entry skips the step: the
      update is zero, neither the policy nor ``first`` sees it, and
      ``skipped_steps`` counts it.
    * **Switch**: if the policy switches at the phase-0 update with step index
      ``t`` (0-based over all ``update`` calls), that update is still ``first``'s
      and **the first second-phase step is step** ``t + 1`` (``switch_step``),
      as in Algorithm 1, which decides after each Adam epoch whether the next
      epoch is CG. ``second``'s state is fresh at the switch (initialised, and
      re-initialised at every return) and is passed through
      ``handover(first_state, second_state, params)`` if given, e.g. to hand
      Adam's second moments to CG as a preconditioner.
    * **Phase 1**: ``second`` is applied. It evaluates ``value_fn`` itself when
      its state has a ``value_and_grad_evals`` field (the second-phase contract,
      :mod:`twophase.second_phase`: :func:`twophase.nonlinear_cg`); any other
      transformation (e.g. ``optax.lbfgs()``) is wrapped by
      :func:`twophase.second_phase.evaluating`, which evaluates for it (nothing
      twice), computes in float32 at least and drops non-finite steps. The
      incoming ``updates`` are ignored in phase 1, so the caller may skip
      computing mini-batch gradients there. A ``grad=`` keyword (optax.lbfgs's
      convention) is accepted and ignored. A second-phase update with a
      non-finite entry is replaced by zeros (``second_phase_nonfinite``).
    * **Return**: after each phase-1 step the policy may return to phase 0
      (``fallbacks``, ``return_step``); the first transformation's state was
      kept, the second's is re-initialised and the policy re-armed.

    Inside ``optax.masked`` / ``optax.partition``, ``params`` (and so what
    ``value_fn`` receives in phase 1) is the masked tree, with
    ``optax.MaskedNode`` for the masked-out leaves: ``value_fn`` must accept
    that tree. Usually it is simpler to mask the other transformations.

    The phases are selected on device, with no Python control flow on traced
    values: one phase runs per step and the step compiles once; the switch and
    the returns do not recompile. The selection is ``lax.cond``'s semantics
    written as a ``lax.while_loop`` run zero or one time, which updates the
    state in place (a ``lax.cond`` copied the idle phase's buffers every step;
    see ``benchmarks/overhead.py``). Under ``jax.vmap`` with a batched phase
    (an ensemble) *both* phases execute every step and each member keeps its
    own (results stay correct; the cost is that of both phases). Derivatives
    through ``update`` (e.g. meta-gradients w.r.t. an injected learning rate,
    forward or reverse mode) are exact in phase 0; through a phase-1 step they
    are NaN.

    A :class:`twophase.Detector` is a one-way policy (the paper); with
    ``fallback=k``, ``k`` consecutive failed second-phase iterations (the
    contract's ``consecutive_failures``), or a non-finite step, return to
    phase 0 with the detector re-armed: the paper's "safe resort" when the path
    leaves the convex region. :func:`twophase.safe_resort` also returns when
    the second phase is slower than Adam.

    Args:
      first: the first-phase transformation (e.g. ``optax.adam(1e-3)``).
      second: the second-phase transformation (e.g. ``twophase.nonlinear_cg()``).
      detector: a :class:`twophase.Detector` or a :class:`twophase.Policy`.
      fallback: ``None`` or a positive int (detectors only).
      handover: optional ``(first_state, second_state, params) -> second_state``
        applied at the switch.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`TwoPhaseState`.

    Raises:
      ValueError: ``first``/``second`` not transformations, ``detector`` not a
        Detector or Policy, a bad ``fallback`` (or one given with a Policy) or
        ``handover``; at trace time, a non-scalar ``value``.
      TypeError: ``update`` without ``value_fn`` (at trace time), or without
        ``value`` for a policy that needs it.
    """
    return _two_phase(first, second, detector, fallback=fallback, handover=handover)


def _two_phase(
    first: optax.GradientTransformation,
    second: optax.GradientTransformation,
    detector: _det.Detector | _policy.Policy,
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
    checked = concrete(fallback)
    if (
        fallback is not None
        and checked is not None
        and (isinstance(checked, bool) or not isinstance(checked, int) or checked < 1)
    ):
        raise ValueError(f"`fallback` must be a positive int or None, got {fallback!r}.")
    policy = _as_policy(detector, fallback)
    if handover is not None and not callable(handover):
        raise ValueError(f"`handover` must be a callable or None, got {handover!r}.")
    first = optax.with_extra_args_support(first)
    second = optax.with_extra_args_support(second)
    wrapped_second = evaluating(second)

    def second_for(params):
        """``second`` if it evaluates ``value_fn`` itself, else its wrapper
        (decided from the state's fields, at trace time)."""
        if _sp.evaluates_itself(jax.eval_shape(second.init, params)):
            return second
        return wrapped_second

    def init_fn(params):
        izero = jnp.zeros([], jnp.int32)
        minus_one = jnp.full([], -1, jnp.int32)
        return TwoPhaseState(
            phase=izero,
            switch_step=minus_one,
            step=izero,
            phase0_steps=izero,
            detector_state=policy.init(params),
            first_state=_strongly_typed(first.init(params)),
            second_state=_strongly_typed(second_for(params).init(params)),
            skipped_steps=izero,
            fallbacks=izero,
            second_phase_evals=izero,
            second_phase_hvps=izero,
            switches=izero,
            return_step=minus_one,
            second_phase_nonfinite=izero,
            second_phase_linesearch_failures=izero,
        )

    def update_fn(updates, state, params=None, *, value=None, value_fn=None, **extra_args):
        if value_fn is None:
            raise TypeError(
                "two_phase.update requires the keyword argument `value_fn` "
                "(params -> full-batch objective), used from the switch on."
            )
        if params is None and jax.tree.leaves(updates):
            raise TypeError("two_phase.update requires `params`.")
        if policy.needs_value and value is None:
            raise TypeError("this policy needs the mini-batch loss: pass `value=` to update.")
        if value is not None and jnp.size(value) != 1:
            raise ValueError(
                "`value` must be the scalar mini-batch loss (the mean over the batch), got "
                f"shape {jnp.shape(value)}."
            )
        # A `grad=` keyword (optax.lbfgs's convention) is the incoming gradient again;
        # the second phase gets the full-batch one from value_fn.
        extra_args.pop("grad", None)
        value_kwargs = {} if value is None else {"value": value}
        second_phase = second_for(params)
        # Second-phase `aux` fields get their structure from value_fn (the same in
        # every branch below); no-op for a value_fn without aux.
        state = _aux.prepare_aux(state, value_fn, params)

        def grad_norm_and_finite(grad):
            # Finite per element (a huge finite gradient is a step, as for optax.adam);
            # one pass serves the policy and the finiteness check.
            finite, grad_norm = finite_and_norm(grad)
            grad_norm = grad_norm.astype(jnp.float32)
            if value is not None:
                finite &= jnp.all(jnp.isfinite(value))
            return grad_norm, finite

        def observe_phase0(grad, grad_norm, state):
            """The policy's phase-0 decision: the switch bookkeeping of both paths."""
            detector_state, fire = policy.first(
                state.detector_state,
                grad=grad,
                grad_norm=grad_norm,
                value=value,
                step=state.phase0_steps,
                params=params,
                value_fn=value_fn,
            )
            return state._replace(
                phase=fire.astype(jnp.int32),
                switch_step=jnp.where(fire, state.step + 1, state.switch_step),
                phase0_steps=state.phase0_steps + 1,
                detector_state=detector_state,
                switches=state.switches + fire.astype(jnp.int32),
            )

        def hand_over(fired, first_state, state):
            # The second phase's state is pristine here (initialised, and reset on
            # every return), so only a handover touches it at the switch.
            if handover is None:
                return state
            return state._replace(
                second_state=run_if(
                    fired, lambda s: handover(first_state, s, params), state.second_state
                )
            )

        def phase0(carry):
            grad_norm, finite = grad_norm_and_finite(carry[0])

            def run(carry):
                grad, state = carry
                state = observe_phase0(grad, grad_norm, state)
                new_updates, first_state = first.update(
                    grad,
                    state.first_state,
                    params,
                    value_fn=value_fn,
                    **value_kwargs,
                    **extra_args,
                )
                state = hand_over(state.phase == 1, first_state, state)
                return _like(new_updates, grad), state._replace(first_state=first_state)

            def skip(carry):
                grad, state = carry
                return optax.tree.zeros_like(grad), state._replace(
                    skipped_steps=state.skipped_steps + 1
                )

            return run_if(~finite, skip, run_if(finite, run, carry))

        def phase1(carry):
            _, state = carry
            new_updates, second_state = second_phase.update(
                carry[0], state.second_state, params, value_fn=value_fn, **extra_args
            )
            finite = _all_finite(new_updates)
            new_updates = optax.tree.where(finite, new_updates, optax.tree.zeros_like(new_updates))
            evals = _sp.value_and_grad_evals(second_state) - _sp.value_and_grad_evals(
                state.second_state
            )
            hvps = _sp.hessian_vector_products(second_state) - _sp.hessian_vector_products(
                state.second_state
            )
            zero_steps = _sp.linesearch_failures(second_state) - _sp.linesearch_failures(
                state.second_state
            )
            detector_state, back = policy.second(
                state.detector_state,
                value=_sp.current_value(second_state),
                cost=evals.astype(jnp.float32) + _sp.HVP_COST * hvps.astype(jnp.float32),
                failures=_sp.failures(second_state),
                finite=finite,
                params=params,
            )
            state = state._replace(
                second_state=second_state,
                detector_state=detector_state,
                second_phase_evals=state.second_phase_evals + evals,
                second_phase_hvps=state.second_phase_hvps + hvps,
                second_phase_nonfinite=state.second_phase_nonfinite + (~finite).astype(jnp.int32),
                second_phase_linesearch_failures=state.second_phase_linesearch_failures
                + zero_steps,
            )

            def go_back(state):
                return state._replace(
                    second_state=_aux.prepare_aux(
                        _strongly_typed(second_phase.init(params)), value_fn, params
                    ),
                    phase=jnp.zeros([], jnp.int32),
                    phase0_steps=jnp.zeros([], jnp.int32),
                    detector_state=policy.rearm(state.detector_state, params),
                    fallbacks=state.fallbacks + 1,
                    return_step=state.step + 1,
                )

            return _like(new_updates, carry[0]), run_if(back, go_back, state)

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
            grad_norm, finite = grad_norm_and_finite(grad)
            active = in_first & finite
            # Only the policy's scalars and state go through the loop: a carry holding
            # the optimizer states would be copied (benchmarks/overhead.py).
            decision = ("phase", "switch_step", "phase0_steps", "detector_state", "switches")

            def decide(fields):
                decided = observe_phase0(grad, grad_norm, state._replace(**fields))
                return {name: getattr(decided, name) for name in decision}

            state = state._replace(
                **run_if(active, decide, {name: getattr(state, name) for name in decision})
            )
            state = state._replace(
                skipped_steps=state.skipped_steps + (in_first & ~finite).astype(jnp.int32)
            )
            new_updates, first_state = gated_adam_update(
                adam, slot, state.first_state, active, ~in_first
            )
            state = hand_over(active & (state.phase == 1), first_state, state)
            return new_updates, state._replace(first_state=first_state)

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


def _all_finite(tree: Any) -> jax.Array:
    """bool scalar: every entry of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.ones([], bool)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
