"""The two-phase optimizer: a first phase, a policy, a second phase.

Hrycej et al., "A Convexity-dependent Two-Phase Training Algorithm for Deep
Neural Networks", KDIR 2025 (arXiv 2510.25366), Algorithm 1: a first-order
method on mini-batches while the loss is non-convex; once the policy decides,
a full-batch second phase.

This module knows no particular optimizer. A first phase that implements
:class:`twophase.first_phase.GatedFirstPhase` (e.g.
:func:`twophase.first_phase.gated_adam`) is fused: it runs outside any
conditional, switched by scalars, so XLA keeps it in one elementwise pass with
the caller's ``apply_updates``. Any other first phase runs inside a
conditional. The stages of one ``update`` are the module-level functions below
(:func:`select_phase` composes them).
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
from twophase._control import eager_jit, fresh_buffers, run_if
from twophase._numerics import all_finite, fingerprint, finite_and_norm
from twophase.first_phase import GatedFirstPhase
from twophase.second_phase import contract as _sp
from twophase.second_phase.evaluating import evaluating

__all__ = [
    "StepContext",
    "TwoPhaseState",
    "advanced_as_returned",
    "first_phase_step",
    "fused_step",
    "guard_output",
    "hand_over",
    "init_state",
    "observe_first_phase",
    "prepare_gradient",
    "probe",
    "return_to_first",
    "second_phase_step",
    "select_phase",
    "two_phase",
]

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
        gradient or loss was not finite, or whose update was not finite
        (replaced by zeros).
      fallbacks: int32, returns from phase 1 to phase 0.
      second_phase_evals: int32, full-batch value-and-gradient evaluations of
        the second phase over all its trials (the increases of its state's
        ``value_and_grad_evals``; :mod:`twophase.second_phase`).
      second_phase_hvps: int32, its Hessian-vector products over all trials.
      second_phase_jacobians: int32, its residual Jacobians over all trials
        (``jacobian_evals``, e.g. :func:`twophase.levenberg_marquardt`).
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
      foreign_updates: int32, second-phase steps at which the parameters had
        not advanced by the update returned before (something between
        ``update`` and the parameters changed it, e.g. a transformation
        chained after this one); each restarted the second phase.
      expected: float32 ``(3,)``, :func:`twophase._numerics.fingerprint` of the
        parameters the previous second-phase update leads to; ``-1`` when no
        check is due (phase 0, a fresh second phase). Not NaN, so that states
        compare equal across processes (``multihost_utils.assert_equal``).
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
    second_phase_jacobians: jax.Array
    switches: jax.Array
    return_step: jax.Array
    second_phase_nonfinite: jax.Array
    second_phase_linesearch_failures: jax.Array
    foreign_updates: jax.Array
    expected: jax.Array


class StepContext(NamedTuple):
    """What one ``update`` call's stages share (built by :func:`two_phase`).

    Attributes:
      first: the first transformation (extra-args aware).
      second: the second transformation as called (itself when it evaluates
        ``value_fn``, else wrapped by :func:`twophase.evaluating`).
      policy: the :class:`twophase.Policy`.
      handover: ``(first_state, second_state, params) -> second_state`` or ``None``.
      params: the parameters (pytree).
      value: the scalar mini-batch loss or ``None``.
      value_fn: ``params -> full-batch objective``.
      extra_args: further keyword arguments for the transformations.
      resume: the first phase's ``resume`` (``first_state -> first_state`` at a
        return; :class:`twophase.first_phase.GatedFirstPhase`), or ``None``.
    """

    first: Any
    second: Any
    policy: _policy.Policy
    handover: Handover | None
    params: PyTree
    value: Any
    value_fn: Callable
    extra_args: dict
    resume: Callable | None = None


def _strongly_typed(tree: PyTree) -> PyTree:
    """Drops weak types from an inner state (``optax.lbfgs`` initialises some
    scalars weakly typed and returns them strongly typed, which would retrace a
    jitted step once); the switch re-initialises ``second`` inside a loop carry,
    whose branches must agree on types."""
    return jax.tree.map(lambda x: lax.convert_element_type(x, jnp.asarray(x).dtype), tree)


def _as_policy(detector: Any, fallback: int | None) -> _policy.Policy:
    """A :class:`Policy` for a policy or a detector (told apart by their types)."""
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


def _check_transformations(first: Any, second: Any, fallback: Any, handover: Any) -> None:
    """ValueError naming the first bad argument of :func:`two_phase`."""
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
    if handover is not None and not callable(handover):
        raise ValueError(f"`handover` must be a callable or None, got {handover!r}.")


# --- The second phase's view of the parameters -----------------------------------------------
# Second phases compute on real floating-point leaves. A complex leaf is shown to them as its
# real and imaginary parts (a trailing axis of 2: C^n as R^2n, where the gradient is the
# steepest ascent direction), an integer or bool leaf as an empty float32 leaf (left alone).


def _is_real_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def needs_view(params: PyTree) -> bool:
    """Whether some leaf of ``params`` is not a real floating-point array (static)."""
    return not all(_is_real_float(x) for x in jax.tree.leaves(params))


def real_view(params: PyTree) -> PyTree:
    """``params`` as the second phase sees it (same tree; see the comment above)."""

    def leaf(x):
        if _is_real_float(x):
            return x
        if jnp.iscomplexobj(x):
            return jnp.stack([x.real, x.imag], axis=-1)
        return jnp.zeros((0,), jnp.float32)

    return jax.tree.map(leaf, params)


def from_real_view(view: PyTree, params: PyTree) -> PyTree:
    """The inverse of :func:`real_view` for the leaves it changed: the view's
    values back in ``params``' leaves (integer leaves keep ``params``' value)."""

    def leaf(v, x):
        if _is_real_float(x):
            return v
        if jnp.iscomplexobj(x):
            return lax.complex(v[..., 0], v[..., 1]).astype(jnp.result_type(x))
        return x

    return jax.tree.map(leaf, view, params)


def _view_update(view_update: PyTree, params: PyTree) -> PyTree:
    """A second-phase update on the view as an update of ``params`` (zeros on
    integer leaves)."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    return from_real_view(view_update, zeros)


