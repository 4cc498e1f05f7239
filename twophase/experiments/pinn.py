"""Physics-informed neural networks: the three failure-mode problems of Krishnapriyan et al.,
"Characterizing possible failure modes in physics-informed neural networks" (NeurIPS 2021), as
set up by Rathore et al., "Challenges in Training PINNs: A Loss Landscape Perspective" (ICML
2024), and a full-batch training loop with equal-cost accounting.

Problems (:data:`PROBLEM_NAMES`; ``x`` space, ``t`` time in [0, 1], ``u`` the network output):

- ``convection``: ``u_t + beta u_x = 0`` (beta = 40), x in [0, 2 pi], ``u(x, 0) = sin x``,
  periodic in x; exact ``sin(x - beta t)``.
- ``reaction``: ``u_t - rho u (1 - u) = 0`` (rho = 5), x in [0, 2 pi],
  ``u(x, 0) = h(x) = exp(-(x - pi)^2 / (2 (pi / 4)^2))``, periodic; exact
  ``h e^{rho t} / (h e^{rho t} + 1 - h)``.
- ``wave``: ``u_tt - 4 u_xx = 0`` (beta = 5), x in [0, 1],
  ``u(x, 0) = sin(pi x) + sin(beta pi x) / 2``, ``u_t(x, 0) = 0``, ``u(0, t) = u(1, t) = 0``;
  exact ``sin(pi x) cos(2 pi t) + sin(beta pi x) cos(2 beta pi t) / 2``.

The loss is the sum of mean squared terms (:func:`loss_terms`): the PDE residual at interior
points, the initial condition (and, for ``wave``, the initial velocity) along ``t = 0``, and
the boundary condition along both x edges (periodic: ``u(x_min, t) - u(x_max, t)``; Dirichlet:
``u`` itself). Every derivative comes from JAX transforms of the network (``jax.grad``,
``jax.hessian``, ``jax.vmap``); nothing is derived by hand.

The network (:func:`init_mlp`, :func:`mlp`) is a tanh MLP ``(x, t) -> u`` with Xavier-normal
weights and zero biases, a plain pytree. Everything is float64 by default (the functions take a
``dtype``); float64 needs ``jax.config.update("jax_enable_x64", True)``, which this module never
sets itself.

:func:`train` runs any optax transformation on the full loss, counting cost in full-batch
value-and-gradient evaluations: a first-order step (Adam's, or a two-phase optimizer's phase 0)
costs one; a second phase costs what ``twophase.info(state).value_and_grad_evals`` says plus
``twophase.HVP_COST`` (1.5) per Hessian-vector product (``hessian_vector_products``);
``optax.lbfgs`` alone costs its evaluation at the current point when not cached plus its zoom
line search's steps, counted as :func:`twophase.two_phase` does.

This module depends on the core package, never the reverse.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree
from jax import lax

import twophase as tp

__all__ = [
    "PROBLEM_NAMES",
    "Collocation",
    "Problem",
    "TrainLog",
    "collocation",
    "evaluation_grid",
    "init_mlp",
    "loss_terms",
    "make_gauss_newton_loss",
    "make_loss",
    "make_problem",
    "mlp",
    "pde_residual",
    "relative_l2_error",
    "residuals",
    "train",
]

PROBLEM_NAMES = ("convection", "reaction", "wave")

Params = list  # [{"w": (fan_in, fan_out), "b": (fan_out,)}, ...]
ScalarFn = Callable[[jax.Array, jax.Array], jax.Array]  # u(x, t) for scalar x, t


# ----------------------------------------------------------------------------------------------
# Problems.


class Problem(NamedTuple):
    """One PDE problem.

    Attributes:
      name: one of :data:`PROBLEM_NAMES`.
      coefficient: beta (convection, wave) or rho (reaction).
      x_range: ``(x_min, x_max)``; t runs over ``[0, 1]``.
      periodic: periodic boundary (``u(x_min, t) = u(x_max, t)``) or, if false, Dirichlet
        ``u = 0`` on both edges.
      initial_velocity: the problem has the extra initial condition ``u_t(x, 0) = 0``.
    """

    name: str
    coefficient: float
    x_range: tuple[float, float]
    periodic: bool
    initial_velocity: bool

    def exact(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """The exact solution at ``(x, t)`` (any broadcastable shapes)."""
        c = self.coefficient
        if self.name == "convection":
            return jnp.sin(x - c * t)
        if self.name == "reaction":
            h = self.initial(x)
            e = h * jnp.exp(c * t)
            return e / (e + 1 - h)
        return jnp.sin(jnp.pi * x) * jnp.cos(2 * jnp.pi * t) + 0.5 * jnp.sin(
            c * jnp.pi * x
        ) * jnp.cos(2 * c * jnp.pi * t)

    def initial(self, x: jax.Array) -> jax.Array:
        """The initial condition ``u(x, 0)``."""
        if self.name == "convection":
            return jnp.sin(x)
        if self.name == "reaction":
            return jnp.exp(-jnp.square(x - jnp.pi) / (2 * (jnp.pi / 4) ** 2))
        return jnp.sin(jnp.pi * x) + 0.5 * jnp.sin(self.coefficient * jnp.pi * x)


_DEFAULT_COEFFICIENTS = {"convection": 40.0, "reaction": 5.0, "wave": 5.0}


def make_problem(name: str, coefficient: float | None = None) -> Problem:
    """The problem ``name`` with its standard coefficient (convection beta = 40, reaction
    rho = 5, wave beta = 5) unless ``coefficient`` is given.

    Raises:
      ValueError: an unknown ``name`` (the message lists the choices), or a ``coefficient``
        that is not a finite number.
    """
    if name not in PROBLEM_NAMES:
        raise ValueError(f"Unknown problem {name!r}; valid choices: {', '.join(PROBLEM_NAMES)}.")
    if coefficient is None:
        coefficient = _DEFAULT_COEFFICIENTS[name]
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float, np.number)):
        raise ValueError(f"`coefficient` must be a number, got {coefficient!r}.")
    if not math.isfinite(coefficient):
        raise ValueError(f"`coefficient` must be finite, got {coefficient!r}.")
    wave = name == "wave"
    return Problem(
        name=name,
        coefficient=float(coefficient),
        x_range=(0.0, 1.0) if wave else (0.0, 2 * math.pi),
        periodic=not wave,
        initial_velocity=wave,
    )


def pde_residual(problem: Problem, u: ScalarFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """The PDE residual of ``u`` at the scalar point ``(x, t)``, with derivatives from JAX.

    ``u(x, t)`` maps two scalars to a scalar (the network with its parameters bound, or an
    exact solution). ``jax.vmap`` it over points.
    """
    c = problem.coefficient
    if problem.name == "convection":
        u_x, u_t = jax.grad(u, argnums=(0, 1))(x, t)
        return u_t + c * u_x
    if problem.name == "reaction":
        value, u_t = jax.value_and_grad(u, argnums=1)(x, t)
        return u_t - c * value * (1 - value)
    (u_xx, _), (_, u_tt) = jax.hessian(u, argnums=(0, 1))(x, t)
    return u_tt - 4.0 * u_xx


# ----------------------------------------------------------------------------------------------
# Points.


class Collocation(NamedTuple):
    """Training points, each array of shape ``(n, 2)`` holding ``(x, t)`` rows.

    Attributes:
      residual: interior points, where the PDE residual is penalised.
      initial: points along ``t = 0``.
      initial_values: ``(n_initial,)``, the initial condition at ``initial``.
      boundary_lower: points along ``x = x_min``.
      boundary_upper: points along ``x = x_max``, at the same times as ``boundary_lower``
        (a periodic boundary compares them pairwise).
    """

    residual: jax.Array
    initial: jax.Array
    initial_values: jax.Array
    boundary_lower: jax.Array
    boundary_upper: jax.Array


def _float_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"`dtype` must be float32 or float64, got {dtype}.")
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "`dtype` float64 needs jax.config.update('jax_enable_x64', True) (call it before "
            "creating any array), or pass dtype=jnp.float32."
        )
    return dtype


def _grid_axes(problem: Problem, n_x: int, n_t: int) -> tuple[np.ndarray, np.ndarray]:
    for name, n in (("n_x", n_x), ("n_t", n_t)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 3:
            raise ValueError(f"`{name}` must be an int >= 3, got {n!r}.")
    return np.linspace(*problem.x_range, n_x), np.linspace(0.0, 1.0, n_t)


def evaluation_grid(
    problem: Problem, n_x: int = 101, n_t: int = 101, *, dtype: Any = jnp.float64
) -> jax.Array:
    """The regular ``n_x``-by-``n_t`` grid over the domain (edges included), as ``(n_x * n_t,
    2)`` rows ``(x, t)``, x varying slowest: where the relative L2 error is measured."""
    dtype = _float_dtype(dtype)
    xs, ts = _grid_axes(problem, n_x, n_t)
    xx, tt = np.meshgrid(xs, ts, indexing="ij")
    return jnp.asarray(np.stack([xx.ravel(), tt.ravel()], axis=1), dtype)


def collocation(
    problem: Problem,
    *,
    n_x: int = 101,
    n_t: int = 101,
    n_residual: int = 1000,
    seed: int = 0,
    dtype: Any = jnp.float64,
) -> Collocation:
    """Training points on the regular ``n_x``-by-``n_t`` grid (as in the reference code).

    ``n_residual`` residual points are drawn without replacement from the grid's interior
    (``(n_x - 2) * (n_t - 2)`` points, seeded by ``seed``); the initial points are the ``n_x``
    grid points at ``t = 0``; the boundary points are the ``n_t`` grid times at each x edge.

    Raises:
      ValueError: ``n_x`` or ``n_t`` below 3; ``n_residual`` not in ``[1, interior size]``;
        a ``dtype`` other than float32/float64, or float64 without x64 enabled.
    """
    dtype = _float_dtype(dtype)
    xs, ts = _grid_axes(problem, n_x, n_t)
    interior = (n_x - 2) * (n_t - 2)
    if (
        isinstance(n_residual, bool)
        or not isinstance(n_residual, (int, np.integer))
        or not 1 <= n_residual <= interior
    ):
        raise ValueError(
            f"`n_residual` must be an int in [1, {interior}] (the interior of the {n_x}x{n_t} "
            f"grid), got {n_residual!r}."
        )
    xx, tt = np.meshgrid(xs[1:-1], ts[1:-1], indexing="ij")
    inner = np.stack([xx.ravel(), tt.ravel()], axis=1)
    picked = np.random.default_rng(seed).choice(len(inner), n_residual, replace=False)
    initial = np.stack([xs, np.zeros_like(xs)], axis=1)
    lower = np.stack([np.full_like(ts, xs[0]), ts], axis=1)
    upper = np.stack([np.full_like(ts, xs[-1]), ts], axis=1)
    as_array = lambda a: jnp.asarray(a, dtype)
    return Collocation(
        residual=as_array(inner[np.sort(picked)]),
        initial=as_array(initial),
        initial_values=problem.initial(as_array(xs)),
        boundary_lower=as_array(lower),
        boundary_upper=as_array(upper),
    )


def _check_points(points: Collocation) -> None:
    """ValueError naming the arrays whose shapes do not fit together."""
    for field in ("residual", "initial", "boundary_lower", "boundary_upper"):
        shape = jnp.shape(getattr(points, field))
        if len(shape) != 2 or shape[1] != 2 or shape[0] < 1:
            raise ValueError(f"`{field}` must have shape (n, 2) with n >= 1, got {shape}.")
    n_initial, n_values = jnp.shape(points.initial)[0], jnp.shape(points.initial_values)
    if n_values != (n_initial,):
        raise ValueError(
            f"`initial` and `initial_values` have mismatched sizes: {n_initial} points, "
            f"values of shape {n_values}."
        )
    lower, upper = jnp.shape(points.boundary_lower)[0], jnp.shape(points.boundary_upper)[0]
    if lower != upper:
        raise ValueError(
            f"`boundary_lower` and `boundary_upper` have mismatched sizes: {lower} and {upper} "
            "points (they are paired)."
        )


# ----------------------------------------------------------------------------------------------
# The network.


def init_mlp(
    key: jax.Array, widths: Sequence[int] = (50, 50, 50), *, dtype: Any = jnp.float64
) -> Params:
    """A tanh MLP ``(x, t) -> u`` with hidden layers ``widths``: Xavier-normal weights
    (``N(0, 2 / (fan_in + fan_out))``) and zero biases, as ``[{"w", "b"}, ...]``.

    Raises:
      ValueError: an empty ``widths`` or a width below 1; a bad ``dtype``.
    """
    dtype = _float_dtype(dtype)
    widths = tuple(widths)
    if not widths or any(
        isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in widths
    ):
        raise ValueError(f"`widths` must be a non-empty sequence of positive ints, got {widths}.")
    sizes = (2, *widths, 1)
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (m, n), dtype) * math.sqrt(2.0 / (m + n)),
            "b": jnp.zeros(n, dtype),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params: Params, x: jax.Array, t: jax.Array) -> jax.Array:
    """The network at one point: scalars ``x``, ``t`` -> scalar ``u``."""
    h = jnp.stack([x, t])
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return (h @ params[-1]["w"] + params[-1]["b"])[0]


def _predict(params: Params, points: jax.Array) -> jax.Array:
    return jax.vmap(lambda p: mlp(params, p[0], p[1]))(points)


# ----------------------------------------------------------------------------------------------
# Loss and error.


def loss_terms(
    params: Params, problem: Problem, points: Collocation
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The PINN loss and its terms, each a mean of squares.

    Returns:
      ``(total, terms)``: ``terms`` maps ``"residual"``, ``"initial"``, ``"boundary"`` (and
      ``"initial_velocity"`` for wave) to scalars; ``total`` is their sum.

    Raises:
      ValueError: collocation arrays of mismatched sizes (the message names them).
    """
    terms = {
        name: jnp.mean(jnp.square(r)) for name, r in residuals(params, problem, points).items()
    }
    return sum(terms.values()), terms


