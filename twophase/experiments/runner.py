"""The paper's experiment: Adam, Adam+CG and CG alone trained at equal cost.

One :class:`ExperimentConfig` names a dataset, a model and a budget of ``epochs``
epoch-equivalents. :func:`run_comparison` trains three runs from the SAME initial parameters with
the SAME seeded mini-batch schedule (so Adam+CG follows Adam's path up to its switch):

==========  =================================================================================
run         optimizer
==========  =================================================================================
adam        ``optax.adam(lr)`` on mini-batches, every epoch
adam+cg     ``tp.adam_cg(lr, steps_per_epoch=steps_per_epoch)``: Adam, then one full-batch
            nonlinear CG iteration per epoch; the switch is decided by the default detector
            (``switch="auto"``: ``tp.loss_plateau`` on the epoch-mean mini-batch losses, free)
            or fixed after ``k`` Adam epochs (``switch=k``:
            ``detector=tp.switch_at(k * steps_per_epoch)``)
cg          ``tp.nonlinear_cg()`` from the start (full-batch, one iteration per epoch)
==========  =================================================================================

**Equal cost.** Every run spends at most ``epochs`` epoch-equivalents
(``tp.train(..., cost_budget=epochs, strict_budget=True)``): a mini-batch epoch costs 1 and every
full-batch value-and-gradient evaluation costs 1, the CG line search's trial points included. An
epoch (a CG iteration) that would end above the budget is discarded and the run stops before it,
so a CG run may end up to one iteration's cost (typically 2-3) below the budget; a mini-batch run
spends it exactly. A CG epoch usually costs more than 1, so a CG run makes fewer epochs
(iterations) than an Adam run.

**Switch convention.** ``switch_epoch`` is the 1-based index of the first CG epoch in the
history (``None`` for ``adam`` and ``cg``, and for an ``adam+cg`` run whose detector never fired).
``switch=k`` therefore gives ``switch_epoch == k + 1``: ``k`` Adam epochs, then CG, as the paper's
"Adam 300 epochs followed by CG".

**Loss.** ``loss="mse"`` (the paper's): mean squared error on one-hot targets, averaged over
examples and outputs (:func:`twophase.experiments.models.mse_loss`); ``"xent"``: softmax
cross-entropy. The reported ``train_loss``/``val_loss`` are the training objective; accuracy is
reported as ``train_acc``/``val_acc``.

**Learning rate.** Adam's ``lr`` defaults to ``1e-3``, Adam's (and Keras') default, which the
paper's TensorFlow experiments most likely used; it is shared by ``adam`` and ``adam+cg``.

Example::

    from twophase.experiments.runner import ExperimentConfig, run_comparison

    results = run_comparison(ExperimentConfig(dataset="digits", model="mlp", epochs=50))
    for r in results:
        print(r.record["optimizer"], r.record["train_loss"])
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import twophase as tp
from twophase.experiments import datasets as _datasets
from twophase.experiments import models as _models

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "RECORD_KEYS",
    "ExperimentConfig",
    "Problem",
    "RunResult",
    "SweepResult",
    "build_problem",
    "make_optimizer",
    "markdown_table",
    "run_comparison",
    "run_one",
    "sweep_fixed_splits",
    "switch_epoch",
]

OPTIMIZERS = ("adam", "adam+cg", "cg")
"""The three runs of one comparison, in table order."""

LOSSES = ("mse", "xent")

RECORD_KEYS = (
    "optimizer",
    "model",
    "dataset",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "switch_epoch",
    "explanation",
    "cost_epochs",
    "wall_seconds",
    "params",
    "Q",
)
"""The keys of one result record (one entry of ``results.json``), in order."""

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One comparison.

    Attributes:
      dataset: a name in :data:`twophase.experiments.datasets.DATASET_NAMES`.
      model: a name in :data:`twophase.experiments.models.MODEL_NAMES`.
      epochs: cost budget of every run, in epoch-equivalents (``>= 1``).
      batch_size: Adam's mini-batch size (the paper's 512).
      switch: ``"auto"`` (the default detector of :func:`twophase.adam_cg`) or an int ``k >= 1``:
        switch after ``k`` Adam epochs (first CG epoch ``k + 1``).
      seed: seeds the dataset split, the initial parameters and the mini-batch shuffling.
      loss: ``"mse"`` (one-hot targets, the paper's) or ``"xent"``.
      lr: Adam's learning rate.
      data_dir: folder with the raw files of ``mnist``/``cifar10``/``cifar100``.
      max_train: keep at most this many training examples (seeded subset); ``None``: all.
      max_val: likewise for validation.
      full_batch_size: chunk size of the full-batch evaluations (CG, monitoring); bounds memory.
      progress: show train's tqdm progress bar.
      precondition: Adam+CG preconditions CG with Adam's second-moment estimate at the switch
        (``tp.adam_cg(..., precondition=True)``).
    """

    dataset: str = "mnist5k"
    model: str = "mlp"
    epochs: int = 100
    batch_size: int = 512
    switch: int | str = "auto"
    seed: int = 0
    loss: str = "mse"
    lr: float = 1e-3
    data_dir: str | None = None
    max_train: int | None = None
    max_val: int | None = None
    full_batch_size: int | None = 1024
    progress: bool = True
    precondition: bool = False

    def __post_init__(self) -> None:
        if self.dataset not in _datasets.DATASET_NAMES:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}; valid choices: "
                f"{', '.join(_datasets.DATASET_NAMES)}."
            )
        if self.model not in _models.MODEL_NAMES:
            raise ValueError(
                f"Unknown model {self.model!r}; valid choices: {', '.join(_models.MODEL_NAMES)}."
            )
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; valid choices: {', '.join(LOSSES)}.")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        _check_switch(self.switch)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a positive number, got {self.lr!r}.")
        if not isinstance(self.precondition, bool):
            raise ValueError(f"`precondition` must be a bool, got {self.precondition!r}.")