def _check_view(params: PyTree, handover: Handover | None) -> None:
    """ValueError naming a leaf that a handover cannot see through the view."""
    if handover is None or not needs_view(params):
        return
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if not _is_real_float(x):
            raise ValueError(
                f"the parameter {jax.tree_util.keystr(path)} has dtype {jnp.result_type(x)}: a "
                "handover (e.g. precondition=True) needs real floating-point parameters "
                "(split complex ones into real and imaginary parts, or keep integer "
                "leaves out of the optimized tree)."
            )


# --- Stages of one update ----------------------------------------------------------------------


def _int_zero() -> jax.Array:
    return jnp.zeros([], jnp.int32)


def init_state(first: Any, second: Any, policy: _policy.Policy, params: PyTree) -> TwoPhaseState:
    """The state :func:`two_phase`'s ``init`` returns: counters at zero, both
    inner states initialised (the second on :func:`real_view` of ``params``).
    Every field is a buffer of its own, so the state can be donated."""
    state = TwoPhaseState(
        phase=_int_zero(),
        switch_step=jnp.full([], -1, jnp.int32),
        step=_int_zero(),
        phase0_steps=_int_zero(),
        detector_state=policy.init(params),
        first_state=_strongly_typed(first.init(params)),
        second_state=_strongly_typed(second.init(real_view(params))),
        skipped_steps=_int_zero(),
        fallbacks=_int_zero(),
        second_phase_evals=_int_zero(),
        second_phase_hvps=_int_zero(),
        second_phase_jacobians=_int_zero(),
        switches=_int_zero(),
        return_step=jnp.full([], -1, jnp.int32),
        second_phase_nonfinite=_int_zero(),
        second_phase_linesearch_failures=_int_zero(),
        foreign_updates=_int_zero(),
        expected=jnp.full([3], -1.0, jnp.float32),
    )
    return fresh_buffers(state)


def prepare_gradient(updates: PyTree, params: PyTree) -> PyTree:
    """The incoming gradient as the phases read it: integer and bool leaves
    (and their ``float0`` gradients) become zeros of the parameter's dtype;
    the others are promoted with the parameters' dtype, so that neither
    phase's update loses precision."""

    def leaf(u, p):
        dtype = jnp.result_type(p)
        if not jnp.issubdtype(dtype, jnp.inexact):
            return jnp.zeros(jnp.shape(p), dtype)
        return u.astype(jnp.promote_types(u.dtype, dtype))

    return jax.tree.map(leaf, updates, params)