def residuals(params: Params, problem: Problem, points: Collocation) -> dict[str, jax.Array]:
    """The residual vectors whose mean squares are :func:`loss_terms`' terms: ``"residual"``
    (the PDE at ``points.residual``), ``"initial"``, ``"boundary"`` (and
    ``"initial_velocity"`` for wave), each a 1-d array.

    Raises:
      ValueError: collocation arrays of mismatched sizes (the message names them).
    """
    _check_points(points)
    u = lambda x, t: mlp(params, x, t)
    residual = jax.vmap(lambda p: pde_residual(problem, u, p[0], p[1]))(points.residual)
    initial = _predict(params, points.initial) - points.initial_values
    lower = _predict(params, points.boundary_lower)
    upper = _predict(params, points.boundary_upper)
    boundary = lower - upper if problem.periodic else jnp.concatenate([lower, upper])
    found = {"residual": residual, "initial": initial, "boundary": boundary}
    if problem.initial_velocity:
        found["initial_velocity"] = jax.vmap(lambda p: jax.grad(u, argnums=1)(p[0], p[1]))(
            points.initial
        )
    return found


def make_gauss_newton_loss(problem: Problem, points: Collocation) -> tp.GaussNewtonObjective:
    """The total loss of :func:`loss_terms` as a :func:`twophase.gauss_newton_objective`
    (``0.5 * sum`` of the residuals scaled by ``sqrt(2 / n)`` for a term of ``n`` entries, so
    that each term is its mean square), the ``value_fn`` for ``twophase.second_phase.newton_cg(
    curvature="gauss_newton")``: Gauss-Newton products ``J^T J v`` of these residuals."""
    _check_points(points)

    def scaled(params):
        return {
            name: r * math.sqrt(2.0 / r.shape[0])
            for name, r in residuals(params, problem, points).items()
        }

    return tp.gauss_newton_objective(scaled, reduction="half_sum")


