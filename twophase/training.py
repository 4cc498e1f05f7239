"""A ready-made training loop: :func:`train` drives any optax optimizer, and a
:func:`twophase.two_phase` one phase-aware (mini-batch epochs, then one
full-batch CG iteration per epoch).

Example::

    import twophase as tp
    from twophase.training import train, history_columns

    def loss_fn(params, batch):          # MEAN loss over the batch
        x, y = batch
        return jnp.mean((model(params, x) - y) ** 2)

    result = train(loss_fn, params, (x, y), tp.adam_cg(1e-3, steps_per_epoch=len(x) // 512),
                   batch_size=512, max_epochs=200, cost_budget=300)
    columns = history_columns(result.history)   # {"epoch": [...], "train_loss": [...]}
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree
from jax import lax

from twophase._checks import as_positive_int, as_positive_or_none, num_examples
from twophase._control import run_if
from twophase.info import Info
from twophase.info import info as _info
from twophase.info import info_all as _info_all
from twophase.objectives import fill_masked, full_batch
from twophase.policy.safe_resort import SafeResortState
from twophase.policy.safe_resort import configure as configure_policy
from twophase.switch import TwoPhaseState

__all__ = [
    "CONFIGURATION_FIELDS",
    "PROGRESS_SECONDS",
    "TrainResult",
    "history_columns",
    "progress_text",
    "reconcile_configuration",
    "train",
]

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

HISTORY_FILE = "history.json"
"""Name of the JSON side file that holds the history next to the checkpoints."""

_MINIBATCH, _TWO_PHASE, _CG, _SEVERAL = "minibatch", "two_phase", "cg", "several"


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      params: the final parameters.
      opt_state: the final optimizer state.
      history: one dict per epoch (see :func:`train`), including the epochs
        restored from a checkpoint.
      stop_reason: why training stopped: ``"max_epochs"``, ``"cost_budget"`` or
        ``"grad_tol"``.
    """

    params: PyTree
    opt_state: PyTree
    history: list[dict[str, Any]]
    stop_reason: str


