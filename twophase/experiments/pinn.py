"""Physics-informed neural networks: seven problems with exact solutions, their loss in residual
form, and a full-batch training loop with equal-cost accounting.

Problems (:data:`PROBLEM_NAMES`; ``u`` the network output). The first three are the
failure-mode problems of Krishnapriyan et al., "Characterizing possible failure modes in
physics-informed neural networks" (NeurIPS 2021), as set up by Rathore et al., "Challenges in
Training PINNs: A Loss Landscape Perspective" (ICML 2024) (:data:`ANCHOR_PROBLEMS`):

- ``convection``: ``u_t + beta u_x = 0`` (beta = 40), x in [0, 2 pi], t in [0, 1],
  ``u(x, 0) = sin x``, periodic in x; exact ``sin(x - beta t)``.
- ``reaction``: ``u_t - rho u (1 - u) = 0`` (rho = 5), x in [0, 2 pi],
  ``u(x, 0) = h(x) = exp(-(x - pi)^2 / (2 (pi / 4)^2))``, periodic; exact
  ``h e^{rho t} / (h e^{rho t} + 1 - h)``.
- ``wave``: ``u_tt - 4 u_xx = 0`` (beta = 5), x in [0, 1],
  ``u(x, 0) = sin(pi x) + sin(beta pi x) / 2``, ``u_t(x, 0) = 0``, ``u(0, t) = u(1, t) = 0``;
  exact ``sin(pi x) cos(2 pi t) + sin(beta pi x) cos(2 beta pi t) / 2``.
- ``burgers``: viscous Burgers ``u_t + u u_x - nu u_xx = 0`` (nu = 0.04), x in [-1, 1], t in
  [0, 1], Dirichlet data from the exact solution: two viscous shocks (states 1 | 0 | -1,
  starting at x = -0.4 and 0.4) that merge at t = 0.8. Exact by the Cole-Hopf transform
  ``u = -2 nu phi_x / phi`` of the heat-equation solution
  ``phi = sum_i exp(-a_i (x - b_i) / (2 nu) + a_i^2 t / (4 nu))`` (Whitham, "Linear and
  Nonlinear Waves", 1974, section 4.4), i.e. ``u = sum_i a_i softmax(theta)_i``.
- ``allen_cahn``: ``u_t - d u_xx + 5 (u^3 - u) = f`` (d = 1e-3), x in [-1, 1], t in [0, 1],
  from the standard initial data ``x^2 cos(pi x)`` (Raissi et al., J. Comput. Phys. 2019),
  Dirichlet data; a manufactured source ``f`` (the operator applied to the exact solution by
  autodiff) makes ``u = e^{-t} x^2 cos(pi x)`` exact.
- ``helmholtz``: 2-D Helmholtz ``u_xx + u_yy + k^2 u = q`` (k = 1) on [-1, 1]^2, ``u = 0`` on
  the four edges, manufactured ``q`` for the exact ``u = sin(pi x) sin(a pi y)`` (a = 4; the
  benchmark of Wang, Teng and Perdikaris, SIAM J. Sci. Comput. 2021). A steady problem: the
  second coordinate is y, there is no initial condition, and the boundary term holds all four
  edges.
- ``oscillator``: an ODE system, the damped oscillator ``y1' = w y2``,
  ``y2' = -w y1 - 2 zeta w y2`` (w = 10, zeta = 0.1) for t in [0, 1], ``y(0) = (1, 0)``: the
  network maps t to ``(y1, y2)`` (``y2`` is the velocity over w). Exact
  ``y1 = e^{-zeta w t} (cos(w_d t) + zeta w / w_d sin(w_d t))``,
  ``y2 = -(w / w_d) e^{-zeta w t} sin(w_d t)``, ``w_d = w sqrt(1 - zeta^2)``.

The loss is the sum of mean squared terms (:func:`loss_terms`): the equation's residual at
interior points, the initial condition (and, for ``wave``, the initial velocity), and the
boundary condition (periodic: ``u(x_min, t) - u(x_max, t)``; Dirichlet: ``u`` minus the exact
solution there). Every derivative comes from JAX transforms (``jax.grad``, ``jax.hessian``,
``jax.jvp``); nothing is derived by hand.

**Residual form.** Each term is a vector of per-point residuals. :func:`pointwise_terms`
gives every term as a :class:`PointwiseTerm`: ``fn(params, datum) -> (k,)`` at ONE point (its
datum a slice of ``data`` along axis 0), so that a Jacobian can be built row by row under
``jax.vmap`` (reverse mode per point: ``jax.vmap(jax.jacrev(term.fn), (None, 0))``), and a
``scale`` ``sqrt(2 / size)`` that makes the term's mean square a half sum of squares.
:func:`pointwise_jacobian` builds that scaled ``(N, P)`` Jacobian of all terms;
:func:`make_gauss_newton_loss` is the same residuals as a
:func:`twophase.gauss_newton_objective` (``reduction="half_sum"``), the ``value_fn`` of
Gauss-Newton second phases.

The network (:func:`init_mlp`, :func:`network`) is a tanh MLP with Xavier-normal weights and
zero biases, a plain pytree: ``(x, t) -> u`` (``(x, y)`` for helmholtz, ``t -> (y1, y2)`` for
the ODE: ``init_mlp(..., n_inputs=problem.n_inputs, n_outputs=problem.n_outputs)``).
Everything is float64 by default (the functions take a ``dtype``); float64 needs
``jax.config.update("jax_enable_x64", True)``, which this module never sets itself.

:func:`train` runs any optax transformation on the full loss, counting cost in full-batch
value-and-gradient evaluations: a first-order step (Adam's, or a two-phase optimizer's phase 0)
costs one; a second phase costs what ``twophase.info(state).value_and_grad_evals`` says plus
``twophase.HVP_COST`` (1.5) per Hessian-vector product (``hessian_vector_products``);
``optax.lbfgs`` alone costs its evaluation at the current point when not cached plus its zoom
line search's steps, counted as :func:`twophase.two_phase` does.

This module depends on the core package, never the reverse.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree
from jax import lax

import twophase as tp

__all__ = [
    "ANCHOR_PROBLEMS",
    "PROBLEM_NAMES",
    "Collocation",
    "PointwiseTerm",
    "Problem",
    "TrainLog",
    "collocation",
    "equation_residual",
    "evaluation_grid",
    "grid_interior",
    "init_mlp",
    "loss_terms",
    "make_gauss_newton_loss",
    "make_loss",
    "make_problem",
    "mlp",
    "network",
    "pde_residual",
    "pointwise_jacobian",
    "pointwise_terms",
    "predict",
    "relative_l2_error",
    "residuals",
    "train",
]

Params = list  # [{"w": (fan_in, fan_out), "b": (fan_out,)}, ...]
ScalarFn = Callable[[jax.Array, jax.Array], jax.Array]  # u(x, t) for scalar x, t
PointFn = Callable[[jax.Array], jax.Array]  # u(z) -> (n_outputs,) at one point z (n_inputs,)


# ----------------------------------------------------------------------------------------------
# Problems.


class Problem(NamedTuple):
    """One PDE or ODE problem (:func:`make_problem` builds it).

    Attributes:
      name: one of :data:`PROBLEM_NAMES`.
      coefficient: the problem's main constant: beta (convection, wave), rho (reaction), the
        viscosity nu (burgers), the diffusion d (allen_cahn), the y frequency a (helmholtz),
        the angular frequency w (oscillator).
      x_range: ``(x_min, x_max)`` of the first coordinate (for a one-input problem, equal to
        ``t_range``).
      periodic: periodic boundary (``u(x_min, t) = u(x_max, t)``) or, if false, Dirichlet
        ``u = exact`` on the edges.
      initial_velocity: the problem has the extra initial condition ``u_t(x, 0) = 0``.
      t_range: ``(t_min, t_max)`` of the last coordinate (t, or y for a steady problem).
      n_inputs: 2 (``(x, t)`` or ``(x, y)``) or 1 (``t``: an ODE).
      n_outputs: components of ``u`` (1 for the PDEs).
      steady: the second coordinate is y: no initial condition, Dirichlet on four edges.
    """

    name: str
    coefficient: float
    x_range: tuple[float, float]
    periodic: bool
    initial_velocity: bool
    t_range: tuple[float, float] = (0.0, 1.0)
    n_inputs: int = 2
    n_outputs: int = 1
    steady: bool = False

    def solution(self, z: jax.Array) -> jax.Array:
        """The exact solution at points ``z`` of shape ``(..., n_inputs)``: shape
        ``(..., n_outputs)``."""
        z = jnp.asarray(z)
        return (
            _SPECS[self.name].solution(self.coefficient, z).reshape(*z.shape[:-1], self.n_outputs)
        )

    def exact(self, *coords: jax.Array) -> jax.Array:
        """The exact solution at ``(x, t)`` (or ``(x, y)``; ``t`` alone for an ODE), any
        broadcastable shapes: the broadcast shape (a trailing ``n_outputs`` axis if above 1)."""
        z = jnp.stack(jnp.broadcast_arrays(*map(jnp.asarray, coords)), axis=-1)
        u = self.solution(z)
        return u[..., 0] if self.n_outputs == 1 else u

    def initial(self, x: jax.Array) -> jax.Array:
        """The initial condition ``u(x, t_min)`` (for an ODE, ``x`` is ignored: ``y(t_min)``
        of shape ``(n_outputs,)``)."""
        if self.n_inputs == 1:
            return self.exact(jnp.asarray(self.t_range[0]))
        x = jnp.asarray(x)
        return self.exact(x, jnp.full_like(x, self.t_range[0]))


class _Spec(NamedTuple):
    """A problem's definition: ``solution(c, z)`` maps points ``(..., d)`` to ``(...)`` or
    ``(..., m)``; ``operator(c, u, z)`` is the equation's left side ``(k,)`` at one point for
    ``u: (d,) -> (m,)``; ``manufactured`` problems subtract the operator of the exact solution
    (the source term)."""

    coefficient: float
    x_range: tuple[float, float]
    t_range: tuple[float, float]
    periodic: bool
    initial_velocity: bool
    n_inputs: int
    n_outputs: int
    steady: bool
    solution: Callable[[float, jax.Array], jax.Array]
    operator: Callable[[float, PointFn, jax.Array], jax.Array]
    manufactured: bool = False


def _scalar(u: PointFn) -> Callable[[jax.Array], jax.Array]:
    return lambda z: u(z)[0]


def _second(u: PointFn, z: jax.Array, i: int) -> jax.Array:
    """``d^2 u / dz_i^2`` at ``z`` (forward over reverse along the i-th axis)."""
    e = jnp.zeros_like(z).at[i].set(1)
    return jax.jvp(jax.grad(_scalar(u)), (z,), (e,))[1][i]


def _convection_solution(c, z):
    return jnp.sin(z[..., 0] - c * z[..., 1])


def _convection_operator(c, u, z):
    g = jax.grad(_scalar(u))(z)
    return jnp.stack([g[1] + c * g[0]])


def _reaction_initial(x):
    return jnp.exp(-jnp.square(x - jnp.pi) / (2 * (jnp.pi / 4) ** 2))


def _reaction_solution(c, z):
    h = _reaction_initial(z[..., 0])
    e = h * jnp.exp(c * z[..., 1])
    return e / (e + 1 - h)


def _reaction_operator(c, u, z):
    value, g = jax.value_and_grad(_scalar(u))(z)
    return jnp.stack([g[1] - c * value * (1 - value)])


def _wave_solution(c, z):
    x, t = z[..., 0], z[..., 1]
    return jnp.sin(jnp.pi * x) * jnp.cos(2 * jnp.pi * t) + 0.5 * jnp.sin(c * jnp.pi * x) * jnp.cos(
        2 * c * jnp.pi * t
    )


def _wave_operator(c, u, z):
    return jnp.stack([_second(u, z, 1) - 4.0 * _second(u, z, 0)])


# Burgers' shocks: the states a_i (left to right) and offsets b_i of the Cole-Hopf exponentials.
_BURGERS_STATES = (1.0, 0.0, -1.0)
_BURGERS_OFFSETS = (-0.4, 0.0, 0.4)


def _burgers_solution(nu, z):
    x, t = z[..., 0:1], z[..., 1:2]
    a, b = jnp.asarray(_BURGERS_STATES, z.dtype), jnp.asarray(_BURGERS_OFFSETS, z.dtype)
    theta = -a * (x - b) / (2 * nu) + jnp.square(a) * t / (4 * nu)
    return jnp.sum(a * jax.nn.softmax(theta, axis=-1), axis=-1)


def _burgers_operator(nu, u, z):
    value, g = jax.value_and_grad(_scalar(u))(z)
    return jnp.stack([g[1] + value * g[0] - nu * _second(u, z, 0)])


def _allen_cahn_solution(d, z):
    x, t = z[..., 0], z[..., 1]
    return jnp.exp(-t) * jnp.square(x) * jnp.cos(jnp.pi * x)


def _allen_cahn_operator(d, u, z):
    value, g = jax.value_and_grad(_scalar(u))(z)
    return jnp.stack([g[1] - d * _second(u, z, 0) + 5.0 * (value**3 - value)])


HELMHOLTZ_K = 1.0


def _helmholtz_solution(a, z):
    return jnp.sin(jnp.pi * z[..., 0]) * jnp.sin(a * jnp.pi * z[..., 1])


def _helmholtz_operator(a, u, z):
    laplacian = _second(u, z, 0) + _second(u, z, 1)
    return jnp.stack([laplacian + HELMHOLTZ_K**2 * u(z)[0]])


OSCILLATOR_DAMPING = 0.1


def _oscillator_solution(w, z):
    t, zeta = z[..., 0], OSCILLATOR_DAMPING
    w_d = w * math.sqrt(1 - zeta**2)
    decay = jnp.exp(-zeta * w * t)
    y1 = decay * (jnp.cos(w_d * t) + zeta * w / w_d * jnp.sin(w_d * t))
    y2 = -(w / w_d) * decay * jnp.sin(w_d * t)
    return jnp.stack([y1, y2], axis=-1)


def _oscillator_operator(w, u, z):
    y, dy = jax.jvp(u, (z,), (jnp.ones_like(z),))
    rate = jnp.stack([w * y[1], -w * y[0] - 2 * OSCILLATOR_DAMPING * w * y[1]])
    return dy - rate


_UNIT = (-1.0, 1.0)
_TIME = (0.0, 1.0)
_SPECS: dict[str, _Spec] = {
    "convection": _Spec(
        40.0, (0.0, 2 * math.pi), _TIME, True, False, 2, 1, False, _convection_solution,
        _convection_operator,
    ),
    "reaction": _Spec(
        5.0, (0.0, 2 * math.pi), _TIME, True, False, 2, 1, False, _reaction_solution,
        _reaction_operator,
    ),
    "wave": _Spec(5.0, (0.0, 1.0), _TIME, False, True, 2, 1, False, _wave_solution, _wave_operator),
    "burgers": _Spec(
        0.04, _UNIT, _TIME, False, False, 2, 1, False, _burgers_solution, _burgers_operator
    ),
    "allen_cahn": _Spec(
        1e-3, _UNIT, _TIME, False, False, 2, 1, False, _allen_cahn_solution,
        _allen_cahn_operator, manufactured=True,
    ),
    "helmholtz": _Spec(
        4.0, _UNIT, _UNIT, False, False, 2, 1, True, _helmholtz_solution, _helmholtz_operator,
        manufactured=True,
    ),
    "oscillator": _Spec(
        10.0, _TIME, _TIME, False, False, 1, 2, False, _oscillator_solution, _oscillator_operator
    ),
}  # fmt: skip

PROBLEM_NAMES = tuple(_SPECS)
"""Every problem's name: the registry :func:`make_problem` reads."""
ANCHOR_PROBLEMS = ("convection", "reaction", "wave")
"""The problems of the published anchor (Rathore et al. 2024)."""


