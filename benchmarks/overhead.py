"""Per-step cost of `tp.adam_cg` in phase 0 against `optax.adam`, its state size, compile time.

What is measured, on CPU, for a float32 tanh MLP 784-1024-256-10 (~1.07M parameters), batch 128
(``--batch``: the train step's mini-batch),
MSE on one-hot targets (random seeded data; a 1024-example set serves as the full-batch
``value_fn``, which phase 0 traces but never runs):

* **train step**: one jitted call = mini-batch value and gradient + ``optimizer.update`` +
  ``optax.apply_updates`` (params and state donated);
* **update alone**: the same without the gradient (a fixed precomputed gradient and loss);
* variants, to attribute the overhead: ``optax.adam``; ``two_phase(adam, identity,
  switch_at(10**9))`` (the switch machinery without CG's state); ``two_phase(adam, nonlinear_cg(),
  switch_at(10**9))`` (plus CG's two buffers carried, untouched, through phase 0);
  ``two_phase(adam, nonlinear_cg(), grad_norm_peak())`` (plus the paper's detector);
  ``tp.adam_cg(policy=switch_at(10**9))`` (the same optimizer as the second variant with
  Adam's step fused, as ``tp.adam_cg`` runs it); and ``tp.adam_cg`` (default detector
  ``loss_plateau``). All stay in phase 0.

Timing is interleaved: each round calls every variant once (the order rotates every round), each
call timed with ``block_until_ready``. Reported: the median per-call time, the ratio of medians to
``optax.adam`` and the median over rounds of the per-round ratio (robust to load drifting during the
run). Optimizer-state bytes are the sum of ``nbytes`` over the state's leaves, also expressed as
parameter-sized buffers (bytes / parameter bytes). Compile time is ``jit(...).lower(...).compile()``
wall time of a freshly built train step (median of 3, interleaved).

``--hidden W [W ...]`` changes the hidden widths (default 1024 256): the overhead grows with the
model (RESULTS.md, section 19). With the train-step table comes each variant's XLA temporary
allocation (``compile().memory_analysis().temp_size_in_bytes``): XLA:CPU allocates it afresh on
every call, sized for the whole step, the second phase's code included even while it does not run.

Usage::

    python benchmarks/overhead.py [--quick] [--rounds N] [--batch B] [--hidden W [W ...]]
        [--train-only | --state-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree
from _problems import command_line, count_params, markdown_table, mlp_init, mse

import twophase as tp

SIZES = (784, 1024, 256, 10)
BATCH = 128
FULL = 1024
LR = 1e-3


def set_hidden(widths) -> None:
    """The MLP's hidden widths (``SIZES`` is module state: the scripts' helpers read it)."""
    global SIZES
    SIZES = (SIZES[0], *widths, SIZES[-1])


def variants() -> dict[str, Callable[[], optax.GradientTransformationExtraArgs]]:
    never = 10**9
    return {
        "optax.adam": lambda: optax.adam(LR),
        "optax.apply_if_finite(adam)": lambda: optax.apply_if_finite(optax.adam(LR), 10**9),
        "two_phase(adam, identity, switch_at)": lambda: tp.two_phase(
            optax.adam(LR), optax.identity(), tp.switch_at(never)
        ),
        "two_phase(adam, CG, switch_at)": lambda: tp.two_phase(
            optax.adam(LR), tp.nonlinear_cg(), tp.switch_at(never)
        ),
        "two_phase(adam, CG, grad_norm_peak)": lambda: tp.two_phase(
            optax.adam(LR), tp.nonlinear_cg(), tp.grad_norm_peak(0.9, window=100)
        ),
        "tp.adam_cg(switch_at): Adam fused": lambda: tp.adam_cg(LR, policy=tp.switch_at(never)),
        "tp.adam_cg (default detector)": lambda: tp.adam_cg(LR, steps_per_epoch=100),
    }


def pieces() -> dict[str, Callable[[], optax.GradientTransformationExtraArgs]]:
    """Adam plus one piece of phase 0's extra work at a time (hand-written, NOT twophase code)."""
    return {
        "optax.adam": lambda: optax.adam(LR),
        "adam + gradient norm": lambda: adam_plus(norm=True),
        "adam + norm + finite-check where": lambda: adam_plus(norm=True, finite_where=True),
        "adam + norm + window sum": lambda: adam_plus(norm=True, window_sum=True),
    }