def history_columns(history: list[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Turns :func:`train`'s per-epoch records into columns.

    Returns:
      ``{key: [value of epoch 1, value of epoch 2, ...]}`` over the union of the
      records' keys (in first-seen order); a record lacking a key gives ``None``.
    """
    keys: dict[str, None] = {}
    for record in history:
        keys.update(dict.fromkeys(record))
    return {k: [record.get(k) for record in history] for k in keys}


# --------------------------------------------------------------------------- #
# Argument checks.


def _with_extra_args(optimizer) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` passing ``value``/``value_fn`` on. An ``optax.MultiSteps``
    object does (its ``update`` forwards them to the wrapped transformation),
    but ``optax.with_extra_args_support`` would drop them."""
    if isinstance(optimizer, optax.MultiSteps):
        return optax.GradientTransformationExtraArgs(optimizer.init, optimizer.update)
    return optax.with_extra_args_support(optimizer)


def _is_global(x: Any) -> bool:
    """Whether ``x`` is a ``jax.Array`` spanning devices of other processes."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _replicated_sharding(name: str, data: PyTree) -> jax.sharding.Sharding | None:
    """``None`` for process-local ``data``; for global ``data`` (a multi-process
    run), a sharding replicating over the devices ``data`` lives on."""
    leaves = jax.tree.leaves(data)
    global_leaves = [x for x in leaves if _is_global(x)]
    if len(global_leaves) == len(leaves):
        sharding = global_leaves[0].sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
        return jax.sharding.NamedSharding(
            jax.sharding.Mesh(devices, ("data",)), jax.sharding.PartitionSpec()
        )
    if global_leaves or jax.process_count() > 1:
        raise ValueError(
            f"`{name}` must be global jax.Arrays in a multi-process run "
            f"(jax.process_count() = {jax.process_count()}): build every leaf on every process "
            "with `jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), "
            "local_rows)` over a mesh of all processes' devices; got leaves "
            f"{[type(x).__name__ if not _is_global(x) else 'global jax.Array' for x in leaves]}."
        )
    return None


def _place(tree: PyTree, sharding: jax.sharding.Sharding | None) -> PyTree:
    """Fresh copies of ``tree``'s leaves; with a ``sharding`` (multi-process),
    process-local leaves (the same values on every process) are replicated on it
    and global ones keep their sharding."""

    def place(x):
        if sharding is None or _is_global(x):
            return jnp.array(x)
        local = np.asarray(jnp.asarray(x))
        return jax.make_array_from_callback(
            local.shape, sharding, lambda index: local[index], dtype=local.dtype
        )

    return jax.tree.map(place, tree)


def _optimizer_mode(opt_state: PyTree) -> str:
    found = _info_all(opt_state)
    if not found:
        return _MINIBATCH
    if len(found) > 1:
        return _SEVERAL
    return _CG if found[0].phase is None else _TWO_PHASE


def _is_ours(x: Any) -> bool:
    """A two-phase state, or a second-phase state (its fields, by name)."""
    return isinstance(x, TwoPhaseState) or (
        isinstance(x, tuple) and "value_and_grad_evals" in getattr(x, "_fields", ())
    )


def _check_not_chained(opt_state: PyTree) -> None:
    """ValueError for a twophase optimizer inside an ``optax.chain`` with other
    transformations (a chain's state is a plain tuple of its members' states).

    Before it, they act in the first phase only (CG takes its steps from
    ``value_fn``); after it, they break CG's contract that the parameters
    advance by exactly its update.
    """
    stack = [opt_state]
    while stack:
        node = stack.pop()
        if _is_ours(node):
            continue
        if type(node) is tuple and len(node) > 1 and any(_info_all(x) for x in node):
            raise ValueError(
                "`optimizer` chains a twophase optimizer with other transformations "
                "(optax.chain). Before it they would act in the first phase only, since CG "
                "takes its steps from the full-batch objective; after it they break CG's "
                "cache. Instead: freeze leaves with optax.partition({'train': <it>, 'frozen': "
                "optax.set_to_zero()}, labels) (train hands the frozen leaves to the "
                "objective), put weight decay into the "
                "loss (twophase.with_weight_decay(loss_fn, wd)), and for clipping in the "
                "first phase use two_phase(optax.chain(clip, optax.adam(lr)), "
                "nonlinear_cg(), detector)."
            )
        if isinstance(node, (tuple, list)):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())


def _summed_info(opt_state: PyTree) -> Info:
    """The counts of every twophase optimizer in ``opt_state``, summed (``None``
    where none has the field)."""
    found = _info_all(opt_state)
    fields = {}
    for name in (
        "value_and_grad_evals",
        "hessian_vector_products",
        "cost",
        "cg_iterations",
        "linesearch_failures",
        "skipped_steps",
    ):
        values = [getattr(i, name) for i in found if getattr(i, name) is not None]
        fields[name] = sum(values) if values else None
    return Info(**fields)


# --------------------------------------------------------------------------- #
# The loop.


def train(
    loss_fn: LossFn,
    params: PyTree,
    data: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int = 512,
    max_epochs: int = 100,
    cost_budget: float | None = None,
    strict_budget: bool = False,
    grad_tol: float | None = None,
    full_batch_size: int | None = None,
    val_data: PyTree | None = None,
    metrics: Mapping[str, Callable[[PyTree, PyTree], jax.Array]] | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    donate: bool = True,
) -> TrainResult:
    """Trains ``params`` on ``data`` epoch by epoch.

    **Optimizers.** ``optimizer`` is any optax transformation; how an epoch runs
    depends on its state:

    * a state holding a :func:`twophase.two_phase` state (e.g.
      :func:`twophase.adam_cg`): each epoch is run in the phase the state is in
      at its start (``twophase.info(state).phase``; a ``fallback`` back to
      phase 0 is followed);
    * a bare :func:`twophase.nonlinear_cg` (or a chain holding one): every epoch
      is a phase-1 epoch;
    * a state holding several (e.g. ``optax.partition`` with an ``adam_cg``
      per label): every epoch is a mini-batch epoch, each step runs every
      optimizer in its own phase, and the cost adds up all their full-batch
      evaluations;
    * anything else (``optax.adam``, ...): every epoch is a mini-batch epoch.

    Wrappers: ``optax.inject_hyperparams``, ``optax.MultiSteps``,
    ``optax.masked`` and ``optax.partition`` may hold the twophase optimizer;
    inside ``masked`` / ``partition`` the objective it evaluates gets the
    masked-out leaves at their current values (:func:`twophase.fill_masked`);
    ``optax.partition({"train": adam_cg(...), "frozen": optax.set_to_zero()},
    labels)`` so keeps the frozen leaves fixed in both phases. In a phase-1
    epoch the other members of a ``partition`` receive zero updates. Passed
    directly, ``optax.MultiSteps(opt, every_k_schedule=k)`` accumulates ``k``
    mini-batches per step of ``opt`` in phase 0, and in a phase-1 epoch ``train``
    steps ``opt`` once, bypassing the accumulation (there is nothing to
    accumulate); the switching policy is told ``(N // batch_size) / k`` steps
    per epoch. ``optax.chain`` of a twophase
    optimizer with other transformations is rejected (see Raises).

    **Phase-0 (mini-batch) epoch**: one pass over a fresh random permutation of
    the ``N`` examples (``jax.random``, seeded by ``seed``, inside one jitted
    ``lax.scan``) in ``N // batch_size`` batches of exactly ``batch_size``
    examples; the last ``N % batch_size`` examples of the permutation are
    dropped for this epoch (every step has the same shape, so the epoch
    compiles once; different examples are dropped each epoch). If
    ``batch_size >= N`` each epoch is one full-batch step. Each step calls
    ``optimizer.update(grad, state, params, value=batch_loss,
    value_fn=full_batch_objective)``. Once a two-phase optimizer switches in the
    middle of an epoch, the remaining steps of that epoch are skipped (no
    gradient is computed), and the next epoch is a phase-1 epoch.

    **Phase-1 epoch**: ONE optimizer step that computes no mini-batch gradient:
    it passes zero updates and a dummy ``value=0`` (the detectors use ``value``
    only in phase 0); CG evaluates the full-batch objective itself.

    The full-batch objective is ``twophase.full_batch(loss_fn, data,
    batch_size=full_batch_size)`` (the exact mean over all ``N`` examples,
    evaluated in chunks).

    **History**: a list with one dict per epoch (:func:`history_columns` turns
    it into columns):

    * ``epoch``: 1-based epoch number; ``phase``: 0 (mini-batch epoch) or 1 (CG
      step); ``steps``: optimizer ``update`` calls made in the epoch;
    * ``train_loss``, ``grad_norm``: full-batch objective and the Euclidean norm
      of its gradient, measured after the epoch;
    * ``grad_norm_stat``: the detector's statistic (``info.grad_norm_stat``),
      ``None`` if the optimizer has none; ``switch_step``: ``info.switch_step``
      (``None`` likewise);
    * ``epoch_cost`` and ``cost`` (cumulative), in epoch equivalents: a phase-0
      epoch counts ``steps / (N // batch_size)`` (1 for a whole epoch), plus
      the increase of ``info.cost`` during the epoch (evaluations, and
      Hessian-vector products at ``twophase.HVP_COST`` each), i.e. one
      per full-batch value-and-gradient evaluation made by the optimizer (CG's
      evaluations including its line search's; an exact-norm detector's in
      phase 0). The monitoring evaluations (``train_loss``, ``grad_norm``,
      metrics, validation) are NOT counted;
    * ``wall_seconds``: cumulative wall-clock time of training (compilation
      included, monitoring included);
    * ``nonfinite``: whether ``train_loss`` or ``grad_norm`` is not finite;
      ``skipped_steps``: the two-phase optimizer's cumulative count of steps it
      skipped for a non-finite gradient or loss (``None`` for other optimizers).
      Non-finite values never raise; training goes on (a two-phase optimizer
      skips such steps itself; another optimizer may leave NaN parameters);
    * ``cg_iterations`` and ``linesearch_failures``: cumulative counts of CG
      iterations and of line searches that found no decrease (``info``'s
      fields; ``None`` where the optimizer holds no nonlinear CG);
    * ``val_loss`` (if ``val_data``), and for each ``name`` in ``metrics``:
      ``train_<name>`` on ``data`` and ``val_<name>`` on ``val_data`` (if given),
      all full-batch means over chunks of ``full_batch_size`` (so metrics, like
      ``loss_fn``, must be MEANS over the batch).

    **Stops** (checked after each epoch, in this order): ``grad_tol`` when the
    full-batch gradient norm is ``<= grad_tol``; ``cost_budget`` once the
    cumulative cost is ``>= cost_budget`` (the last epoch may overshoot the
    budget by part of an epoch, e.g. by the trial points of a CG iteration's
    line search); ``max_epochs`` epochs in total (restored ones included).

    **Strict budget** (``strict_budget=True``, for comparisons at equal cost):
    an epoch that takes the cumulative cost above ``cost_budget`` is discarded,
    as if it had not run (parameters, optimizer state and shuffling key revert
    to before it; no history record, no checkpoint), and training stops with
    ``"cost_budget"``; so the final cost never exceeds the budget, except that
    the first epoch is always kept. The previous epoch's buffers must survive
    the step, so the jitted steps are not donated (``donate`` is ignored) and
    the wall time of a discarded epoch is not in the history. A resumed run
    reruns the discarded epoch before it stops again.

    **Checkpoints** (``checkpoint_dir``; needs :mod:`twophase.checkpoint`, i.e.
    orbax-checkpoint): ``{"params", "opt_state", "key", "epoch"}`` is saved
    as step ``epoch`` every ``checkpoint_every`` epochs (if given) and after the
    last epoch, and the history up to that epoch is written atomically to the
    JSON side file ``<checkpoint_dir>/history.json`` (a local or shared
    directory is assumed; process 0 writes it, just before the checkpoint). On
    start, if ``checkpoint_dir`` holds a checkpoint, training resumes from its
    latest step: parameters, optimizer state and RNG key are
    restored (the ``params`` argument only supplies the structure), the history
    records up to that epoch are read back, and cost and wall time continue
    from the last restored record. The restored switching policy takes this
    run's ``cost_budget`` and epoch length (:func:`reconcile_configuration`),
    so a resume may extend the budget or change ``batch_size``. An unchanged rerun of a finished run
    therefore returns at once.

    **Many processes** (``jax.distributed``): pass ``data`` (and ``val_data``)
    as global ``jax.Array`` leaves, e.g. built on every process with
    ``jax.make_array_from_process_local_data`` from its own rows, and the same
    ``params`` on every process. Parameters, optimizer state and shuffling key
    are then replicated over the devices ``data`` lives on, and everything runs
    as in one process: the same shuffling, switch and history on every process
    (except ``wall_seconds``, each process's own clock); only process 0 draws
    the progress bar and writes the history file; every process saves and
    restores the checkpoints (``checkpoint_dir`` must be shared). See
    ``examples/multihost.py``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> jax.Array`` of shape ``()``, the MEAN
        loss over ``batch`` (a pytree like ``data`` with a leading batch axis).
      params: initial parameters (pytree of arrays). Not modified: ``train``
        works on a copy even with ``donate=True``. In a multi-process run, the
        same values on every process (or global arrays, kept as sharded).
      data: pytree of arrays, all with the same leading example size ``N >= 1``
        (global ``jax.Array`` leaves in a multi-process run, see above).
      optimizer: an optax transformation (see above).
      batch_size: mini-batch size, a positive int.
      max_epochs: maximum number of epochs, a positive int.
      cost_budget: ``None`` or a positive number of epoch equivalents.
      strict_budget: discard an epoch that would exceed ``cost_budget`` (see
        above); needs ``cost_budget``.
      grad_tol: ``None`` or a positive gradient-norm tolerance.
      full_batch_size: chunk size of the full-batch evaluations, a positive int
        or ``None`` (all ``N`` at once).
      val_data: ``None`` or a pytree like ``data`` (any number of examples).
      metrics: ``None`` or ``{name: fn(params, batch) -> scalar mean}``.
      seed: seed of the shuffling key.
      progress: show progress (epoch, cost, phase, loss, grad norm): a tqdm
        bar on a terminal; when stderr is not one (a log file), a plain line
        (:func:`progress_text`) at most every :data:`PROGRESS_SECONDS` and the
        last epoch's line at the end.
      checkpoint_dir: ``None`` or a directory for checkpoints (see above).
      checkpoint_every: ``None`` or a positive int (needs ``checkpoint_dir``).
      donate: donate the parameter and optimizer-state buffers to the jitted
        epoch functions (saves memory on accelerators).

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: a bad argument (the message names it): ``batch_size``,
        ``max_epochs``, ``full_batch_size`` or ``checkpoint_every`` not a
        positive int; ``cost_budget`` or ``grad_tol`` not positive; ``data`` or
        ``val_data`` empty, with a scalar leaf, or with leaves of different
        leading sizes; ``metrics`` not a mapping of callables;
        ``checkpoint_every`` without ``checkpoint_dir``; ``strict_budget`` not a
        bool, or true without ``cost_budget``; in a multi-process run, ``data``
        or ``val_data`` with process-local leaves; a twophase optimizer chained
        with other transformations in ``optax.chain`` (before it they would act
        in the first phase only; the message says what to use instead);
        ``cost_budget`` different from the optimizer's own ``budget`` (on a
        resume too); an ``optax.MultiSteps`` around a twophase optimizer that is
        not passed directly as the ``optax.MultiSteps`` object, or whose
        ``every_k_schedule`` varies or does not divide ``N // batch_size``.
    """
    batch_size = as_positive_int("batch_size", batch_size)
    max_epochs = as_positive_int("max_epochs", max_epochs)
    cost_budget = as_positive_or_none("cost_budget", cost_budget)
    grad_tol = as_positive_or_none("grad_tol", grad_tol)
    full_batch_size = as_positive_int("full_batch_size", full_batch_size, allow_none=True)
    checkpoint_every = as_positive_int("checkpoint_every", checkpoint_every, allow_none=True)
    n, replicated = _check_other_arguments(
        loss_fn,
        data,
        val_data,
        metrics,
        cost_budget,
        strict_budget,
        checkpoint_dir,
        checkpoint_every,
    )
    if replicated is None:  # global arrays (a multi-process run) are already placed
        data = jax.device_put(data)
        val_data = None if val_data is None else jax.device_put(val_data)
    batch = min(batch_size, n)
    params, opt_state = _initial_state(optimizer, params, cost_budget, n // batch, replicated)
    config = _Config(
        loss_fn=loss_fn,
        optimizer=optimizer,
        mode=_optimizer_mode(opt_state),
        num_examples=n,
        batch=batch,
        steps_per_epoch=n // batch,
        full_batch_size=full_batch_size,
        metrics=tuple(dict(metrics or {}).items()),
    )
    key = _place(jax.random.PRNGKey(seed), replicated)
    start = _resume(checkpoint_dir, params, opt_state, key, replicated)
    limits = _Limits(max_epochs, cost_budget, grad_tol, strict_budget, checkpoint_every)
    bar = _progress_bar(progress, max_epochs, cost_budget, start.epoch, start.cost)
    try:
        return _loop(
            start,
            data,
            val_data,
            config=config,
            limits=limits,
            bar=bar,
            checkpoint=(checkpoint_dir, replicated),
            donating=donate and not strict_budget,
        )
    finally:
        bar.close()


class _Start(NamedTuple):
    """Where a run starts: fresh (epoch 0, no history) or from a checkpoint."""

    params: PyTree
    opt_state: PyTree
    key: jax.Array
    epoch: int
    history: list[dict[str, Any]]
    cost: float


class _Limits(NamedTuple):
    """The stopping rules and checkpoint period of a run (see :func:`train`)."""

    max_epochs: int
    cost_budget: float | None
    grad_tol: float | None
    strict_budget: bool
    checkpoint_every: int | None


def _resume(checkpoint_dir, params, opt_state, key, replicated) -> _Start:
    """The run's start: the given state, or the latest checkpoint in
    ``checkpoint_dir`` with its policy configuration taken from this run's
    ``opt_state`` (:func:`reconcile_configuration`), so a resume with another
    ``cost_budget`` or ``batch_size`` runs with the new ones."""
    params, restored, key, epoch, history = _restore(
        checkpoint_dir, params, opt_state, key, replicated
    )
    if epoch:
        restored = reconcile_configuration(restored, opt_state)
    return _Start(params, restored, key, epoch, history, history[-1]["cost"] if history else 0.0)


CONFIGURATION_FIELDS = ("budget", "epoch_steps", "charges_incoming")
"""The fields of a :class:`twophase.policy.SafeResortState` that hold the run's
configuration (what :func:`twophase.policy.configure` sets), as opposed to its
statistics. A restored state takes these from the new run."""


def reconcile_configuration(restored: PyTree, current: PyTree) -> PyTree:
    """``restored`` (an optimizer state read from a checkpoint) with the
    configuration of every switching policy in it taken from ``current``, the
    same optimizer's state freshly initialised and configured for this run.

    The statistics (costs spent, paces, trials) stay as restored; the budget
    and the epoch length are this run's, so nothing of the old run's
    configuration survives a resume. ``current`` went through
    :func:`twophase.policy.configure`, which rejects a ``cost_budget`` that
    contradicts a budget the user gave the policy.

    Args:
      restored: an optimizer state (any nesting).
      current: a state of the same structure.

    Returns:
      ``restored`` with :data:`CONFIGURATION_FIELDS` of each
      :class:`twophase.policy.SafeResortState` replaced by ``current``'s.
    """

    def is_policy_state(node):
        return isinstance(node, SafeResortState)

    def take(old, new):
        if not is_policy_state(old):
            return old
        return old._replace(**{name: getattr(new, name) for name in CONFIGURATION_FIELDS})

    return jax.tree.map(take, restored, current, is_leaf=is_policy_state)


def _loop(start: _Start, data, val_data, *, config, limits: _Limits, bar, checkpoint, donating):
    """The epochs of :func:`train` from ``start`` until a stop; returns its result."""
    checkpoint_dir, replicated = checkpoint
    params, opt_state, key, epoch, history, cost = start
    saved_epoch = epoch if epoch else None
    # A resumed run that had already stopped does not continue.
    reason = _stop_reason(history[-1], limits.cost_budget, limits.grad_tol) if history else None
    stop_reason = reason or "max_epochs"
    # The wall clock goes on from the last restored record.
    started = time.perf_counter() - (history[-1]["wall_seconds"] if history else 0.0)
    while epoch < limits.max_epochs and reason is None:
        kept = (params, opt_state, key)  # alive: not donated under strict_budget
        params, opt_state, key, ran = _run_epoch(
            params, opt_state, key, data, config=config, donating=donating
        )
        if limits.strict_budget and history and _exceeds(cost + ran.cost, limits.cost_budget):
            params, opt_state, key = kept
            stop_reason = "cost_budget"
            break
        epoch, cost = epoch + 1, cost + ran.cost
        record = _record(epoch, ran, cost, started, params, data, val_data, config)
        history.append(record)
        bar.show(record, 1 if limits.cost_budget is None else ran.cost)
        reason = _stop_reason(record, limits.cost_budget, limits.grad_tol)
        stop_reason = reason or stop_reason
        if checkpoint_dir is not None and limits.checkpoint_every:
            if epoch % limits.checkpoint_every == 0:
                _save(checkpoint_dir, epoch, params, opt_state, key, history, replicated)
                saved_epoch = epoch
    if checkpoint_dir is not None and saved_epoch != epoch:
        _save(checkpoint_dir, epoch, params, opt_state, key, history, replicated)
    return TrainResult(params, opt_state, history, stop_reason)


# --------------------------------------------------------------------------- #
# The stages of ``train``: checks, the initial (or restored) state, one epoch,
# its history record.


def _check_other_arguments(
    loss_fn, data, val_data, metrics, cost_budget, strict_budget, checkpoint_dir, checkpoint_every
):
    """``(N, replicated sharding or None)`` of ``data``; ValueError naming the
    first bad argument among the rest of :func:`train`'s (the numbers were
    checked before)."""
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("`checkpoint_every` needs `checkpoint_dir`.")
    if not isinstance(strict_budget, bool):
        raise ValueError(f"`strict_budget` must be a bool, got {strict_budget!r}.")
    if strict_budget and cost_budget is None:
        raise ValueError("`strict_budget` needs `cost_budget`.")
    n = num_examples("data", data)
    replicated = _replicated_sharding("data", data)
    if val_data is not None:
        num_examples("val_data", val_data)
        _replicated_sharding("val_data", val_data)
    for name, fn in dict(metrics or {}).items():
        if not isinstance(name, str) or not callable(fn):
            raise ValueError(
                f"`metrics` must map names to callables fn(params, batch), got {name!r}: {fn!r}."
            )
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable, got {loss_fn!r}.")
    return n, replicated


def _initial_state(optimizer, params, cost_budget, steps_per_epoch, replicated):
    """Placed copies of ``params`` and of the optimizer's initial state (the
    caller's buffers survive donation, and no two donated leaves share a buffer:
    an init may reuse one zeros array for several state fields), with the
    switching policy told the budget and the epoch length in its own steps
    (``optax.MultiSteps`` makes one inner step of ``k`` calls)."""
    params = _place(params, replicated)
    opt_state = _with_extra_args(optimizer).init(params)
    _check_not_chained(opt_state)
    inner_steps = steps_per_epoch // _accumulated_steps(optimizer, opt_state, steps_per_epoch)
    opt_state = configure_policy(opt_state, budget=cost_budget, steps_per_epoch=inner_steps)
    return params, _place(opt_state, replicated)


def _accumulated_steps(optimizer, opt_state, steps_per_epoch: int) -> int:
    """Mini-batches per inner step: ``k`` of an ``optax.MultiSteps`` around a
    twophase optimizer (1 otherwise).

    Raises:
      ValueError: ``optax.MultiSteps`` holding a twophase optimizer anywhere
        but at the top, or not as the ``optax.MultiSteps`` object itself (its
        phase-1 step would run once per ``k`` epochs); a ``k`` that varies or
        does not divide the steps per epoch (the switching policy's epoch
        would not be a whole number of inner steps).
    """
    top = isinstance(optimizer, optax.MultiSteps)
    nested = [node for node in _multisteps_states(opt_state) if node is not opt_state or not top]
    if any(_info_all(node) for node in nested):
        raise ValueError(
            "`optimizer`: optax.MultiSteps around a twophase optimizer is supported only as "
            "the optax.MultiSteps object itself, passed to train directly (not its "
            ".gradient_transformation(), nor inside another wrapper): in the second phase "
            "train bypasses the accumulation, which otherwise runs one second-phase step "
            "every k epochs."
        )
    if not top or not _info_all(opt_state):
        return 1
    schedule = optimizer._every_k_schedule  # optax keeps an int k as a constant function
    ks = {int(schedule(jnp.asarray(step, jnp.int32))) for step in (0, 1, 2, 10, 1000)}
    k = ks.pop()
    if ks or k < 1 or steps_per_epoch % k:
        raise ValueError(
            "`optimizer`: optax.MultiSteps around a twophase optimizer needs a constant "
            f"every_k_schedule that divides the steps per epoch (N // batch_size = "
            f"{steps_per_epoch}); got k = {sorted({k, *ks})}."
        )
    return k


def _multisteps_states(tree: PyTree) -> list[optax.MultiStepsState]:
    """Every ``optax.MultiStepsState`` in ``tree``, outer ones first."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, optax.MultiStepsState):
            found.append(node)
        if isinstance(node, (tuple, list)):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
    return found


def _restore(checkpoint_dir, params, opt_state, key, replicated):
    """``(params, opt_state, key, start_epoch, history)``: as given with epoch 0
    and no history, or from the latest checkpoint in ``checkpoint_dir``."""
    if checkpoint_dir is None:
        return params, opt_state, key, 0, []
    from twophase import checkpoint as _checkpoint

    if _checkpoint.latest_step(checkpoint_dir) is None:
        return params, opt_state, key, 0, []
    target = {
        "params": params,
        "opt_state": opt_state,
        "key": key,
        "epoch": _place(jnp.zeros([], jnp.int32), replicated),
    }
    _, restored = _checkpoint.restore_checkpoint(checkpoint_dir, target)
    start_epoch = int(restored["epoch"])
    history = [r for r in _read_history(checkpoint_dir) if r["epoch"] <= start_epoch]
    return restored["params"], restored["opt_state"], restored["key"], start_epoch, history


class _Epoch(NamedTuple):
    """What one epoch did: its phase, ``update`` calls, cost in epoch-equivalents
    and the optimizer's diagnostics after it (``None`` for a plain optimizer)."""

    phase: int
    steps: int
    cost: float
    diagnostics: Info | None


def _diagnostics(mode: str, opt_state: PyTree) -> Info | None:
    if mode == _MINIBATCH:
        return None
    if mode == _SEVERAL:
        return jax.device_get(_summed_info(opt_state))
    return jax.device_get(_info(opt_state))


def _run_epoch(params, opt_state, key, data, *, config: _Config, donating: bool):
    """One epoch in the phase the optimizer is in at its start."""
    before = _diagnostics(config.mode, opt_state)
    in_phase1 = config.mode == _CG or (config.mode == _TWO_PHASE and int(before.phase) == 1)
    if in_phase1:
        step = _phase1_step_donating if donating else _phase1_step
        params, opt_state = step(params, opt_state, data, config=config)
        steps, cost = 1, 0.0
    else:
        epoch = _phase0_epoch_donating if donating else _phase0_epoch
        params, opt_state, key, done = epoch(params, opt_state, key, data, config=config)
        steps = int(done)
        cost = steps / config.steps_per_epoch
    after = _diagnostics(config.mode, opt_state)
    if after is not None and after.cost is not None:
        cost += float(after.cost) - float(before.cost)
    return params, opt_state, key, _Epoch(int(in_phase1), steps, cost, after)


def _record(epoch, ran: _Epoch, cost, started, params, data, val_data, config):
    """The history record of an epoch (see :func:`train`); its wall time runs
    from ``started`` (a ``time.perf_counter`` reading) to after the monitoring."""
    measured = jax.device_get(_evaluate(params, data, val_data, config=config))
    measured = {k: float(v) for k, v in measured.items()}
    after = ran.diagnostics
    record: dict[str, Any] = {
        "epoch": epoch,
        "phase": ran.phase,
        "steps": ran.steps,
        "train_loss": measured.pop("train_loss"),
        "grad_norm": measured.pop("grad_norm"),
        "grad_norm_stat": _maybe_float(after, "grad_norm_stat"),
        "switch_step": _maybe_int(after, "switch_step"),
        "epoch_cost": ran.cost,
        "cost": cost,
        "wall_seconds": time.perf_counter() - started,
        "skipped_steps": _maybe_int(after, "skipped_steps"),
        "cg_iterations": _maybe_int(after, "cg_iterations"),
        "linesearch_failures": _maybe_int(after, "linesearch_failures"),
    }
    record["nonfinite"] = not (
        math.isfinite(record["train_loss"]) and math.isfinite(record["grad_norm"])
    )
    record.update(measured)
    return record


# --------------------------------------------------------------------------- #
# The jitted pieces, at module level so that repeated ``train`` calls with the
# same loss, optimizer and shapes reuse their compilations (``config`` is a
# static, hashable argument; functions compare by identity).


class _Config(NamedTuple):
    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    mode: str
    num_examples: int
    batch: int
    steps_per_epoch: int
    full_batch_size: int | None
    metrics: tuple[tuple[str, Callable[[PyTree, PyTree], jax.Array]], ...]


def _objective(config: _Config, data: PyTree) -> Callable[[PyTree], jax.Array]:
    return full_batch(config.loss_fn, data, batch_size=config.full_batch_size)


def _phase0_epoch_impl(params, opt_state, key, data, *, config: _Config):
    """One shuffled mini-batch epoch in a ``lax.scan``; steps after a switch are skipped."""
    optimizer = _with_extra_args(config.optimizer)
    key, shuffle_key = jax.random.split(key)
    used = config.steps_per_epoch * config.batch
    order = jax.random.permutation(shuffle_key, config.num_examples)[:used]
    order = order.reshape(config.steps_per_epoch, config.batch)
    value_fn = _objective(config, data)

    def step(carry, indices):
        def run(carry):
            params, opt_state, done = carry
            mini = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), data)
            loss, grad = jax.value_and_grad(config.loss_fn)(params, mini)
            # Inside optax.masked / optax.partition the optimizer sees MaskedNode leaves.
            updates, opt_state = optimizer.update(
                grad, opt_state, params, value=loss, value_fn=fill_masked(value_fn, params)
            )
            return optax.apply_updates(params, updates), opt_state, done + 1

        if config.mode == _TWO_PHASE:
            return run_if(_info(carry[1]).phase == 0, run, carry), None
        return run(carry), None

    init = (params, opt_state, jnp.zeros([], jnp.int32))
    (params, opt_state, done), _ = lax.scan(step, init, order)
    return params, opt_state, key, done