def make_problem(name: str, coefficient: float | None = None) -> Problem:
    """The problem ``name`` with its standard coefficient (the module docstring lists them)
    unless ``coefficient`` is given.

    Raises:
      ValueError: an unknown ``name`` (the message lists the choices), or a ``coefficient``
        that is not a finite number.
    """
    if name not in _SPECS:
        raise ValueError(f"Unknown problem {name!r}; valid choices: {', '.join(PROBLEM_NAMES)}.")
    spec = _SPECS[name]
    if coefficient is None:
        coefficient = spec.coefficient
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float, np.number)):
        raise ValueError(f"`coefficient` must be a number, got {coefficient!r}.")
    if not math.isfinite(coefficient):
        raise ValueError(f"`coefficient` must be finite, got {coefficient!r}.")
    return Problem(
        name=name,
        coefficient=float(coefficient),
        x_range=spec.x_range,
        periodic=spec.periodic,
        initial_velocity=spec.initial_velocity,
        t_range=spec.t_range,
        n_inputs=spec.n_inputs,
        n_outputs=spec.n_outputs,
        steady=spec.steady,
    )


def equation_residual(problem: Problem, u: PointFn, z: jax.Array) -> jax.Array:
    """The equation's residual ``(k,)`` of ``u`` at ONE point ``z`` of shape
    ``(n_inputs,)``, with derivatives from JAX: ``k`` is 1 for a PDE, ``n_outputs`` for the
    ODE. ``u`` maps such a point to ``(n_outputs,)`` (the network with its parameters bound,
    or :meth:`Problem.solution`). ``jax.vmap`` it over points.

    For a manufactured problem (allen_cahn, helmholtz) the source term is the operator
    applied to the exact solution at ``z``, by the same autodiff.
    """
    spec = _SPECS[problem.name]
    c = problem.coefficient
    found = spec.operator(c, u, z)
    if spec.manufactured:
        found = found - spec.operator(c, problem.solution, z)
    return found