def _check_switch(switch: Any) -> None:
    if switch == "auto":
        return
    if isinstance(switch, bool) or not isinstance(switch, int) or switch < 1:
        raise ValueError(f"`switch` must be 'auto' or an int epoch >= 1, got {switch!r}.")


class Problem(NamedTuple):
    """A model and dataset prepared for :func:`twophase.train`.

    Attributes:
      loss_fn: ``loss_fn(params, (x, y)) -> scalar``, pure in ``params`` (the training objective,
        a mean over the batch).
      params: the initial parameters, a pytree of arrays (``nnx.split``'s ``nnx.Param`` state).
      data: ``(x_train, y_train)``: float32 ``(N, H, W, C)`` images, int32 ``(N,)`` labels.
      val_data: ``(x_val, y_val)``.
      metrics: ``{"acc": accuracy_fn}`` for :func:`twophase.train`.
      dataset: the loaded :class:`~twophase.experiments.datasets.Dataset`.
      num_params: ``P``, trainable scalars.
      q: the paper's overdetermination ``Q = K * M / P``.
      steps_per_epoch: mini-batch steps in one Adam epoch (``N // batch_size``, at least 1).
    """

    loss_fn: Callable[[PyTree, PyTree], jax.Array]
    params: PyTree
    data: tuple[jax.Array, jax.Array]
    val_data: tuple[jax.Array, jax.Array]
    metrics: Mapping[str, Callable[[PyTree, PyTree], jax.Array]]
    dataset: _datasets.Dataset
    num_params: int
    q: float
    steps_per_epoch: int


class RunResult(NamedTuple):
    """One trained run.

    Attributes:
      record: the result record, keys :data:`RECORD_KEYS` (JSON-ready: floats, ints, ``None``).
      history: :func:`twophase.train`'s per-epoch records.
      stop_reason: :func:`twophase.train`'s stop reason.
    """

    record: dict[str, Any]
    history: list[dict[str, Any]]
    stop_reason: str


