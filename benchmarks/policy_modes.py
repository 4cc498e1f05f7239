"""The default policy as a user calls it, with no optional argument, against Adam at equal cost.

Modes (issue "Automatic means automatic"):

* ``c``: the user's own jitted **full-batch** loop (the PINN pattern) on an ODE residual problem:
  fit ``u' = -u`` on ``[0, 2]``, ``u(0) = 1``, with a tanh MLP (float64). Every Adam step is one
  evaluation; second-phase evaluations are counted by ``tp.info(state).cost``.
* ``b``: the user's own jitted **mini-batch** loop with no budget on two regressions (sklearn's
  diabetes, and a teacher-student tanh MLP). An epoch of Adam steps costs 1; in phase 1 an epoch
  is one second-phase step costing ``tp.info`` 's evaluations (``tp.train``'s accounting).

Each optimizer is built as a new user would: ``tp.adam_lbfgs(lr)``, ``tp.adam_cg(lr)``; nothing
else. The ratio is the final full-batch loss over Adam's (``optax.adam(lr)``) at equal cost.
Seeds 0-1 are the tuning half, 2-4 the validation half (``--seeds``).

Usage::

    python benchmarks/policy_modes.py [--modes b c] [--seeds 0 1] [--evals 3000] [--epochs 200]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import twophase as tp

TUNING, VALIDATION = (0, 1), (2, 3, 4)
LR = 3e-3


def mlp_init(key, sizes, dtype):
    params = []
    for k, (m, n) in zip(
        jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes), strict=True
    ):
        params.append(
            {"w": jax.random.normal(k, (m, n), dtype) / math.sqrt(m), "b": jnp.zeros(n, dtype)}
        )
    return params


def mlp(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


# ----------------------------------------------------------------------------- mode c
def ode_problem(seed):
    """u' = -u on [0, 2], u(0) = 1: the residual loss of a 1-20-20-1 tanh MLP (float64)."""
    t = jnp.linspace(0.0, 2.0, 64, dtype=jnp.float64)[:, None]

    def u(p, s):
        return mlp(p, s)[:, 0]

    def loss(p):
        du = jax.vmap(jax.grad(lambda s: u(p, s[None, None])[0]))(t[:, 0])
        residual = du + u(p, t)
        return jnp.mean(residual**2) + (u(p, jnp.zeros((1, 1), jnp.float64))[0] - 1.0) ** 2

    params = mlp_init(jax.random.PRNGKey(seed), [1, 20, 20, 1], jnp.float64)
    return loss, params


def full_batch_run(opt, loss, params, evals):
    """The user's loop: one full-batch step per update until ``evals`` are spent."""

    @jax.jit
    def step(p, s):
        value, grad = jax.value_and_grad(loss)(p)
        u, s = opt.update(grad, s, p, value=value, value_fn=loss)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    adam_steps = 0
    tail = []
    while True:
        second = float(tp.info(state).cost or 0.0) if hasattr(state, "phase") else 0.0
        if adam_steps + second >= evals:
            break
        in_first = not hasattr(state, "phase") or int(state.phase) == 0
        params, state = step(params, state)
        adam_steps += int(in_first)
        if adam_steps >= 0.95 * evals:
            tail.append(float(loss(params)))
    return float(loss(params)), state, _spread(tail)


def _spread(tail):
    """Largest over smallest loss over the last 5% of the cost (Adam's noise)."""
    return max(tail) / min(tail) if tail and min(tail) > 0 else float("nan")


# ----------------------------------------------------------------------------- mode b
def regression(name, seed):
    """(full-batch loss, per-batch loss, params, x, y) of a small regression."""
    rng = np.random.default_rng(seed)
    if name == "diabetes":
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        x = (x - x.mean(0)) / x.std(0)
        y = ((y - y.mean()) / y.std())[:, None]
        sizes = [10, 32, 1]
    else:  # teacher-student
        x = rng.normal(size=(512, 8))
        teacher = mlp_init(jax.random.PRNGKey(1000), [8, 16, 1], jnp.float32)
        y = np.asarray(mlp(teacher, jnp.asarray(x, jnp.float32)))
        sizes = [8, 32, 1]
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    params = mlp_init(jax.random.PRNGKey(seed), sizes, jnp.float32)

    def batch_loss(p, xb, yb):
        return jnp.mean((mlp(p, xb) - yb) ** 2)

    return (lambda p: batch_loss(p, x, y)), batch_loss, params, x, y