def pde_residual(problem: Problem, u: ScalarFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """The PDE residual of ``u`` at the scalar point ``(x, t)`` (``(x, y)`` for a steady
    problem), with derivatives from JAX: :func:`equation_residual` for a two-input,
    one-output ``u(x, t)`` (the network with its parameters bound, or an exact solution).

    Raises:
      ValueError: a problem that is not a two-input PDE (the ODE: use
        :func:`equation_residual`).
    """
    if problem.n_inputs != 2 or problem.n_outputs != 1:
        raise ValueError(
            f"`pde_residual` takes a two-input PDE; {problem.name!r} has {problem.n_inputs} "
            "input(s): use `equation_residual`."
        )
    point_fn = lambda z: jnp.reshape(u(z[0], z[1]), (1,))
    return equation_residual(problem, point_fn, jnp.stack([x, t]))[0]


# ----------------------------------------------------------------------------------------------
# Points.


class Collocation(NamedTuple):
    """Training points, each array of shape ``(n, n_inputs)`` holding ``(x, t)`` rows (``(x,
    y)`` for a steady problem, ``(t,)`` for an ODE).

    Attributes:
      residual: interior points, where the equation's residual is penalised.
      initial: points along ``t = t_min`` (none, ``(0, 2)``, for a steady problem; the one
        point ``t_min`` for an ODE).
      initial_values: ``(n_initial,)`` (``(n_initial, n_outputs)`` for an ODE), the initial
        condition at ``initial``.
      boundary_lower: points along ``x = x_min`` (and, for a steady problem, along
        ``y = y_min``); none, ``(0, 1)``, for an ODE.
      boundary_upper: points along ``x = x_max`` (and ``y = y_max``), as many as
        ``boundary_lower`` (a periodic boundary compares them pairwise).
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
    """The grid's axes: x and t (or y); an ODE's one axis (first) has ``n_x * n_t`` times."""
    for name, n in (("n_x", n_x), ("n_t", n_t)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 3:
            raise ValueError(f"`{name}` must be an int >= 3, got {n!r}.")
    if problem.n_inputs == 1:
        return np.linspace(*problem.t_range, n_x * n_t), np.zeros(0)
    return np.linspace(*problem.x_range, n_x), np.linspace(*problem.t_range, n_t)


def _grid(problem: Problem, xs: np.ndarray, ts: np.ndarray) -> np.ndarray:
    if problem.n_inputs == 1:
        return xs[:, None]
    xx, tt = np.meshgrid(xs, ts, indexing="ij")
    return np.stack([xx.ravel(), tt.ravel()], axis=1)


def evaluation_grid(
    problem: Problem, n_x: int = 101, n_t: int = 101, *, dtype: Any = jnp.float64
) -> jax.Array:
    """The regular ``n_x``-by-``n_t`` grid over the domain (edges included), as ``(n_x * n_t,
    2)`` rows ``(x, t)``, x varying slowest (for an ODE, ``(n_x * n_t, 1)`` equally spaced
    times): where the relative L2 error is measured."""
    dtype = _float_dtype(dtype)
    return jnp.asarray(_grid(problem, *_grid_axes(problem, n_x, n_t)), dtype)


def grid_interior(problem: Problem, grid: jax.Array) -> np.ndarray:
    """Boolean mask of the rows of ``grid`` strictly inside the domain."""
    grid = np.asarray(grid)
    ranges = [problem.t_range] if problem.n_inputs == 1 else [problem.x_range, problem.t_range]
    inside = np.ones(len(grid), bool)
    for axis, (low, high) in enumerate(ranges):
        inside &= (grid[:, axis] > low) & (grid[:, axis] < high)
    return inside


def _edges(problem: Problem, xs: np.ndarray, ts: np.ndarray):
    """(initial points, lower boundary, upper boundary) as numpy ``(n, d)`` arrays."""
    if problem.n_inputs == 1:
        return xs[:1, None], np.zeros((0, 1)), np.zeros((0, 1))
    pair = lambda a, b: np.stack(np.broadcast_arrays(a, b), axis=1)
    lower, upper = pair(xs[0], ts), pair(xs[-1], ts)
    if problem.steady:  # the y edges join the boundary; no initial condition
        lower = np.concatenate([lower, pair(xs, ts[0])])
        upper = np.concatenate([upper, pair(xs, ts[-1])])
        return np.zeros((0, 2)), lower, upper
    return pair(xs, ts[0]), lower, upper


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
    (``(n_x - 2) * (n_t - 2)`` points, or ``n_x * n_t - 2`` times for an ODE, seeded by
    ``seed``); the initial points are the ``n_x`` grid points at ``t = t_min`` (one for an
    ODE, none for a steady problem); the boundary points are the grid points along each x
    edge (and, for a steady problem, each y edge).

    Raises:
      ValueError: ``n_x`` or ``n_t`` below 3; ``n_residual`` not in ``[1, interior size]``;
        a ``dtype`` other than float32/float64, or float64 without x64 enabled.
    """
    dtype = _float_dtype(dtype)
    xs, ts = _grid_axes(problem, n_x, n_t)
    full = _grid(problem, xs, ts)
    inner = full[grid_interior(problem, full)]
    if (
        isinstance(n_residual, bool)
        or not isinstance(n_residual, (int, np.integer))
        or not 1 <= n_residual <= len(inner)
    ):
        raise ValueError(
            f"`n_residual` must be an int in [1, {len(inner)}] (the interior of the {n_x}x{n_t} "
            f"grid), got {n_residual!r}."
        )
    picked = np.random.default_rng(seed).choice(len(inner), n_residual, replace=False)
    initial, lower, upper = _edges(problem, xs, ts)
    as_array = lambda a: jnp.asarray(a, dtype)
    values = problem.solution(as_array(initial))
    return Collocation(
        residual=as_array(inner[np.sort(picked)]),
        initial=as_array(initial),
        initial_values=values[:, 0] if problem.n_outputs == 1 else values,
        boundary_lower=as_array(lower),
        boundary_upper=as_array(upper),
    )


def _check_points(points: Collocation, problem: Problem) -> None:
    """ValueError naming the arrays whose shapes do not fit together or the problem."""
    d = problem.n_inputs
    may_be_empty = {"initial": problem.steady, "boundary_lower": d == 1, "boundary_upper": d == 1}
    for field in ("residual", "initial", "boundary_lower", "boundary_upper"):
        shape = jnp.shape(getattr(points, field))
        least = 0 if may_be_empty.get(field) else 1
        if len(shape) != 2 or shape[1] != d or shape[0] < least:
            raise ValueError(
                f"`{field}` must have shape (n, {d}) with n >= {least} for {problem.name!r}, "
                f"got {shape}."
            )
    n_initial, n_values = jnp.shape(points.initial)[0], jnp.shape(points.initial_values)
    expected = (n_initial,) if problem.n_outputs == 1 else (n_initial, problem.n_outputs)
    if n_values != expected:
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
    key: jax.Array,
    widths: Sequence[int] = (50, 50, 50),
    *,
    dtype: Any = jnp.float64,
    n_inputs: int = 2,
    n_outputs: int = 1,
) -> Params:
    """A tanh MLP from ``n_inputs`` to ``n_outputs`` with hidden layers ``widths``:
    Xavier-normal weights (``N(0, 2 / (fan_in + fan_out))``) and zero biases, as
    ``[{"w", "b"}, ...]``. A problem's network: ``n_inputs=problem.n_inputs,
    n_outputs=problem.n_outputs``.

    Raises:
      ValueError: an empty ``widths`` or a width below 1; ``n_inputs`` or ``n_outputs``
        below 1; a bad ``dtype``.
    """
    dtype = _float_dtype(dtype)
    widths = tuple(widths)
    if not widths or any(
        isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in widths
    ):
        raise ValueError(f"`widths` must be a non-empty sequence of positive ints, got {widths}.")
    for name, n in (("n_inputs", n_inputs), ("n_outputs", n_outputs)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"`{name}` must be a positive int, got {n!r}.")
    sizes = (n_inputs, *widths, n_outputs)
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (m, n), dtype) * math.sqrt(2.0 / (m + n)),
            "b": jnp.zeros(n, dtype),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def network(params: Params, z: jax.Array) -> jax.Array:
    """The network at ONE point ``z`` of shape ``(n_inputs,)``: ``(n_outputs,)``."""
    h = z
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def mlp(params: Params, x: jax.Array, t: jax.Array) -> jax.Array:
    """The two-input, one-output network at one point: scalars ``x``, ``t`` -> scalar."""
    return network(params, jnp.stack([x, t]))[0]