class SweepResult(NamedTuple):
    """What :func:`sweep_fixed_splits` returns.

    Attributes:
      runs: ``{k: RunResult}``, the ``adam+cg`` run switching after ``k`` Adam epochs.
      best_epoch: the ``k`` with the lowest final training loss.
      best: ``runs[best_epoch]``.
    """

    runs: dict[int, RunResult]
    best_epoch: int
    best: RunResult


# ----------------------------------------------------------------------------------------------
# Building blocks.


def build_problem(config: ExperimentConfig, dataset: _datasets.Dataset | None = None) -> Problem:
    """Loads the data, builds the nnx model and splits it into a pure loss of a params pytree.

    Args:
      config: the experiment.
      dataset: an already loaded dataset to use instead of loading ``config.dataset``.

    Raises:
      ValueError, FileNotFoundError: from :func:`~twophase.experiments.datasets.load_dataset`
        (e.g. ``data_dir`` lacks the expected files; the message names them).
    """
    if dataset is None:
        dataset = _datasets.load_dataset(
            config.dataset,
            data_dir=config.data_dir,
            seed=config.seed,
            max_train=config.max_train,
            max_val=config.max_val,
        )
    num_classes = dataset.num_classes
    model = _models.make_model(
        config.model,
        image_shape=dataset.image_shape,
        num_classes=num_classes,
        rngs=nnx.Rngs(config.seed),
    )
    num_params = _models.count_params(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(params: PyTree, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params, rest, copy=True)(x)

    if config.loss == "mse":

        def loss_fn(params: PyTree, batch: PyTree) -> jax.Array:
            x, y = batch
            return _models.mse_loss(forward(params, x), y, num_classes)

    else:

        def loss_fn(params: PyTree, batch: PyTree) -> jax.Array:
            x, y = batch
            return _models.cross_entropy_loss(forward(params, x), y)

    def acc_fn(params: PyTree, batch: PyTree) -> jax.Array:
        x, y = batch
        return _models.accuracy(forward(params, x), y)

    num_train = len(dataset.y_train)
    return Problem(
        loss_fn=loss_fn,
        params=params,
        data=(jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)),
        val_data=(jnp.asarray(dataset.x_val), jnp.asarray(dataset.y_val)),
        metrics={"acc": acc_fn},
        dataset=dataset,
        num_params=num_params,
        q=_models.overdetermination(num_train, num_classes, num_params),
        steps_per_epoch=max(num_train // config.batch_size, 1),
    )


def make_optimizer(
    name: str,
    *,
    lr: float,
    steps_per_epoch: int,
    switch: int | str = "auto",
    precondition: bool = False,
) -> optax.GradientTransformation:
    """The optimizer of one run (see the module docstring).

    Args:
      name: one of :data:`OPTIMIZERS`.
      lr: Adam's learning rate (``adam``, ``adam+cg``).
      steps_per_epoch: mini-batch steps per epoch: the detector's window, and the unit of a
        fixed switch.
      switch: ``"auto"`` or ``k``: switch after ``k`` Adam epochs (``adam+cg`` only).
      precondition: CG preconditioned by Adam's second moments (``adam+cg`` only).
    """
    if name == "adam":
        return optax.adam(lr)
    if name == "adam+cg":
        _check_switch(switch)
        detector = None if switch == "auto" else tp.switch_at(int(switch) * steps_per_epoch)
        return tp.adam_cg(lr, policy=detector, precondition=precondition)
    if name == "cg":
        return tp.nonlinear_cg()
    raise ValueError(f"Unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}.")


def switch_epoch(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The 1-based epoch of the first CG epoch of a two-phase run; ``None`` if it never switched
    (or the history holds no two-phase records: ``switch_step`` is ``None`` throughout)."""
    if not history or history[0].get("switch_step") is None:
        return None
    for record in history:
        if record["phase"] == 1:
            return int(record["epoch"])
    return None


def _final(history: Sequence[Mapping[str, Any]], key: str) -> float | None:
    value = history[-1].get(key) if history else None
    return None if value is None else float(value)


def run_one(
    config: ExperimentConfig,
    optimizer: str,
    *,
    problem: Problem | None = None,
    switch: int | str | None = None,
) -> RunResult:
    """Trains one run of the comparison.

    Args:
      config: the experiment.
      optimizer: one of :data:`OPTIMIZERS`.
      problem: a prepared :func:`build_problem` (built from ``config`` if ``None``). Reuse one
        problem across runs so that they share initial parameters and compilations.
      switch: overrides ``config.switch`` for ``adam+cg``.
    """
    problem = build_problem(config) if problem is None else problem
    switch = config.switch if switch is None else switch
    tx = make_optimizer(
        optimizer,
        lr=config.lr,
        steps_per_epoch=problem.steps_per_epoch,
        switch=switch,
        precondition=config.precondition,
    )
    result = tp.train(
        problem.loss_fn,
        problem.params,
        problem.data,
        tx,
        batch_size=config.batch_size,
        # An epoch normally costs at least one epoch-equivalent (a CG iteration at least one
        # gradient evaluation), so the cost budget stops the run first; the cap only guards
        # against a run that stopped paying (e.g. an exactly zero CG gradient).
        max_epochs=2 * config.epochs + 1,
        cost_budget=float(config.epochs),
        strict_budget=True,
        full_batch_size=config.full_batch_size,
        val_data=problem.val_data,
        metrics=problem.metrics,
        seed=config.seed,
        progress=config.progress,
    )
    history = result.history
    record = {
        "optimizer": optimizer,
        "model": config.model,
        "dataset": problem.dataset.name,
        "train_loss": _final(history, "train_loss"),
        "train_acc": _final(history, "train_acc"),
        "val_loss": _final(history, "val_loss"),
        "val_acc": _final(history, "val_acc"),
        "switch_epoch": switch_epoch(history) if optimizer == "adam+cg" else None,
        "explanation": (
            explain(history, _exploring(result.opt_state)) if optimizer == "adam+cg" else None
        ),
        "cost_epochs": _final(history, "cost"),
        "wall_seconds": _final(history, "wall_seconds"),
        "params": int(problem.num_params),
        "Q": float(problem.q),
    }
    return RunResult(record, history, result.stop_reason)


def run_comparison(
    config: ExperimentConfig,
    optimizers: Sequence[str] = OPTIMIZERS,
    *,
    problem: Problem | None = None,
    on_start: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Trains ``optimizers`` (default all three) at equal cost from the same initial parameters.

    Args:
      config: the experiment.
      optimizers: run names from :data:`OPTIMIZERS`, in order.
      problem: a prepared :func:`build_problem` (built from ``config`` if ``None``).
      on_start: called with each run's name before it trains (e.g. to print a header).

    Returns:
      One :class:`RunResult` per name in ``optimizers``.
    """
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}.")
    problem = build_problem(config) if problem is None else problem
    results = []
    for name in optimizers:
        if on_start is not None:
            on_start(name)
        results.append(run_one(config, name, problem=problem))
    return results


def split_epochs(epochs: int, fractions: Sequence[float]) -> list[int]:
    """Distinct fixed switch epochs ``round(f * epochs)`` in ``[1, epochs - 1]``, ascending."""
    chosen = {min(max(round(f * epochs), 1), max(epochs - 1, 1)) for f in fractions}
    return sorted(chosen)


def sweep_fixed_splits(
    config: ExperimentConfig,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    *,
    problem: Problem | None = None,
) -> SweepResult:
    """``adam+cg`` with a fixed switch after ``k = round(f * epochs)`` Adam epochs, per fraction.

    The paper's experiments used such fixed splits (Adam 30% of the epochs, then CG). All runs
    share initial parameters and mini-batch schedule with the other runs of ``config``.

    Returns:
      A :class:`SweepResult`; ``best`` is the split with the lowest final training loss.
    """
    if not fractions:
        raise ValueError("`fractions` must not be empty.")
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise ValueError(f"`fractions` must lie in (0, 1), got {f!r}.")
    problem = build_problem(config) if problem is None else problem
    runs = {
        k: run_one(config, "adam+cg", problem=problem, switch=k)
        for k in split_epochs(config.epochs, fractions)
    }

    def final_loss(k: int) -> float:
        loss = runs[k].record["train_loss"]
        return math.inf if loss is None or not math.isfinite(loss) else loss

    best_epoch = min(runs, key=final_loss)
    return SweepResult(runs, best_epoch, runs[best_epoch])


# ----------------------------------------------------------------------------------------------
# Reporting.


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _exploring(opt_state: Any) -> bool | None:
    """The switching policy's documented ``exploring`` flag in a final optimizer
    state (:class:`twophase.SafeResortState`), or ``None`` without one."""

    def has_flag(node: Any) -> bool:
        return hasattr(node, "_fields") and "exploring" in node._fields

    nodes = jax.tree.leaves(opt_state, is_leaf=has_flag)
    flags = [bool(node.exploring) for node in nodes if has_flag(node)]
    return flags[0] if flags else None


def explain(history: Sequence[Mapping[str, Any]], exploring: bool | None = None) -> str:
    """One line saying what a two-phase run did: its trials of CG, the returns to
    Adam and the phase it ended in (read from the per-epoch ``phase``), and, with
    ``exploring=False`` (the policy's final ``exploring`` flag), that it stopped trying."""
    phases = [r["phase"] for r in history]
    pairs = list(itertools.pairwise([0, *phases]))
    starts = [i + 1 for i, (a, b) in enumerate(pairs) if a == 0 and b == 1]
    returns = sum(1 for a, b in pairs if a == 1 and b == 0)
    if not starts:
        return "never switched: Adam throughout"
    text = f"CG tried {len(starts)}x (epochs {', '.join(map(str, starts))})"
    if returns:
        text += f", returned to Adam {returns}x where CG gained less than Adam would have"
    if exploring is False:
        text += "; stopped trying after two trials that each gained under a tenth of Adam's gain"
    if phases[-1] == 1:
        text += f"; CG from epoch {starts[-1]} to the end"
    return text


def markdown_table(records: Sequence[Mapping[str, Any]]) -> str:
    """A Table-1-style markdown table: one row per run, then one line per two-phase run saying
    what it did (its ``explanation``) and its final training loss as a multiple of Adam's (when
    ``records`` hold an ``adam`` run)."""
    header = (
        "| run | train loss | train acc | val loss | val acc | switch epoch | cost (epochs) "
        "| wall s | P | Q |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        cells = [
            r["optimizer"],
            _fmt(r["train_loss"]),
            _fmt(r["train_acc"], 3),
            _fmt(r["val_loss"]),
            _fmt(r["val_acc"], 3),
            _fmt(r["switch_epoch"]),
            _fmt(r["cost_epochs"], 1),
            _fmt(r["wall_seconds"], 1),
            _fmt(r["params"]),
            _fmt(r["Q"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    adam_loss = next((r["train_loss"] for r in records if r["optimizer"] == "adam"), None)
    lines += [
        f"\n{r['optimizer']}: {r['explanation']}{_versus_adam(r['train_loss'], adam_loss)}"
        for r in records
        if r.get("explanation")
    ]
    return "\n".join(lines)


def _versus_adam(loss: float | None, adam_loss: float | None) -> str:
    """``". Ends at 1.016x Adam's training loss (0.000792 vs 0.000780): not below Adam"``, or
    ``""`` unless both losses are finite and Adam's is positive."""
    if loss is None or adam_loss is None or not math.isfinite(loss) or not math.isfinite(adam_loss):
        return ""
    if adam_loss <= 0:
        return ""
    side = "below Adam" if loss < adam_loss else "not below Adam"
    return (
        f". Ends at {loss / adam_loss:.3f}x Adam's training loss "
        f"({_fmt(loss, 6)} vs {_fmt(adam_loss, 6)}): {side}"
    )