def adam_plus(
    norm: bool = False, finite_where: bool = False, window_sum: bool = False
) -> optax.GradientTransformationExtraArgs:
    """``optax.adam`` plus the gradient norm (kept in the state so it is computed), a
    ``where(finite, ...)`` skip of non-finite steps, and/or a window sum of gradients."""
    adam = optax.adam(LR)

    def init(params):
        sums = optax.tree.zeros_like(params) if window_sum else None
        return adam.init(params), sums, jnp.zeros([], jnp.float32)

    def update(grads, state, params, *, value=None, value_fn=None):
        adam_state, sums, _ = state
        grad_norm = optax.tree.norm(grads) if norm else jnp.zeros([], jnp.float32)
        new, new_adam = adam.update(grads, adam_state, params)
        if finite_where:
            finite = jnp.isfinite(grad_norm) & jnp.isfinite(value)
            new_adam = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_adam, adam_state)
            new = jax.tree.map(lambda u: jnp.where(finite, u, 0.0), new)
        if window_sum:
            sums = optax.tree.add(sums, grads)
        return new, (new_adam, sums, grad_norm)

    return optax.GradientTransformationExtraArgs(init, update)


class SketchState(NamedTuple):
    phase: jax.Array
    adam: Any
    cg: Any
    grad_sum: Any
    sq_sum: jax.Array
    count: jax.Array
    stat: jax.Array


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((FULL, SIZES[0])), jnp.float32)
    y = jnp.asarray(np.eye(SIZES[-1])[rng.integers(0, SIZES[-1], FULL)], jnp.float32)
    return x, y


def train_step_fn(opt):
    """Mini-batch value and gradient, update, apply."""

    def step(params, state, xb, yb, full):
        loss, grad = jax.value_and_grad(mse)(params, xb, yb)
        updates, state = opt.update(
            grad, state, params, value=loss, value_fn=lambda p: mse(p, *full)
        )
        return optax.apply_updates(params, updates), state

    return step


def update_fn(opt):
    """Update and apply only, from a precomputed gradient and loss."""

    def step(params, state, grad, loss, full):
        updates, state = opt.update(
            grad, state, params, value=loss, value_fn=lambda p: mse(p, *full)
        )
        return optax.apply_updates(params, updates), state

    return step