def predict(params: Params, points: jax.Array) -> jax.Array:
    """The network at ``(n, n_inputs)`` points: ``(n, n_outputs)``."""
    return jax.vmap(lambda z: network(params, z))(points)


# ----------------------------------------------------------------------------------------------
# Loss in residual form, and error.


class PointwiseTerm(NamedTuple):
    """One loss term as per-point residuals (what a Levenberg-Marquardt Jacobian is built from).

    The term's residual vector is ``jax.vmap(fn, (None, 0))(params, data).reshape(-1)``, of
    ``size`` entries; the loss term is its mean square, i.e. ``0.5 * sum((scale * r)**2)``.

    Attributes:
      fn: ``(params, datum) -> (k,)``, the residual entries at ONE point, ``datum`` being the
        slices of ``data`` along axis 0 (a point ``(n_inputs,)``, or a pair such as
        ``(point, target)``).
      data: a pytree of arrays with a common leading axis ``n`` (the points).
      size: ``n * k``, the entries of the residual vector.
      scale: ``sqrt(2 / size)``.
    """

    fn: Callable[[Params, Any], jax.Array]
    data: Any
    size: int
    scale: float


def _term(fn, data, k: int) -> PointwiseTerm:
    n = jax.tree.leaves(data)[0].shape[0]
    return PointwiseTerm(fn, data, n * k, math.sqrt(2.0 / max(n * k, 1)))