def minibatch_run(opt, problem, seed, epochs, batch=32):
    """The user's loop: epochs of shuffled mini-batches; a phase-1 epoch is one step."""
    full, batch_loss, params, x, y = problem

    @jax.jit
    def step(p, s, xb, yb):
        value, grad = jax.value_and_grad(batch_loss)(p, xb, yb)
        u, s = opt.update(grad, s, p, value=value, value_fn=full)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    n = x.shape[0]
    rng = np.random.default_rng(seed + 100)
    cost = 0.0
    tail = []
    while cost < epochs - 1e-9:
        two_phase = hasattr(state, "phase")
        if two_phase and int(state.phase) == 1:
            before = float(tp.info(state).cost)
            params, state = step(params, state, x[:batch], y[:batch])
            cost += float(tp.info(state).cost) - before
            continue
        perm = rng.permutation(n)
        for i in range(n // batch):
            idx = perm[i * batch : (i + 1) * batch]
            params, state = step(params, state, x[idx], y[idx])
            if two_phase and int(state.phase) == 1:
                break
        cost += 1.0
        if cost >= 0.95 * epochs:
            tail.append(float(full(params)))
    return float(full(params)), state, _spread(tail)


def describe(state):
    if not hasattr(state, "phase"):
        return ""
    info = tp.info(state)
    return f"switches {int(info.switches)}, returns {int(info.fallbacks)}, phase {int(info.phase)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["b", "c"])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(TUNING))
    parser.add_argument("--evals", type=int, default=3000, help="mode c: evaluations")
    parser.add_argument("--epochs", type=int, default=200, help="mode b: epoch-equivalents")
    parser.add_argument("--shift", type=float, default=0.0, help="add a constant to every loss")
    args = parser.parse_args()
    rows = []
    if "c" in args.modes:
        jax.config.update("jax_enable_x64", True)
        for seed in args.seeds:
            loss, params = ode_problem(seed)
            shifted = lambda p, loss=loss: loss(p) + args.shift
            adam, _, spread = full_batch_run(optax.adam(LR), shifted, params, args.evals)
            for name, make in (("adam_lbfgs", tp.adam_lbfgs), ("adam_cg", tp.adam_cg)):
                t0 = time.time()
                final, state, _ = full_batch_run(make(LR), shifted, params, args.evals)
                ratio = (final - args.shift) / (adam - args.shift)
                rows.append(("c ode", name, seed, ratio, spread, describe(state), time.time() - t0))
        jax.config.update("jax_enable_x64", False)
    if "b" in args.modes:
        for problem_name in ("diabetes", "teacher"):
            for seed in args.seeds:
                problem = regression(problem_name, seed)
                if args.shift:
                    full, batch_loss, *rest = problem
                    problem = (
                        lambda p, f=full: f(p) + args.shift,
                        lambda p, xb, yb, b=batch_loss: b(p, xb, yb) + args.shift,
                        *rest,
                    )
                adam, _, spread = minibatch_run(optax.adam(LR), problem, seed, args.epochs)
                t0 = time.time()
                final, state, _ = minibatch_run(tp.adam_cg(LR), problem, seed, args.epochs)
                ratio = (final - args.shift) / (adam - args.shift)
                what = describe(state)
                rows.append(
                    (f"b {problem_name}", "adam_cg", seed, ratio, spread, what, time.time() - t0)
                )
    print("| mode, problem | optimizer | seed | loss / Adam's | Adam's last-5% spread | did | s |")
    print("|---|---|---|---|---|---|---|")
    for mode, name, seed, ratio, spread, what, seconds in rows:
        print(f"| {mode} | {name} | {seed} | {ratio:.3g} | {spread:.3g} | {what} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