def _phase1_step_impl(params, opt_state, data, *, config: _Config):
    """One second-phase step: zero incoming updates, no mini-batch gradient.
    Through an ``optax.MultiSteps`` the inner optimizer steps at once (there is
    nothing to accumulate); its counters stay as they are."""
    value_fn = fill_masked(_objective(config, data), params)
    zeros, dummy = optax.tree.zeros_like(params), jnp.zeros([], jnp.float32)
    if isinstance(config.optimizer, optax.MultiSteps):
        updates, inner = config.optimizer.inner_opt.update(
            zeros, opt_state.inner_opt_state, params, value=dummy, value_fn=value_fn
        )
        opt_state = opt_state._replace(inner_opt_state=inner)
    else:
        optimizer = _with_extra_args(config.optimizer)
        updates, opt_state = optimizer.update(
            zeros, opt_state, params, value=dummy, value_fn=value_fn
        )
    return optax.apply_updates(params, updates), opt_state


def _evaluate_impl(params, data, val_data, *, config: _Config):
    """The monitoring evaluations of one history record."""
    size = config.full_batch_size
    loss, grad = jax.value_and_grad(_objective(config, data))(params)
    out = {"train_loss": loss, "grad_norm": optax.tree.norm(grad)}
    for name, fn in config.metrics:
        out[f"train_{name}"] = full_batch(fn, data, batch_size=size)(params)
    if val_data is not None:
        out["val_loss"] = full_batch(config.loss_fn, val_data, batch_size=size)(params)
        for name, fn in config.metrics:
            out[f"val_{name}"] = full_batch(fn, val_data, batch_size=size)(params)
    return out