def _boundary_term(problem: Problem, points: Collocation) -> PointwiseTerm:
    m = problem.n_outputs
    if problem.periodic:
        fn = lambda p, pair: network(p, pair[0]) - network(p, pair[1])
        return _term(fn, (points.boundary_lower, points.boundary_upper), m)
    edges = jnp.concatenate([points.boundary_lower, points.boundary_upper])
    fn = lambda p, datum: network(p, datum[0]) - datum[1]
    return _term(fn, (edges, problem.solution(edges)), m)


def pointwise_terms(problem: Problem, points: Collocation) -> dict[str, PointwiseTerm]:
    """The loss's terms as :class:`PointwiseTerm` records: ``"residual"`` (the equation at
    ``points.residual``), ``"initial"`` (none for a steady problem), ``"boundary"`` (none for
    an ODE) and, for wave, ``"initial_velocity"`` (``u_t`` at the initial points).

    For a Jacobian one row per residual entry, per point by reverse mode under ``vmap``:
    ``jax.vmap(jax.jacrev(term.fn), (None, 0))(params, term.data)`` (see
    :func:`pointwise_jacobian`).

    Raises:
      ValueError: collocation arrays of mismatched sizes (the message names them).
    """
    _check_points(points, problem)
    m = problem.n_outputs
    k = m if problem.n_inputs == 1 else 1
    equation = lambda p, z: equation_residual(problem, lambda y: network(p, y), z)
    terms = {"residual": _term(equation, points.residual, k)}
    if not problem.steady:
        values = jnp.reshape(points.initial_values, (-1, m))
        initial = lambda p, datum: network(p, datum[0]) - datum[1]
        terms["initial"] = _term(initial, (points.initial, values), m)
    if problem.n_inputs == 2:
        terms["boundary"] = _boundary_term(problem, points)
    if problem.initial_velocity:
        velocity = lambda p, z: jax.jvp(
            lambda y: network(p, y), (z,), (jnp.eye(2, dtype=z.dtype)[1],)
        )[1]
        terms["initial_velocity"] = _term(velocity, points.initial, m)
    return terms


