"""Shared helpers of the ``benchmarks/`` scripts.

Small tanh MLPs written as plain pytrees (a list of ``(w, b)`` pairs), the mean-squared-error
loss the paper uses, the benchmark problems of ``switching.py``, a deterministic mini-batch
schedule (for the scripts' own Adam loops) and ``train_run``: one optimizer on one problem
through ``tp.train(..., strict_budget=True)``. Everything is float32 and seeded.
"""

from __future__ import annotations

import itertools
import shlex
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree
from jax import lax

import twophase as tp

Params = list  # [(w, b), ...]


def mlp_init(seed: int, sizes: Sequence[int], gain: float = 1.0) -> Params:
    """Dense layers ``sizes[0] -> ... -> sizes[-1]``: weights ``N(0, gain^2 / fan_in)``,
    zero biases."""
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        w = rng.standard_normal((fan_in, fan_out)) * gain / np.sqrt(fan_in)
        params.append((jnp.asarray(w, jnp.float32), jnp.zeros(fan_out, jnp.float32)))
    return params


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    """tanh hidden layers, linear output."""
    for w, b in params[:-1]:
        x = jnp.tanh(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def mse(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over examples and outputs of the squared error (the paper's loss)."""
    return jnp.mean(jnp.square(mlp_apply(params, x) - y))


def count_params(params: Params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


class Problem(NamedTuple):
    """A training problem: full data set, student architecture and Adam settings.

    ``learning_rates`` are the Adam learning rates swept; the best (lowest full-batch training
    loss after the budget) is used by every method on that problem.
    """

    name: str
    kind: str
    x: np.ndarray
    y: np.ndarray
    sizes: tuple[int, ...]
    batch_size: int
    learning_rates: tuple[float, ...]
    init_seed: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return self.x.shape[0] // self.batch_size

    def init(self) -> Params:
        return mlp_init(self.init_seed, self.sizes)


def teacher_student(
    n: int = 4096,
    seed: int = 0,
    sizes: tuple[int, ...] = (16, 32, 32, 1),
    name: str = "teacher-student",
    batch_size: int = 64,
) -> Problem:
    """Realizable regression: a tanh MLP teacher labels Gaussian inputs; the student has the
    same architecture (different initialisation), so the minimum loss is 0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, sizes[0])).astype(np.float32)
    teacher = mlp_init(seed + 100, sizes, gain=1.5)
    y = np.asarray(mlp_apply(teacher, jnp.asarray(x)), np.float32)
    return Problem(name, "realizable regression", x, y, sizes, batch_size, (3e-4, 1e-3, 3e-3, 1e-2))


def small_teacher_student() -> Problem:
    """A small, strongly overdetermined realizable regression (4-8-1, 1024 examples, Q = 20),
    the regime of the paper's small models, where CG can reach the basin's bottom."""
    return teacher_student(1024, 0, (4, 8, 1), "teacher-student-small", 32)


def digits() -> Problem:
    """sklearn's 8x8 digits (1797 images), MSE on one-hot targets, a 64-32-10 tanh MLP."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[data.target]
    return Problem(
        "digits", "classification (MSE, one-hot)", x, y, (64, 32, 10), 64, (1e-3, 3e-3, 1e-2, 3e-2)
    )


def friedman(n: int = 2048, seed: int = 0) -> Problem:
    """Friedman #1 regression with noise (not realizable, targets of scale ~10, loss ~1-30)."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=n, n_features=10, noise=1.0, random_state=seed)
    return Problem(
        "friedman1",
        "noisy regression, large scale",
        x.astype(np.float32),
        y[:, None].astype(np.float32),
        (10, 32, 1),
        64,
        (1e-3, 3e-3, 1e-2, 3e-2),
    )


def problems() -> list[Problem]:
    return [small_teacher_student(), teacher_student(), digits(), friedman()]


def batch_schedule(n: int, batch_size: int, epochs: int, seed: int = 0) -> np.ndarray:
    """``(epochs, steps_per_epoch, batch_size)`` int32 indices: a fresh permutation per epoch,
    the incomplete last batch dropped. The same schedule serves every method."""
    rng = np.random.default_rng(seed)
    steps = n // batch_size
    perms = [rng.permutation(n)[: steps * batch_size] for _ in range(epochs)]
    return np.stack(perms).reshape(epochs, steps, batch_size).astype(np.int32)


def command_line() -> str:
    """The exact command that ran this script."""
    return " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- Adam alone


def _epoch_stats(grads_sum, sq_sum, cos_sum, m):
    """Replica of the detectors' window estimate, RMS mini-batch norm, mean lag-1 cosine."""
    unbiased = (optax.tree.vdot(grads_sum, grads_sum) - sq_sum) / (m * (m - 1))
    estimate = jnp.sqrt(jnp.maximum(unbiased, 0.0))
    return jnp.stack([estimate, jnp.sqrt(sq_sum / m), cos_sum / (m - 1)])


@jax.jit
def adam_epoch(params, state, lr, idx, data):
    """One epoch of ``optax.adam(lr)``; returns the epoch's gradient statistics as well."""
    x, y = data
    opt = optax.adam(lr)

    def step(carry, batch):
        params, state, g_sum, sq_sum, cos_sum, g_prev = carry
        grad = jax.grad(mse)(params, x[batch], y[batch])
        norm = optax.tree.norm(grad)
        cos = optax.tree.vdot(grad, g_prev) / jnp.maximum(norm * optax.tree.norm(g_prev), 1e-30)
        updates, state = opt.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        carry = (params, state, optax.tree.add(g_sum, grad), sq_sum + norm**2, cos_sum + cos, grad)
        return carry, None

    zeros = optax.tree.zeros_like(params)
    init = (params, state, zeros, 0.0, 0.0, zeros)
    (params, state, g_sum, sq_sum, cos_sum, _), _ = lax.scan(step, init, idx)
    return params, state, _epoch_stats(g_sum, sq_sum, cos_sum, idx.shape[0])


@jax.jit
def full_loss_and_norm(params, data):
    loss, grad = jax.value_and_grad(mse)(params, *data)
    return loss, optax.tree.norm(grad)


def run_adam(problem: Problem, lr: float, schedule: np.ndarray, data) -> tuple[float, dict]:
    """Adam for ``len(schedule)`` epochs: final full-batch loss and per-epoch diagnostics
    ``epoch -> (estimate, true norm at epoch end, RMS mini-batch norm, lag-1 cosine, loss)``."""
    params = problem.init()
    state = optax.adam(lr).init(params)
    diag = {}
    for epoch, idx in enumerate(schedule, start=1):
        params, state, stats = adam_epoch(params, state, jnp.float32(lr), idx, data)
        loss, norm = full_loss_and_norm(params, data)
        est, rms, cos = np.asarray(stats)
        diag[epoch] = (float(est), float(norm), float(rms), float(cos), float(loss))
    return diag[len(schedule)][4], diag


# --------------------------------------------------------------------------- through tp.train


class Run(NamedTuple):
    """One ``tp.train`` run at a strict budget, summarised from its history."""

    loss: float  # full-batch training loss after the last kept epoch
    switch_epoch: int | None  # Adam epochs before the first switch; None: never switched
    adam_epochs: int  # phase-0 (mini-batch) epochs kept
    evals: int  # full-batch value+grad evaluations made by the optimizer (tp.info)
    iterations: int  # phase-1 iterations kept (one per phase-1 epoch)
    cost: float  # epoch-equivalents, tp.train's accounting
    stats: dict[int, float]  # epoch -> detector grad_norm_stat, before the first switch
    params: object  # the final parameters


def loss_fn(params: Params, batch) -> jax.Array:
    """``mse`` as ``tp.train``'s ``loss_fn(params, (x, y))``."""
    return mse(params, *batch)


def train_run(problem: Problem, optimizer, budget: float, seed: int = 0) -> Run:
    """``optimizer`` on ``problem`` from ``problem.init()`` through ``tp.train(...,
    cost_budget=budget, strict_budget=True, seed=seed)``: every run with the same ``seed`` sees
    the same mini-batch shuffles, so two-phase runs share Adam's trajectory up to their switch.
    An epoch that would take the cost above ``budget`` is discarded (the run stops there)."""
    result = tp.train(
        loss_fn,
        problem.init(),
        (problem.x, problem.y),
        optimizer,
        batch_size=problem.batch_size,
        max_epochs=10 * int(budget),
        cost_budget=budget,
        strict_budget=True,
        progress=False,
        seed=seed,
    )
    history = result.history
    switches = [r["switch_step"] for r in history if r["switch_step"] not in (None, -1)]
    stats = {
        r["epoch"]: r["grad_norm_stat"]
        for r in history
        if r["phase"] == 0 and r["switch_step"] in (None, -1) and r["grad_norm_stat"] is not None
    }
    try:
        evals = int(tp.info(result.opt_state).value_and_grad_evals)
    except ValueError:  # no twophase state (optax.adam): no full-batch evaluation
        evals = 0
    return Run(
        loss=history[-1]["train_loss"],
        switch_epoch=switches[0] // problem.steps_per_epoch if switches else None,
        adam_epochs=sum(r["phase"] == 0 for r in history),
        evals=evals,
        iterations=sum(r["phase"] == 1 for r in history),
        cost=history[-1]["cost"],
        stats=stats,
        params=result.params,
    )