_phase0_epoch = jax.jit(_phase0_epoch_impl, static_argnames="config")
_phase0_epoch_donating = jax.jit(
    _phase0_epoch_impl, static_argnames="config", donate_argnums=(0, 1)
)
_phase1_step = jax.jit(_phase1_step_impl, static_argnames="config")
_phase1_step_donating = jax.jit(_phase1_step_impl, static_argnames="config", donate_argnums=(0, 1))
_evaluate = jax.jit(_evaluate_impl, static_argnames="config")


# --------------------------------------------------------------------------- #
# Helpers of the loop.


def _exceeds(cost: float, cost_budget: float) -> bool:
    # Fractional epoch costs (steps / steps_per_epoch) add up with rounding.
    return cost > cost_budget * (1 + 1e-9)


def _stop_reason(record, cost_budget, grad_tol) -> str | None:
    if grad_tol is not None and record["grad_norm"] <= grad_tol:
        return "grad_tol"
    if cost_budget is not None and record["cost"] >= cost_budget:
        return "cost_budget"
    return None


def _maybe_float(diagnostics, field: str) -> float | None:
    value = None if diagnostics is None else getattr(diagnostics, field)
    return None if value is None else float(value)


def _maybe_int(diagnostics, field: str) -> int | None:
    value = None if diagnostics is None else getattr(diagnostics, field)
    return None if value is None else int(value)