def _like(tree: PyTree, ref: PyTree) -> PyTree:
    return jax.tree.map(lambda x, r: x.astype(jnp.result_type(r)), tree, ref)


def input_check(grad: PyTree, value: Any) -> tuple[jax.Array, jax.Array]:
    """``(gradient norm as float32, gradient and value finite)``: finiteness per
    element (a huge finite gradient is a step, as for ``optax.adam``); one pass
    serves the policy and the check."""
    finite, grad_norm = finite_and_norm(grad)
    if value is not None:
        finite &= jnp.all(jnp.isfinite(value))
    return grad_norm.astype(jnp.float32), finite


def observe_first_phase(
    ctx: StepContext, state: TwoPhaseState, grad: PyTree, grad_norm: jax.Array
) -> TwoPhaseState:
    """The policy's phase-0 decision and the switch bookkeeping."""
    detector_state, fire = ctx.policy.first(
        state.detector_state,
        grad=grad,
        grad_norm=grad_norm,
        value=ctx.value,
        step=state.phase0_steps,
        params=ctx.params,
        value_fn=ctx.value_fn,
    )
    return state._replace(
        phase=fire.astype(jnp.int32),
        switch_step=jnp.where(fire, state.step + 1, state.switch_step),
        phase0_steps=state.phase0_steps + 1,
        detector_state=detector_state,
        switches=state.switches + fire.astype(jnp.int32),
    )


def hand_over(
    ctx: StepContext, fired: jax.Array, first_state: PyTree, state: TwoPhaseState
) -> TwoPhaseState:
    """At a switch (``fired``), ``handover(first_state, second_state, params)``.
    The second phase's state is pristine there (initialised, and reset on every
    return), so only a handover touches it."""
    if ctx.handover is None:
        return state

    def apply(second_state):
        return ctx.handover(first_state, second_state, ctx.params)

    return state._replace(second_state=run_if(fired, apply, state.second_state))


def first_phase_step(ctx: StepContext, carry: tuple) -> tuple:
    """Phase 0 for a first phase that is not gated: ``(grad, state) -> (update,
    state)`` with the policy's decision; a non-finite gradient or value is a
    zero step (``skipped_steps``), unseen by the policy and ``first``."""
    grad_norm, finite = input_check(carry[0], ctx.value)
    value_kwargs = {} if ctx.value is None else {"value": ctx.value}

    def run(carry):
        grad, state = carry
        state = observe_first_phase(ctx, state, grad, grad_norm)
        new_updates, first_state = ctx.first.update(
            grad,
            state.first_state,
            ctx.params,
            value_fn=ctx.value_fn,
            **value_kwargs,
            **ctx.extra_args,
        )
        state = hand_over(ctx, state.phase == 1, first_state, state)
        return _like(new_updates, grad), state._replace(first_state=first_state)

    def skip(carry):
        grad, state = carry
        return optax.tree.zeros_like(grad), state._replace(skipped_steps=state.skipped_steps + 1)

    return run_if(~finite, skip, run_if(finite, run, carry))


def _second_inputs(ctx: StepContext) -> tuple[PyTree, Callable]:
    """``(params, value_fn)`` as the second phase sees them (:func:`real_view`)."""
    if not needs_view(ctx.params):
        return ctx.params, ctx.value_fn
    params = ctx.params
    return real_view(params), lambda view: ctx.value_fn(from_real_view(view, params))


def fresh_second_state(ctx: StepContext) -> PyTree:
    """The second phase's state as at ``init`` (its ``aux`` fields shaped by ``value_fn``)."""
    view, value_fn = _second_inputs(ctx)
    return _aux.prepare_aux(_strongly_typed(ctx.second.init(view)), value_fn, view)


def advanced_as_returned(params: PyTree, state: TwoPhaseState) -> jax.Array:
    """bool scalar: ``params`` are where the previous second-phase update led
    (or no check is due). False when something between ``update`` and the
    parameters changed that update; changes below about 1e-5 of the
    parameters' magnitudes, or that keep :func:`twophase._numerics.fingerprint`,
    go unnoticed."""
    expected = state.expected
    got = fingerprint(params)
    scale = jnp.stack([expected[1], expected[1], expected[2]])
    close = jnp.all(jnp.abs(got - expected) <= 1e-5 * scale + jnp.finfo(jnp.float32).tiny)
    return (expected[1] < 0) | close