def _term_residuals(params: Params, term: PointwiseTerm) -> jax.Array:
    return jax.vmap(term.fn, (None, 0))(params, term.data).reshape(-1)


def residuals(params: Params, problem: Problem, points: Collocation) -> dict[str, jax.Array]:
    """The residual vectors whose mean squares are :func:`loss_terms`' terms (the names of
    :func:`pointwise_terms`), each a 1-d array.

    Raises:
      ValueError: collocation arrays of mismatched sizes (the message names them).
    """
    return {
        name: _term_residuals(params, term)
        for name, term in pointwise_terms(problem, points).items()
    }


def loss_terms(
    params: Params, problem: Problem, points: Collocation
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The PINN loss and its terms, each a mean of squares.

    Returns:
      ``(total, terms)``: ``terms`` maps the names of :func:`pointwise_terms` to scalars;
      ``total`` is their sum.

    Raises:
      ValueError: collocation arrays of mismatched sizes (the message names them).
    """
    terms = {
        name: jnp.mean(jnp.square(r)) for name, r in residuals(params, problem, points).items()
    }
    return sum(terms.values()), terms


def pointwise_jacobian(params: Params, terms: Mapping[str, PointwiseTerm]) -> jax.Array:
    """The ``(N, P)`` Jacobian of every term's scaled residuals (``scale * r``, in the order
    of ``terms``) with respect to the flattened ``params`` (``jax.flatten_util.ravel_pytree``
    order), one row per entry: reverse mode per point under ``jax.vmap``. ``J^T J`` is the
    Gauss-Newton matrix of the loss's half-sum form; ``N`` is the sum of the terms' sizes.
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    blocks = []
    for term in terms.values():
        point_fn = lambda f, datum, fn=term.fn: fn(unravel(f), datum)
        rows = jax.vmap(jax.jacrev(point_fn), (None, 0))(flat, term.data)
        blocks.append(term.scale * rows.reshape(-1, flat.shape[0]))
    return jnp.concatenate(blocks)