PROGRESS_SECONDS = 30.0
"""Seconds between two progress lines when stderr is not a terminal (a log)."""


def progress_text(record: Mapping[str, Any], max_epochs: int, cost_budget: float | None) -> str:
    """One line of progress after an epoch: epoch, cost, phase, loss and
    gradient norm, e.g. ``training: epoch 12, cost 34.5/300 epoch-equivalents,
    phase 1, loss 0.001234, grad norm 0.0567`` (with a budget; without one,
    ``epoch 12/<max_epochs>, cost 12 epoch-equivalents``)."""
    if cost_budget is None:
        done = f"epoch {record['epoch']}/{max_epochs}, cost {record['cost']:.4g}"
    else:
        done = f"epoch {record['epoch']}, cost {record['cost']:.4g}/{cost_budget:.4g}"
    return (
        f"training: {done} epoch-equivalents, phase {record['phase']}, "
        f"loss {record['train_loss']:.4g}, grad norm {record['grad_norm']:.3g}"
    )


class _NoBar:
    """No progress output (``progress=False``, or a process other than 0)."""

    def show(self, record, advance: float) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar on a terminal, counting epochs or epoch-equivalents; the
    postfix is set without a redraw of its own, so ``mininterval`` holds."""

    def __init__(self, tqdm, max_epochs, cost_budget, start_epoch, cost):
        self._bar = tqdm(
            total=max_epochs if cost_budget is None else cost_budget,
            initial=start_epoch if cost_budget is None else cost,
            desc="training",
            unit="epoch" if cost_budget is None else "epoch-equivalent",
        )

    def show(self, record, advance: float) -> None:
        self._bar.set_postfix(
            phase=record["phase"],
            loss=f"{record['train_loss']:.4g}",
            grad_norm=f"{record['grad_norm']:.3g}",
            refresh=False,
        )
        self._bar.update(advance)

    def close(self) -> None:
        self._bar.close()


class _LogLines:
    """Progress for a log file: one plain line (:func:`progress_text`) at most
    every :data:`PROGRESS_SECONDS`, and the last epoch's line at the end; no
    carriage returns, so each line stands alone."""

    def __init__(self, stream, max_epochs: int, cost_budget: float | None):
        self._stream, self._max_epochs, self._cost_budget = stream, max_epochs, cost_budget
        self._last_time = time.perf_counter()
        self._pending: Mapping[str, Any] | None = None

    def show(self, record, advance: float) -> None:
        del advance
        self._pending = record
        if time.perf_counter() - self._last_time >= PROGRESS_SECONDS:
            self._write()

    def _write(self) -> None:
        print(
            progress_text(self._pending, self._max_epochs, self._cost_budget),
            file=self._stream,
            flush=True,
        )
        self._pending = None
        self._last_time = time.perf_counter()

    def close(self) -> None:
        if self._pending is not None:
            self._write()


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (a live IPython shell that is not a
    terminal one); an imported ``ipykernel`` module alone says nothing."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _progress_bar(progress: bool, max_epochs, cost_budget, start_epoch, cost):
    """The run's progress output on process 0: a tqdm bar on a terminal (if
    tqdm is installed), plain lines every :data:`PROGRESS_SECONDS` otherwise."""
    if not progress or jax.process_index() != 0:
        return _NoBar()
    if not (sys.stderr.isatty() or _in_notebook()):  # a log file or pipe
        return _LogLines(sys.stderr, max_epochs, cost_budget)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LogLines(sys.stderr, max_epochs, cost_budget)
    return _Bar(tqdm, max_epochs, cost_budget, start_epoch, cost)


def _save(directory, epoch: int, params, opt_state, key, history, replicated) -> None:
    from twophase import checkpoint as _checkpoint

    # The history first, from process 0 only: a resume drops its records after
    # the checkpoint's epoch, and the save below ends once every process is done,
    # so no process resumes before the file is written.
    if jax.process_index() == 0:
        os.makedirs(os.fspath(directory), exist_ok=True)
        path = os.path.join(os.fspath(directory), HISTORY_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(history, f)
        os.replace(tmp, path)
    state = {
        "params": params,
        "opt_state": opt_state,
        "key": key,
        "epoch": _place(jnp.asarray(epoch, jnp.int32), replicated),
    }
    _checkpoint.save_checkpoint(directory, epoch, state, overwrite=True)


def _read_history(directory) -> list[dict[str, Any]]:
    path = os.path.join(os.fspath(directory), HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)