def interleaved(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Per-call wall times, every variant once per round, rotating the order."""
    names = list(calls)
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def stateful_call(jitted, params, state, *args):
    """A zero-argument callable running ``jitted`` on its own (donated) params and state."""
    box = {"params": params, "state": state}

    def call():
        box["params"], box["state"] = jitted(box["params"], box["state"], *args)
        jax.block_until_ready(box["params"])

    return call


def time_variants(
    kind: str, rounds: int, data, table=None, batch: int = BATCH
) -> dict[str, list[float]]:
    x, y = data
    params = mlp_init(1, SIZES)
    grad = jax.grad(mse)(params, x[:batch], y[:batch])
    calls = {}
    for name, make in (table or variants()).items():
        opt = make()
        fresh = jax.tree.map(jnp.copy, params)
        if kind == "train":
            jitted = jax.jit(train_step_fn(opt), donate_argnums=(0, 1))
            args = (x[:batch], y[:batch], data)
        else:
            jitted = jax.jit(update_fn(opt), donate_argnums=(0, 1))
            args = (grad, jnp.float32(0.5), data)
        state = jax.tree.map(jnp.copy, opt.init(fresh))  # init may share buffers
        calls[name] = stateful_call(jitted, fresh, state, *args)
        for _ in range(3):  # compile and warm up
            calls[name]()
    return interleaved(calls, rounds)


def temp_rows(data, batch: int) -> list[list[str]]:
    """Each variant's XLA temporary allocation for the train step, in MiB."""
    x, y = data
    params = mlp_init(1, SIZES)
    rows = []
    for name, make in variants().items():
        opt = make()
        lowered = jax.jit(train_step_fn(opt), donate_argnums=(0, 1)).lower(
            params, opt.init(params), x[:batch], y[:batch], data
        )
        temp = lowered.compile().memory_analysis().temp_size_in_bytes
        rows.append([name, f"{temp / 2**20:.1f}"])
    return rows


def timing_rows(times: dict[str, list[float]]) -> list[list[str]]:
    base = times["optax.adam"]
    rows = []
    for name, ts in times.items():
        ratio_of_medians = statistics.median(ts) / statistics.median(base)
        per_round = statistics.median(a / b for a, b in zip(ts, base, strict=True))
        rows.append(
            [
                name,
                f"{1e3 * statistics.median(ts):.3f}",
                f"{ratio_of_medians:.3f}",
                f"{per_round:.3f}",
            ]
        )
    return rows


def state_rows(params) -> list[list[str]]:
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    opts = {
        "optax.adam": optax.adam(LR),
        "tp.adam_cg (default)": tp.adam_cg(LR),
        "tp.adam_cg (precondition=True)": tp.adam_cg(LR, precondition=True),
        "optax.lbfgs(memory_size=10)": optax.lbfgs(memory_size=10),
    }
    sizes = {n: sum(x.nbytes for x in jax.tree.leaves(o.init(params))) for n, o in opts.items()}
    rows = []
    for name, nbytes in sizes.items():
        buffers = nbytes // param_bytes
        rows.append(
            [
                name,
                f"{nbytes:,}",
                f"{nbytes / sizes['optax.adam']:.3f}",
                f"{buffers} (+{nbytes - buffers * param_bytes:,} B)",
            ]
        )
    return rows


def compile_seconds(make, data, repeats: int) -> list[float]:
    x, y = data
    params = mlp_init(1, SIZES)
    times = []
    for _ in range(repeats):
        opt = make()
        step = jax.jit(train_step_fn(opt))  # a fresh closure: no cache hit
        start = time.perf_counter()
        step.lower(params, opt.init(params), x[:BATCH], y[:BATCH], data).compile()
        times.append(time.perf_counter() - start)
    return times


def compile_rows(data, repeats: int) -> list[list[str]]:
    names = ["optax.adam", "tp.adam_cg (default detector)"]
    makers = variants()
    times = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            times[n] += compile_seconds(makers[n], data, 1)
    base = statistics.median(times["optax.adam"])
    return [
        [n, f"{statistics.median(t):.2f}", f"{statistics.median(t) / base:.1f}"]
        for n, t in times.items()
    ]


def print_state_table(params) -> None:
    print("\n### Optimizer state\n")
    print(
        markdown_table(
            ["optimizer", "state bytes", "ratio to Adam", "parameter-sized buffers (+ rest)"],
            state_rows(params),
        )
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--batch", type=int, default=BATCH, help=f"train-step mini-batch (default {BATCH})"
    )
    parser.add_argument(
        "--train-only", action="store_true", help="only the train-step table (e.g. with --batch)"
    )
    parser.add_argument(
        "--state-only", action="store_true", help="only the optimizer-state table (no timing)"
    )
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=list(SIZES[1:-1]),
        metavar="W",
        help=f"hidden widths (default {' '.join(map(str, SIZES[1:-1]))})",
    )
    args = parser.parse_args(argv)
    if any(w < 1 for w in args.hidden):
        parser.error(f"--hidden widths must be >= 1, got {args.hidden}")
    set_hidden(args.hidden)
    if args.train_only and args.state_only:
        parser.error("--train-only and --state-only exclude each other")
    if not 1 <= args.batch <= FULL:
        parser.error(f"--batch must be in [1, {FULL}], got {args.batch}")
    rounds = args.rounds or (20 if args.quick else 200)
    data = make_data()
    params = mlp_init(1, SIZES)
    print(f"command: `{command_line()}`")
    print(
        f"MLP {'-'.join(map(str, SIZES))} ({count_params(params):,} params), batch {args.batch}, "
        f"float32, jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0]}, "
        f"load average before: {os.getloadavg()[0]:.2f}\n"
    )
    if args.state_only:
        print_state_table(params)
        return
    header = ["variant", "median ms", "ratio of medians", "median per-round ratio"]
    print(f"### Train step (gradient + update + apply), {rounds} interleaved rounds\n")
    print(
        markdown_table(header, timing_rows(time_variants("train", rounds, data, batch=args.batch)))
    )
    print("\n### XLA temporary allocation of the train step\n")
    print(markdown_table(["variant", "temp MiB"], temp_rows(data, args.batch)))
    if args.train_only:
        return
    print(f"\n### Update alone (update + apply), {5 * rounds} interleaved rounds\n")
    print(markdown_table(header, timing_rows(time_variants("update", 5 * rounds, data))))
    print(f"\n### Update alone, pieces of phase 0's extra work, {5 * rounds} interleaved rounds\n")
    print(markdown_table(header, timing_rows(time_variants("update", 5 * rounds, data, pieces()))))
    print_state_table(params)
    print("\n### Compile time of the train step (lower + compile, median of 3)\n")
    print(
        markdown_table(
            ["optimizer", "seconds", "ratio"], compile_rows(data, 1 if args.quick else 3)
        )
    )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