def make_loss(
    problem: Problem, points: Collocation
) -> Callable[[Params], tuple[jax.Array, dict[str, jax.Array]]]:
    """``params -> (total, terms)``: :func:`loss_terms` with the problem and points bound
    (checked here, once). ``lambda p: fn(p)[0]`` is the ``value_fn`` an optimizer needs."""
    _check_points(points)
    return lambda params: loss_terms(params, problem, points)


def relative_l2_error(params: Params, problem: Problem, grid: jax.Array) -> jax.Array:
    """``||u_net - u_exact||_2 / ||u_exact||_2`` over the ``(n, 2)`` points ``grid``
    (e.g. :func:`evaluation_grid`)."""
    exact = problem.exact(grid[:, 0], grid[:, 1])
    return jnp.linalg.norm(_predict(params, grid) - exact) / jnp.linalg.norm(exact)


# ----------------------------------------------------------------------------------------------
# Full-batch training at counted cost.


class TrainLog(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      params: the final parameters.
      state: the final optimizer state.
      cost: ``(m,)`` float cost (evaluation-equivalents: evaluations plus
        ``twophase.second_phase.HVP_COST`` per Hessian-vector product) at each logged point,
        0 first.
      loss: ``(m,)`` total loss at the logged points.
      terms: ``{name: (m,)}`` the loss terms at the logged points.
      phase: ``(m,)`` the stage at the logged points: 0 for a single transformation (1 for
        a bare second phase such as ``nonlinear_cg``), a two-phase optimizer's phase (0, 1),
        and for a chain of nested two-phase optimizers the index of the active stage
        (Adam 0, L-BFGS 1, Newton-CG 2).
      switch_cost: cost spent when a two-phase optimizer first left its first stage (``None``
        if it did not).
      steps: optimizer ``update`` calls made.
      wall_seconds: training time, compilation excluded.
      compile_seconds: compilation time of the training loop.
      evaluations: full-batch value-and-gradient evaluations counted in ``cost[-1]``.
      hessian_vector_products: Hessian-vector products counted in ``cost[-1]`` (each
        ``HVP_COST`` evaluations).
      zero_steps: per stage after the first (e.g. ``(l_bfgs, newton_cg)`` for a chain), the
        second phase's steps that made no progress as ``twophase.info(state)
        .zero_steps`` reports them; ``None`` where the state holds no such count
        (a single transformation, or a second phase that does not report one).
    """

    params: Params
    state: Any
    cost: np.ndarray
    loss: np.ndarray
    terms: dict[str, np.ndarray]
    phase: np.ndarray
    switch_cost: float | None
    steps: int
    wall_seconds: float
    compile_seconds: float
    evaluations: int = 0
    hessian_vector_products: int = 0
    zero_steps: tuple[int | None, ...] | None = None


def _kind(state: Any) -> str:
    try:
        diagnostics = tp.info(state)
    except ValueError:
        diagnostics = None
    if diagnostics is not None and diagnostics.phase is not None:
        return "two_phase"
    if diagnostics is not None:
        return "cg"
    zoom = [
        n
        for n in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, optax.ScaleByZoomLinesearchState)
        )
        if isinstance(n, optax.ScaleByZoomLinesearchState)
    ]
    return "lbfgs" if zoom else "first_order"


def _zoom_evals(state: Any) -> jax.Array:
    kind = optax.ScaleByZoomLinesearchState
    found = [
        n.info.num_linesearch_steps
        for n in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
        if isinstance(n, kind)
    ]
    return sum((jnp.asarray(n, jnp.int32) for n in found), jnp.zeros([], jnp.int32))


def _outer_two_phase(state: Any) -> tp.TwoPhaseState | None:
    """The outermost :class:`twophase.TwoPhaseState` in ``state`` (``None`` if none)."""
    found = [
        n
        for n in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, tp.TwoPhaseState))
        if isinstance(n, tp.TwoPhaseState)
    ]
    return found[0] if found else None


def _two_phase_chain(state: Any) -> list[tp.TwoPhaseState]:
    """The two-phase states of a chain, outermost first: ``two_phase(two_phase(a, b), c)``
    gives the outer state, then the inner one (found in the outer's ``first_state``)."""
    chain = []
    node = _outer_two_phase(state)
    while node is not None:
        chain.append(node)
        node = _outer_two_phase(node.first_state)
    return chain


def _stage(chain: list[tp.TwoPhaseState]) -> jax.Array:
    """int32 index of the active stage of a chain: the innermost first transformation is
    stage 0, the innermost second 1, the next outer second 2, and so on."""
    stage = jnp.zeros([], jnp.int32)
    for depth, node in enumerate(reversed(chain)):  # innermost first; an outer phase 1 wins
        stage = jnp.where(node.phase == 1, depth + 1, stage)
    return stage


def _chain_counts(chain: list[tp.TwoPhaseState]) -> tuple[jax.Array, jax.Array]:
    """int32 (evaluations, Hessian-vector products) of every second phase (and exact-norm
    detector) of a chain, as ``twophase.info`` reports them for each two-phase state."""
    evals, hvps = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)
    for node in chain:
        diagnostics = tp.info(node)
        evals = evals + jnp.asarray(diagnostics.value_and_grad_evals, jnp.int32)
        if diagnostics.hessian_vector_products is not None:
            hvps = hvps + jnp.asarray(diagnostics.hessian_vector_products, jnp.int32)
    return evals, hvps


def _counts(state: Any, kind: str) -> tuple[jax.Array, jax.Array]:
    """int32 (evaluations, HVPs) that a second phase's state has made so far."""
    if kind == "two_phase":
        return _chain_counts(_two_phase_chain(state))
    diagnostics = tp.info(state)
    hvps = diagnostics.hessian_vector_products
    return (
        jnp.asarray(diagnostics.value_and_grad_evals, jnp.int32),
        jnp.zeros([], jnp.int32) if hvps is None else jnp.asarray(hvps, jnp.int32),
    )


def _zero_steps(state: Any, kind: str) -> tuple[int | None, ...] | None:
    """Zero steps (line searches that found no decrease, ``tp.info(...).zero_steps``:
    over all trials of a two-phase state) of each second phase of a chain,
    innermost first."""
    if kind == "two_phase":
        chain = _two_phase_chain(state)[::-1]
    elif kind == "cg":
        chain = [state]
    else:
        return None
    found = []
    for node in chain:
        value = tp.info(node).zero_steps
        found.append(None if value is None else int(value))
    return tuple(found)


def _step_fn(value_fn: Callable[[Params], jax.Array], optimizer, kind: str):
    """``(params, state) -> (params, state, evals, hvps, stage_after)`` for one optimizer
    step: the evaluations and Hessian-vector products it made (int32)."""
    optimizer = optax.with_extra_args_support(optimizer)
    value_and_grad = jax.value_and_grad(value_fn)
    izero, ione = jnp.zeros([], jnp.int32), jnp.ones([], jnp.int32)

    def step(params, state):
        if kind == "first_order":
            value, grad = value_and_grad(params)
            updates, new_state = optimizer.update(
                grad, state, params, value=value, value_fn=value_fn
            )
            evals, hvps, stage = ione, izero, izero
        elif kind == "lbfgs":
            stored = optax.tree.get(state, "value")
            cached = jnp.isfinite(stored)
            value, grad = optax.value_and_grad_from_state(value_fn)(params, state=state)
            updates, new_state = optimizer.update(
                grad, state, params, value=value, grad=grad, value_fn=value_fn
            )
            evals, hvps, stage = (~cached).astype(jnp.int32) + _zoom_evals(new_state), izero, izero
        else:
            # The incoming gradient is needed only while the innermost first stage runs
            # (a two-phase chain's stage 0); later stages evaluate value_fn themselves.
            if kind == "two_phase":
                needs_grad = _stage(_two_phase_chain(state)) == 0
            else:
                needs_grad = jnp.zeros([], bool)
            value, grad = lax.cond(
                needs_grad,
                value_and_grad,
                lambda p: (
                    jnp.zeros([], jnp.result_type(*jax.tree.leaves(p))),
                    optax.tree.zeros_like(p),
                ),
                params,
            )
            updates, new_state = optimizer.update(
                grad, state, params, value=value, value_fn=value_fn
            )
            (evals_before, hvps_before), (evals_after, hvps_after) = (
                _counts(state, kind),
                _counts(new_state, kind),
            )
            evals = needs_grad.astype(jnp.int32) + evals_after - evals_before
            hvps = hvps_after - hvps_before
            if kind == "two_phase":
                stage = _stage(_two_phase_chain(new_state))
            else:
                stage = ione
        return optax.apply_updates(params, updates), new_state, evals, hvps, stage

    return step


def train(
    loss_fn: Callable[[Params], tuple[jax.Array, Mapping[str, jax.Array]]],
    params: Params,
    optimizer: optax.GradientTransformation | Callable[[Any], optax.GradientTransformation],
    *,
    budget: float,
    log_points: int = 50,
    hyperparams: Any = None,
    value_fn: Callable[[Params], jax.Array] | None = None,
) -> TrainLog:
    """Full-batch training of ``params`` at a strict budget of ``budget`` evaluations.

    Cost is counted in evaluation-equivalents: one full-batch value-and-gradient evaluation
    counts 1, one Hessian-vector product ``twophase.HVP_COST`` (1.5). Every step gets the
    full-batch gradient: a first-order transformation (``optax.adam``) ``update(grad, state,
    params, value=, value_fn=)`` at one evaluation per step; a :func:`twophase.two_phase`
    optimizer (``adam_cg``, ``adam_lbfgs``, ``adam_newton_cg``) the same in phase 0 and zero
    updates in phase 1, where it evaluates ``value_fn`` itself and the increase of its counts
    (``twophase.info(state).value_and_grad_evals`` and ``.hessian_vector_products``) is
    charged; a bare second phase (``nonlinear_cg``, ``newton_cg``) likewise. A chain of
    two-phase optimizers nested through their first transformation (``two_phase(two_phase(
    adam, lbfgs, d1), newton_cg(), d2)``) is charged the counts of every level and gets the
    incoming gradient only while its innermost first stage runs. ``optax.lbfgs`` gets
    ``value``/``grad`` from ``optax.value_and_grad_from_state`` and is charged one evaluation
    when that is not cached plus its line-search steps. A step that would take the cost above
    ``budget`` is discarded and training stops, so the final cost never exceeds it (a
    Newton-CG step of 100 products costs 150 or more: near the end of the budget it is the
    one discarded). The run also stops after ``4 * budget`` steps (steps that evaluate
    nothing, e.g. at a stationary point).

    The loop runs in a compiled ``lax.while_loop`` in ``log_points`` chunks of about equal
    cost; after each, the loss terms are measured (not counted).

    **Sweeps without recompiling**: with ``hyperparams`` (a pytree of numbers), ``optimizer``
    is a function ``hyperparams -> transformation``, called with traced hyperparameters inside
    the compiled loop (e.g. ``lambda h: twophase.adam_cg(h["lr"],
    policy=twophase.switch_at(h["switch"]))``). Compiled loops are cached per ``loss_fn``,
    ``optimizer`` (by identity) and shapes, so runs that differ only in ``hyperparams`` or
    ``budget`` compile once.

    Args:
      loss_fn: ``params -> (total, terms)``, e.g. :func:`make_loss`'s.
      params: initial parameters.
      optimizer: an optax transformation (see above), or with ``hyperparams`` a function
        returning one.
      budget: evaluation-equivalents allowed, a finite number ``>= 1``.
      log_points: how many times to log along the way (plus the start).
      hyperparams: ``None``, or the arguments of ``optimizer``.
      value_fn: the objective the optimizer is given (``params -> scalar``), the same
        function as ``loss_fn``'s total in another form, e.g. :func:`make_gauss_newton_loss`
        for ``newton_cg(curvature="gauss_newton")``; ``None``: ``loss_fn``'s total.

    Returns:
      A :class:`TrainLog`.
    """
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float, np.integer, np.floating))
        or not math.isfinite(budget)
        or budget < 1
    ):
        raise ValueError(f"`budget` must be a finite number >= 1, got {budget!r}.")
    if isinstance(log_points, bool) or not isinstance(log_points, int) or log_points < 1:
        raise ValueError(f"`log_points` must be a positive int, got {log_points!r}.")
    if hyperparams is None:
        make, hyperparams = (lambda _: optimizer), {}
    elif not callable(optimizer):
        raise ValueError("with `hyperparams`, `optimizer` must be a function returning one.")
    else:
        make = optimizer
    hyperparams = jax.tree.map(jnp.asarray, hyperparams)
    state = optax.with_extra_args_support(make(hyperparams)).init(params)
    kind = _kind(state)
    zero, fzero = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32)
    carry = _Carry(
        params, state, zero, zero, zero, jnp.zeros([], bool), jnp.full([], -1.0, jnp.float32)
    )
    args = (carry, fzero, fzero, hyperparams)
    if value_fn is not None and not callable(value_fn):
        raise ValueError(f"`value_fn` must be callable or None, got {value_fn!r}.")
    key = (loss_fn, value_fn, optimizer, kind, _signature(args))
    compile_seconds = 0.0
    if key not in _COMPILED:
        started = time.perf_counter()
        advance = _advance_fn(loss_fn, make, kind, value_fn)
        _COMPILED[key] = jax.jit(advance).lower(*args).compile()
        compile_seconds = time.perf_counter() - started
    compiled = _COMPILED[key]
    measure = jax.jit(loss_fn)

    log: dict[str, Any] = {"cost": [0.0], "loss": [], "terms": {}, "phase": []}

    def record(params, phase):
        total, terms = jax.device_get(measure(params))
        log["loss"].append(float(total))
        for name, value in terms.items():
            log["terms"].setdefault(name, []).append(float(value))
        log["phase"].append(phase)

    record(params, 0)
    wall = 0.0
    budget_arg = jnp.asarray(budget, jnp.float32)
    targets = np.unique(np.linspace(0, float(budget), log_points + 1)[1:])
    for target in targets:
        started = time.perf_counter()
        carry = compiled(carry, jnp.asarray(target, jnp.float32), budget_arg, hyperparams)
        jax.block_until_ready(carry)
        wall += time.perf_counter() - started
        if kind == "two_phase":
            phase = int(_stage(_two_phase_chain(carry.state)))
        else:
            phase = int(kind == "cg")
        log["cost"].append(float(_cost(carry.evals, carry.hvps)))
        record(carry.params, phase)
        if bool(carry.done) or int(carry.steps) >= 4 * budget:
            break
    switch = float(carry.switch_cost)
    return TrainLog(
        params=carry.params,
        state=carry.state,
        cost=np.asarray(log["cost"]),
        loss=np.asarray(log["loss"]),
        terms={k: np.asarray(v) for k, v in log["terms"].items()},
        phase=np.asarray(log["phase"]),
        switch_cost=None if switch < 0 else switch,
        steps=int(carry.steps),
        wall_seconds=wall,
        compile_seconds=compile_seconds,
        evaluations=int(carry.evals),
        hessian_vector_products=int(carry.hvps),
        zero_steps=_zero_steps(carry.state, kind),
    )