def _restart_second(ctx: StepContext, state: TwoPhaseState) -> TwoPhaseState:
    """A fresh second phase after a foreign change of its update (counted)."""
    return state._replace(
        second_state=fresh_second_state(ctx), foreign_updates=state.foreign_updates + 1
    )


def second_phase_step(ctx: StepContext, carry: tuple) -> tuple:
    """Phase 1: ``(incoming, state) -> (update, state)``. ``second`` evaluates
    ``value_fn`` itself; a non-finite update becomes zeros
    (``second_phase_nonfinite``); its counters are accumulated; the policy
    decides whether to return (:func:`return_to_first`)."""
    incoming, state = carry
    state = run_if(~advanced_as_returned(ctx.params, state), _restart_second_of(ctx), state)
    view, value_fn = _second_inputs(ctx)
    new_updates, second_state = ctx.second.update(
        real_view(incoming), state.second_state, view, value_fn=value_fn, **ctx.extra_args
    )
    new_updates = _like(_view_update(new_updates, ctx.params), ctx.params)
    finite = all_finite(new_updates)
    new_updates = optax.tree.where(finite, new_updates, optax.tree.zeros_like(new_updates))
    old = state.second_state
    evals = _sp.value_and_grad_evals(second_state) - _sp.value_and_grad_evals(old)
    hvps = _sp.hessian_vector_products(second_state) - _sp.hessian_vector_products(old)
    jacobians = _sp.jacobian_evals(second_state) - _sp.jacobian_evals(old)
    zero_steps = _sp.linesearch_failures(second_state) - _sp.linesearch_failures(old)
    detector_state, back = ctx.policy.second(
        state.detector_state,
        value=_sp.current_value(second_state),
        cost=_sp.cost(evals, hvps, jacobians),
        failures=_sp.failures(second_state),
        finite=finite,
        params=ctx.params,
    )
    state = state._replace(
        second_state=second_state,
        detector_state=detector_state,
        second_phase_evals=state.second_phase_evals + evals,
        second_phase_hvps=state.second_phase_hvps + hvps,
        second_phase_jacobians=state.second_phase_jacobians + jacobians,
        second_phase_nonfinite=state.second_phase_nonfinite + (~finite).astype(jnp.int32),
        second_phase_linesearch_failures=state.second_phase_linesearch_failures + zero_steps,
        expected=fingerprint(optax.apply_updates(ctx.params, new_updates)),
    )
    return _like(new_updates, incoming), run_if(back, _return_to_first_of(ctx), state)


def _restart_second_of(ctx: StepContext) -> Callable:
    return lambda state: _restart_second(ctx, state)


def _return_to_first_of(ctx: StepContext) -> Callable:
    return lambda state: return_to_first(ctx, state)


def return_to_first(ctx: StepContext, state: TwoPhaseState) -> TwoPhaseState:
    """A return to phase 0: the second phase re-initialised, the policy re-armed,
    the first phase's state kept, or passed through its ``resume`` where it
    has one (:func:`twophase.first_phase.reset_momentum`)."""
    resume = ctx.resume
    first_state = state.first_state if resume is None else resume(state.first_state)
    return state._replace(
        first_state=first_state,
        second_state=fresh_second_state(ctx),
        phase=jnp.zeros([], jnp.int32),
        phase0_steps=jnp.zeros([], jnp.int32),
        detector_state=ctx.policy.rearm(state.detector_state, ctx.params),
        fallbacks=state.fallbacks + 1,
        return_step=state.step + 1,
        expected=jnp.full([3], -1.0, jnp.float32),
    )


_DECISION = ("phase", "switch_step", "phase0_steps", "detector_state", "switches")


