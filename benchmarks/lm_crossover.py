"""Levenberg-Marquardt: where the dense path stops paying, and what a Jacobian costs.

Two tables, float64, a tanh PINN (3 hidden layers of width ``w``) on the reaction
problem of :mod:`twophase.experiments.pinn` (1000 residual points, 101 initial,
101 boundary pairs), the residuals given point by point
(:func:`twophase.pointwise_residuals`):

1. step time of ``levenberg_marquardt(solver="dense")`` and
   ``solver="matrix_free"`` against the parameter count ``P`` (the median of
   ``--steps`` ``update`` calls after compiling, from the point ``--adam``
   full-batch Adam steps reached), and the loss after those steps;
2. with ``--jacobian-cost``: the time of one dense linearization (Jacobian rows
   by per-point reverse mode folded into ``J^T J``; and the Jacobian rows alone)
   in units of one ``jax.value_and_grad`` of the loss, the two timed in one
   jitted ``lax.fori_loop`` each, fastest of several runs.

Usage::

    python benchmarks/lm_crossover.py [--widths 10 20 30 40 50] [--steps 10] [--adam 300]
    python benchmarks/lm_crossover.py --jacobian-cost [--widths 20 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# One LAPACK/BLAS thread: on a CPU shared with other processes OpenBLAS's spinning
# threads slowed a 281 x 281 Cholesky a hundredfold (set the variable to override).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import twophase as tp  # noqa: E402
from twophase.experiments import pinn  # noqa: E402
from twophase.second_phase import jacobian as jac  # noqa: E402


def pointwise_loss(problem: pinn.Problem, points: pinn.Collocation, has_aux: bool = False):
    """The PINN loss of :func:`pinn.loss_terms` (each term's mean square, summed),
    given point by point for per-point Jacobians."""

    def pde(params, point):
        return pinn.pde_residual(problem, lambda x, t: pinn.mlp(params, x, t), point[0], point[1])

    def initial(params, datum):
        point, value = datum
        return pinn.mlp(params, point[0], point[1]) - value

    def boundary(params, pair):
        lower, upper = pair
        u_lower = pinn.mlp(params, lower[0], lower[1])
        u_upper = pinn.mlp(params, upper[0], upper[1])
        return u_lower - u_upper if problem.periodic else jnp.stack([u_lower, u_upper])

    terms = {
        "residual": (pde, points.residual),
        "initial": (initial, (points.initial, points.initial_values)),
        "boundary": (boundary, (points.boundary_lower, points.boundary_upper)),
    }
    return tp.pointwise_residuals(terms, has_aux=has_aux)


def setup(width: int, seed: int = 0):
    """``(params, objective)`` for the reaction problem at ``width``."""
    problem = pinn.make_problem("reaction")
    points = pinn.collocation(problem, n_residual=1000, seed=seed)
    params = pinn.init_mlp(jax.random.key(seed), (width,) * 3)
    return params, pointwise_loss(problem, points)


def adam_start(params, objective, steps: int):
    """``params`` after ``steps`` full-batch Adam steps (learning rate 1e-2)."""
    adam = optax.adam(1e-2)

    @jax.jit
    def run(p):
        def body(_, carry):
            u, s = adam.update(jax.grad(objective)(carry[0]), carry[1], carry[0])
            return optax.apply_updates(carry[0], u), s

        return lax.fori_loop(0, steps, body, (p, adam.init(p)))[0]

    return run(params)


def step_time(width: int, solver: str, steps: int, adam: int) -> tuple[int, float, float]:
    """``(P, median seconds per update, loss after the steps)`` from the point
    ``adam`` Adam steps reached."""
    params, objective = setup(width)
    params = adam_start(params, objective, adam)
    opt = tp.levenberg_marquardt(solver=solver)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        u, s = opt.update(p, s, p, value_fn=objective)
        return optax.apply_updates(p, u), s

    params, state = jax.block_until_ready(step(params, state))  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state))
        times.append(time.perf_counter() - start)
    size = sum(x.size for x in jax.tree.leaves(params))
    return size, statistics.median(times), float(state.value)


def _timed(fn, arg, repeats: int, runs: int = 5) -> float:
    """Fastest seconds per call of ``fn(arg)`` over ``runs`` jitted loops of ``repeats``."""

    @jax.jit
    def loop(a):
        def body(i, acc):
            out = fn(jax.tree.map(lambda x: x + 1e-12 * i, a))
            return acc + sum(jnp.sum(x) for x in jax.tree.leaves(out))

        return lax.fori_loop(0, repeats, body, jnp.zeros([], jnp.float64))

    jax.block_until_ready(loop(arg))
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(loop(arg))
        best = min(best, time.perf_counter() - start)
    return best / repeats


def jacobian_cost(width: int) -> tuple[int, float, float, float]:
    """``(P, seconds per value+grad, linearization / eval, Jacobian rows / eval)``."""
    params, objective = setup(width)
    evaluation = _timed(jax.value_and_grad(objective), params, 20)
    gram = _timed(lambda p: jac.linearize(objective, p, "gram")[1:], params, 2)
    rows = _timed(lambda p: jac.linearize(objective, p, "diagonal")[1:], params, 2)
    size = sum(x.size for x in jax.tree.leaves(params))
    return size, evaluation, gram / evaluation, rows / evaluation


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[10, 20, 30, 40, 50])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--adam", type=int, default=300)
    parser.add_argument("--jacobian-cost", action="store_true")
    args = parser.parse_args(argv)
    print("command: python benchmarks/lm_crossover.py " + " ".join(sys.argv[1:]))
    threads = os.environ["OPENBLAS_NUM_THREADS"]
    print(f"device: {jax.devices()[0].device_kind}, float64, OPENBLAS_NUM_THREADS={threads}\n")
    if args.jacobian_cost:
        print(
            "| width | P | value+grad (ms) | dense linearization (evals) | Jacobian rows (evals) |"
        )
        print("|---|---|---|---|---|")
        for width in args.widths:
            size, evaluation, gram, rows = jacobian_cost(width)
            print(f"| {width} | {size} | {1e3 * evaluation:.2f} | {gram:.1f} | {rows:.1f} |")
        return
    print("| width | P | dense s/step | matrix-free s/step | dense loss | matrix-free loss |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        size, dense, dense_loss = step_time(width, "dense", args.steps, args.adam)
        _, free, free_loss = step_time(width, "matrix_free", args.steps, args.adam)
        print(
            f"| {width} | {size} | {dense:.3f} | {free:.3f} | {dense_loss:.2e} | {free_loss:.2e} |"
        )


if __name__ == "__main__":
    main()