def make_gauss_newton_loss(problem: Problem, points: Collocation) -> tp.GaussNewtonObjective:
    """The total loss of :func:`loss_terms` in residual form, per residual point
    (:func:`twophase.pointwise_residuals`, each term's mean square): the ``value_fn`` for
    ``twophase.newton_cg(curvature="gauss_newton")`` (Gauss-Newton products ``J^T J v``) and
    for :func:`twophase.levenberg_marquardt` (per-point Jacobians). Its residuals are those
    of :func:`pointwise_terms`."""
    terms = pointwise_terms(problem, points)
    return tp.pointwise_residuals(
        {name: (term.fn, term.data) for name, term in terms.items()}, reduction="term_means"
    )


def make_loss(
    problem: Problem, points: Collocation
) -> Callable[[Params], tuple[jax.Array, dict[str, jax.Array]]]:
    """``params -> (total, terms)``: :func:`loss_terms` with the problem and points bound
    (checked here, once). ``lambda p: fn(p)[0]`` is the ``value_fn`` an optimizer needs."""
    _check_points(points, problem)
    return lambda params: loss_terms(params, problem, points)


def relative_l2_error(params: Params, problem: Problem, grid: jax.Array) -> jax.Array:
    """``||u_net - u_exact||_2 / ||u_exact||_2`` over the ``(n, n_inputs)`` points ``grid``
    (e.g. :func:`evaluation_grid`; all output components together)."""
    exact = problem.solution(grid)
    return jnp.linalg.norm(predict(params, grid) - exact) / jnp.linalg.norm(exact)


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
      other_cost: evaluation-equivalents counted in ``cost[-1]`` beyond the evaluations and
        HVPs: what a second phase's ``twophase.info(state).cost`` reports beyond them (e.g.
        a Levenberg-Marquardt phase's Jacobians); 0 for the others.
      wall: ``(m,)`` training wall time (compilation excluded) at the logged points, 0 first.
      error: ``(m,)`` ``error_fn`` at the logged points, or ``None`` without one.
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
    other_cost: float = 0.0
    wall: np.ndarray | None = None
    error: np.ndarray | None = None


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


def _info_counts(diagnostics: tp.Info) -> tuple[jax.Array, jax.Array, jax.Array]:
    """int32 evaluations, int32 HVPs and float32 other cost of one ``tp.info`` record: the
    other cost is what ``diagnostics.cost`` (evaluation-equivalents) holds beyond the
    evaluations and ``HVP_COST`` per HVP, e.g. a Levenberg-Marquardt phase's Jacobians."""
    evals = diagnostics.value_and_grad_evals
    evals = jnp.zeros([], jnp.int32) if evals is None else jnp.asarray(evals, jnp.int32)
    hvps = diagnostics.hessian_vector_products
    hvps = jnp.zeros([], jnp.int32) if hvps is None else jnp.asarray(hvps, jnp.int32)
    if diagnostics.cost is None:
        return evals, hvps, jnp.zeros([], jnp.float32)
    other = jnp.asarray(diagnostics.cost, jnp.float32) - _cost(evals, hvps)
    return evals, hvps, jnp.maximum(other, 0.0)