class _Carry(NamedTuple):
    """The training loop's carry: ``evals`` and ``hvps`` (int32) are the cost so far,
    ``done`` says a step was discarded at the budget, ``switch_cost`` (float32) is the cost
    when the first stage was left (-1 before)."""

    params: Params
    state: Any
    evals: jax.Array
    hvps: jax.Array
    steps: jax.Array
    done: jax.Array
    switch_cost: jax.Array


def _cost(evals: jax.Array, hvps: jax.Array) -> jax.Array:
    """float32 evaluation-equivalents; exact (``HVP_COST`` = 1.5 is a binary fraction) up to
    2**23 evaluations."""
    return jnp.asarray(evals, jnp.float32) + tp.HVP_COST * jnp.asarray(hvps, jnp.float32)


_COMPILED: dict[Any, Any] = {}
"""Compiled training loops of :func:`train`, by (loss_fn, optimizer, kind, argument shapes)."""


def _signature(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def _advance_fn(loss_fn, make, kind: str, value_fn=None):
    """``(carry, target, budget, hyperparams) -> carry``: steps until the cost reaches
    ``target``, a step would exceed ``budget`` (discarded; ``done``) or ``4 * budget`` steps."""
    if value_fn is None:
        value_fn = lambda p: loss_fn(p)[0]

    def advance(carry, target, budget, hyperparams):
        step = _step_fn(value_fn, make(hyperparams), kind)

        def cond(c):
            return (_cost(c.evals, c.hvps) < target) & ~c.done & (c.steps < 4 * budget)

        def body(c):
            new_params, new_state, step_evals, step_hvps, stage = step(c.params, c.state)
            evals, hvps = c.evals + step_evals, c.hvps + step_hvps
            new_cost = _cost(evals, hvps)
            keep = new_cost <= budget
            switched = keep & (stage >= 1) & (c.switch_cost < 0) & (kind == "two_phase")
            params, state = optax.tree.where(keep, (new_params, new_state), (c.params, c.state))
            return _Carry(
                params,
                state,
                jnp.where(keep, evals, c.evals),
                jnp.where(keep, hvps, c.hvps),
                c.steps + keep.astype(jnp.int32),
                ~keep,
                jnp.where(switched, new_cost, c.switch_cost),
            )

        return lax.while_loop(cond, body, carry)

    return advance