def fused_step(ctx: StepContext, grad: PyTree, state: TwoPhaseState) -> tuple:
    """Both phases with a gated first phase (:class:`GatedFirstPhase`).

    The gated step runs outside any loop, switched on and off by scalars, so
    that XLA fuses it with the caller's ``apply_updates`` as it does
    ``optax.adam``. The second phase runs first (in a loop run zero or one
    time) and writes its update over the incoming gradient (the ``slot``),
    which the gated pass hands on where it is inactive. Everything reads the
    gradient through that loop's output: a loop operand with other users would
    be copied before the loop. Only the policy's scalars and state go through
    the decision's loop, never the optimizer states (a carry would be copied).
    """
    in_first = state.phase == 0
    slot, state = run_if(
        ~in_first, lambda c: second_phase_step(ctx, c), (grad, state), differentiable=False
    )
    grad_norm, finite = input_check(slot, ctx.value)
    active = in_first & finite

    def decide(fields):
        decided = observe_first_phase(ctx, state._replace(**fields), slot, grad_norm)
        return {name: getattr(decided, name) for name in _DECISION}

    state = state._replace(**run_if(active, decide, {n: getattr(state, n) for n in _DECISION}))
    state = state._replace(
        skipped_steps=state.skipped_steps + (in_first & ~finite).astype(jnp.int32)
    )
    new_updates, first_state = ctx.first.gated_update(slot, state.first_state, active, ~in_first)
    state = hand_over(ctx, active & (state.phase == 1), first_state, state)
    return new_updates, state._replace(first_state=first_state)


def guard_output(updates: PyTree, state: TwoPhaseState, in_first: jax.Array) -> tuple:
    """Non-finite values never leave :func:`two_phase`: the non-finite entries of
    a phase-0 update (from finite inputs: an overflow) are replaced by zeros;
    with float16 leaves the step is also counted in ``skipped_steps``. Phase-1
    updates are already guarded (wholly zeroed) and counted."""
    # Per entry: the select stays fused with the caller's apply_updates. The
    # count costs a pass over the update, so it is taken only where finite inputs
    # overflow in practice (float16 leaves); wider dtypes are zeroed uncounted.
    guarded = jax.tree.map(lambda u: jnp.where(jnp.isfinite(u), u, jnp.zeros_like(u)), updates)
    if not any(jnp.result_type(u) == jnp.float16 for u in jax.tree.leaves(updates)):
        return guarded, state
    finite = all_finite(updates)
    skipped = state.skipped_steps + (in_first & ~finite).astype(jnp.int32)
    return guarded, state._replace(skipped_steps=skipped)


def probe(ctx: StepContext, state: TwoPhaseState) -> TwoPhaseState:
    """The policy's ``probe`` (:class:`twophase.Policy`), outside every
    conditional of the step, so that the parameters it reads are not copied."""
    if ctx.policy.probe is None:
        return state
    detector_state = ctx.policy.probe(
        state.detector_state, value=ctx.value, params=ctx.params, value_fn=ctx.value_fn
    )
    return state._replace(detector_state=detector_state)


def select_phase(ctx: StepContext, grad: PyTree, state: TwoPhaseState) -> tuple:
    """One ``update``: the phase that ``state.phase`` selects, on device."""
    in_first = state.phase == 0
    probed = probe(ctx, state)
    if isinstance(ctx.first, GatedFirstPhase):
        new_updates, new_state = fused_step(ctx, grad, probed)
    else:
        carry = run_if(in_first, lambda c: first_phase_step(ctx, c), (grad, probed))
        new_updates, new_state = run_if(
            ~in_first, lambda c: second_phase_step(ctx, c), carry, differentiable=False
        )
    if ctx.policy.probe is not None:
        # A skipped step is unseen by the policy, its probe included.
        skipped = new_state.skipped_steps != state.skipped_steps
        kept = optax.tree.where(skipped, state.detector_state, new_state.detector_state)
        new_state = new_state._replace(detector_state=kept)
    new_updates = _like(new_updates, ctx.params)
    return guard_output(new_updates, new_state, in_first)


def _check_call(policy: _policy.Policy, updates, params, value, value_fn) -> None:
    """TypeError/ValueError for a malformed ``update`` call (at trace time)."""
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