def _chain_counts(chain: list[tp.TwoPhaseState]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(evaluations, Hessian-vector products, other cost) of every second phase (and
    exact-norm detector) of a chain, as ``twophase.info`` reports them for each two-phase
    state (:func:`_info_counts`)."""
    found = [_info_counts(tp.info(node)) for node in chain]
    return tuple(sum(parts[1:], parts[0]) for parts in zip(*found, strict=True))


def _counts(state: Any, kind: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(int32 evaluations, int32 HVPs, float32 other cost) that a second phase's state has
    made so far."""
    if kind == "two_phase":
        return _chain_counts(_two_phase_chain(state))
    return _info_counts(tp.info(state))


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
    """``(params, state) -> (params, state, evals, hvps, other, stage_after)`` for one
    optimizer step: the evaluations and Hessian-vector products it made (int32) and its other
    cost (float32 evaluation-equivalents, :func:`_info_counts`)."""
    optimizer = optax.with_extra_args_support(optimizer)
    value_and_grad = jax.value_and_grad(value_fn)
    izero, ione = jnp.zeros([], jnp.int32), jnp.ones([], jnp.int32)
    fzero = jnp.zeros([], jnp.float32)

    def step(params, state):
        if kind == "first_order":
            value, grad = value_and_grad(params)
            updates, new_state = optimizer.update(
                grad, state, params, value=value, value_fn=value_fn
            )
            evals, hvps, other, stage = ione, izero, fzero, izero
        elif kind == "lbfgs":
            stored = optax.tree.get(state, "value")
            cached = jnp.isfinite(stored)
            value, grad = optax.value_and_grad_from_state(value_fn)(params, state=state)
            updates, new_state = optimizer.update(
                grad, state, params, value=value, grad=grad, value_fn=value_fn
            )
            evals = (~cached).astype(jnp.int32) + _zoom_evals(new_state)
            hvps, other, stage = izero, fzero, izero
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
            before, after = _counts(state, kind), _counts(new_state, kind)
            evals = needs_grad.astype(jnp.int32) + after[0] - before[0]
            hvps, other = after[1] - before[1], after[2] - before[2]
            if kind == "two_phase":
                stage = _stage(_two_phase_chain(new_state))
            else:
                stage = ione
        return optax.apply_updates(params, updates), new_state, evals, hvps, other, stage

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
    error_fn: Callable[[Params], Any] | None = None,
    wall_budget: float | None = None,
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
      error_fn: ``params -> scalar`` logged at each logged point (not timed, not counted),
        e.g. the relative L2 error; ``None``: none.
      wall_budget: seconds: also stop at the first logged point where the training wall
        time (compilation excluded) reaches it; ``budget`` is then a cap and the cost of
        each chunk is ``budget / log_points`` (``None``: no wall limit).

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
        params,
        state,
        zero,
        zero,
        zero,
        jnp.zeros([], bool),
        jnp.full([], -1.0, jnp.float32),
        fzero,
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
    if wall_budget is not None and not (
        isinstance(wall_budget, (int, float)) and math.isfinite(wall_budget) and wall_budget > 0
    ):
        raise ValueError(f"`wall_budget` must be a positive number or None, got {wall_budget!r}.")
    run = functools.partial(_run_logged, compiled, kind=kind, hyperparams=hyperparams)
    carry, log = run(carry, jax.jit(loss_fn), error_fn, budget, log_points, wall_budget or math.inf)
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
        wall_seconds=float(log["wall"][-1]),
        compile_seconds=compile_seconds,
        evaluations=int(carry.evals),
        hessian_vector_products=int(carry.hvps),
        zero_steps=_zero_steps(carry.state, kind),
        other_cost=float(carry.other),
        wall=np.asarray(log["wall"]),
        error=None if error_fn is None else np.asarray(log["error"]),
    )


def _run_logged(
    compiled, carry, measure, error_fn, budget, log_points, wall_budget, *, kind, hyperparams
):
    """Runs the compiled loop chunk by chunk (``budget / log_points`` evaluations each) and
    logs after each: ``(final carry, {"cost", "loss", "terms", "phase", "wall", "error"})``.
    Stops at the budget, after ``4 * budget`` steps, or once the wall time reaches
    ``wall_budget``."""
    log: dict[str, Any] = {"cost": [0.0], "loss": [], "terms": {}, "phase": [], "wall": [0.0]}
    log["error"] = []

    def record(params, phase):
        total, terms = jax.device_get(measure(params))
        log["loss"].append(float(total))
        for name, value in terms.items():
            log["terms"].setdefault(name, []).append(float(value))
        log["phase"].append(phase)
        if error_fn is not None:
            log["error"].append(float(error_fn(params)))

    record(carry.params, 0)
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
        log["cost"].append(float(_cost(carry.evals, carry.hvps, carry.other)))
        log["wall"].append(wall)
        record(carry.params, phase)
        if bool(carry.done) or int(carry.steps) >= 4 * budget or wall >= wall_budget:
            break
    return carry, log


class _Carry(NamedTuple):
    """The training loop's carry: ``evals`` and ``hvps`` (int32) and ``other`` (float32) are
    the cost so far, ``done`` says a step was discarded at the budget, ``switch_cost``
    (float32) is the cost when the first stage was left (-1 before)."""

    params: Params
    state: Any
    evals: jax.Array
    hvps: jax.Array
    steps: jax.Array
    done: jax.Array
    switch_cost: jax.Array
    other: jax.Array


def _cost(evals: jax.Array, hvps: jax.Array, other: jax.Array | float = 0.0) -> jax.Array:
    """float32 evaluation-equivalents; exact (``HVP_COST`` = 1.5 is a binary fraction) up to
    2**23 evaluations when ``other`` is 0."""
    found = jnp.asarray(evals, jnp.float32) + tp.HVP_COST * jnp.asarray(hvps, jnp.float32)
    return found + jnp.asarray(other, jnp.float32)


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
            return (_cost(c.evals, c.hvps, c.other) < target) & ~c.done & (c.steps < 4 * budget)

        def body(c):
            new_params, new_state, step_evals, step_hvps, step_other, stage = step(
                c.params, c.state
            )
            evals, hvps, other = c.evals + step_evals, c.hvps + step_hvps, c.other + step_other
            new_cost = _cost(evals, hvps, other)
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
                jnp.where(keep, other, c.other),
            )

        return lax.while_loop(cond, body, carry)

    return advance