def two_phase(
    first: optax.GradientTransformation | GatedFirstPhase,
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
      ``skipped_steps`` counts it; so does a non-finite update (replaced by
      zeros). Integer and bool parameters get a zero update.
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
      :func:`twophase.evaluating`, which evaluates for it (nothing twice),
      computes in float32 at least and drops non-finite steps. The incoming
      ``updates`` are ignored in phase 1, so the caller may skip computing
      mini-batch gradients there. A ``grad=`` keyword (optax.lbfgs's
      convention) is accepted and ignored. A second-phase update with a
      non-finite entry is replaced by zeros (``second_phase_nonfinite``).
      Complex parameters are seen by the second phase as their real and
      imaginary parts, integer ones are left alone. If the parameters did not
      advance by the previous phase-1 update (a transformation chained after
      this one changed it), the second phase restarts from where they are
      (``foreign_updates``).
    * **Return**: after each phase-1 step the policy may return to phase 0
      (``fallbacks``, ``return_step``); the first transformation's state was
      kept (passed through its ``resume`` where it has one, e.g.
      :func:`twophase.first_phase.reset_momentum`), the second's is
      re-initialised and the policy re-armed.

    Inside ``optax.masked`` / ``optax.partition``, ``params`` (and so what
    ``value_fn`` receives in phase 1) is the masked tree, with
    ``optax.MaskedNode`` for the masked-out leaves: ``value_fn`` must accept
    that tree. Usually it is simpler to mask the other transformations.

    The phases are selected on device, with no Python control flow on traced
    values: one phase runs per step and the step compiles once; the switch and
    the returns do not recompile. Called outside ``jax.jit``, ``update`` jits
    itself (once per shapes and ``value_fn``). A gated first phase
    (:class:`twophase.first_phase.GatedFirstPhase`, e.g.
    :func:`twophase.gated_adam`) runs outside any conditional
    (:func:`fused_step`). Under ``jax.vmap`` with a batched phase (an
    ensemble) *both* phases execute every step and each member keeps its own.
    Derivatives through ``update`` (e.g. meta-gradients w.r.t. an injected
    learning rate) are exact in phase 0; through a phase-1 step they are NaN.

    A :class:`twophase.Detector` is a one-way policy (the paper); with
    ``fallback=k``, ``k`` consecutive failed second-phase iterations (the
    contract's ``consecutive_failures``), or a non-finite step, return to
    phase 0 with the detector re-armed: the paper's "safe resort" when the path
    leaves the convex region. :func:`twophase.safe_resort` also returns when
    the second phase is slower than the first.

    Args:
      first: the first-phase transformation (e.g. ``twophase.gated_adam(1e-3)``
        or ``optax.adam(1e-3)``).
      second: the second-phase transformation (e.g. ``twophase.nonlinear_cg()``).
      detector: a :class:`twophase.Detector` or a :class:`twophase.Policy`.
      fallback: ``None`` or a positive int (detectors only).
      handover: optional ``(first_state, second_state, params) -> second_state``
        applied at the switch (real floating-point parameters only).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`TwoPhaseState`.

    Raises:
      ValueError: ``first``/``second`` not transformations, ``detector`` not a
        Detector or Policy, a bad ``fallback`` (or one given with a Policy) or
        ``handover``; at ``init``, a handover with complex or integer
        parameters (naming the leaf); at trace time, a non-scalar ``value``.
      TypeError: ``update`` without ``value_fn`` (at trace time), or without
        ``value`` for a policy that needs it.
    """
    _check_transformations(first, second, fallback, handover)
    policy = _as_policy(detector, fallback)
    resume = getattr(first, "resume", None)
    if not isinstance(first, GatedFirstPhase):
        first = optax.with_extra_args_support(first)
    second = optax.with_extra_args_support(second)
    wrapped_second = evaluating(second)

    def second_for(params):
        """``second`` if it evaluates ``value_fn`` itself, else its wrapper
        (decided from the state's fields, at trace time)."""
        if _sp.evaluates_itself(jax.eval_shape(second.init, real_view(params))):
            return second
        return wrapped_second

    def init_fn(params):
        _check_view(params, handover)
        return init_state(first, second_for(params), policy, params)

    def update_fn(updates, state, params=None, *, value=None, value_fn=None, **extra_args):
        _check_call(policy, updates, params, value, value_fn)
        # A `grad=` keyword (optax.lbfgs's convention) is the incoming gradient again;
        # the second phase gets the full-batch one from value_fn.
        extra_args.pop("grad", None)
        ctx = StepContext(
            first, second_for(params), policy, handover, params, value, value_fn, extra_args, resume
        )
        # Second-phase `aux` fields get their structure from value_fn (the same in
        # every branch); no-op for a value_fn without aux.
        state = _aux.prepare_aux(state, value_fn, params)
        new_updates, new_state = select_phase(ctx, prepare_gradient(updates, params), state)
        return new_updates, new_state._replace(step=optax.safe_increment(state.step))

    return optax.GradientTransformationExtraArgs(init_fn, eager_jit(update_fn))
