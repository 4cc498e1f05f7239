"""The default optimizer against Adam, at equal cost, in each way users call an optimizer.

Modes (issue 30):

- ``a``: ``tp.train(..., cost_budget=B, strict_budget=True)``, mini-batch;
- ``b``: the user's own jitted mini-batch loop, no budget (``tp.adam_cg(lr)``);
- ``c``: the user's own jitted full-batch loop, no optional argument (the PINN pattern);
- ``d``: the user's own loop told the budget (``tp.adam_cg(lr, budget=B)``): mini-batch,
  full-batch for the PINNs (their natural loop);
- ``e``: ``nnx.Optimizer`` inside ``nnx.jit``, mini-batch, no optional argument.

Cost, the same for both optimizers: a mini-batch epoch costs 1 (a step ``1 / (N // batch)``),
a full-batch value-and-gradient evaluation 1, and whatever the optimizer spends on its own
(``tp.info(state).cost``: evaluations, Hessian-vector products at ``tp.HVP_COST``). Each run
stops at the first step that reaches the budget. The default optimizer is the workload's preset
(``tp.adam_cg`` or ``tp.adam_lbfgs``) with only Adam's rate; Adam's rate is each workload's
best of a sweep of Adam alone (``--sweep-adam`` writes it to ``adam_rates.json`` with the
commands that made it, a sweep of some workloads adding to the file; the comparison reads
it).

Output: a markdown table of the median (over seeds) final full-batch training loss of each
workload and mode, the ratio default / Adam, and Adam's own spread over its last 5% of cost
((max - min) / median of its losses there, median over seeds), for the tuning and the
validation half; with ``--hindsight FILE`` (``{"command": ..., "best": {workload: {mode:
best_fixed_split_loss / adam_loss}}}``) also the capture of the best fixed split's log-gain,
``sum log(default / adam) / sum log(min(1, best / adam))`` over the workloads (a geometric
mean), per half and mode.

Examples::

    python modes.py --smoke                      # the smallest workload, one seed, seconds
    python modes.py --sweep-adam                 # the Adam rates -> adam_rates.json
    python modes.py --out modes.json             # the whole comparison (about an hour)
    python modes.py --workloads diabetes iris --modes ac --seeds 3
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import twophase as tp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as W

MODES = "abcde"
ADAM, DEFAULT = "adam", "default"
RATES_FILE = Path(__file__).resolve().parent / "adam_rates.json"
LAST = 0.05  # Adam's spread is measured over the last 5% of the budget


class Run(NamedTuple):
    """One optimizer on one seed of a workload in one mode.

    Attributes:
      loss: the final full-batch training loss.
      cost: the cost spent (epoch-equivalents).
      curve: ``[(cost, full-batch loss), ...]`` after each chunk of steps.
      seconds: wall time, compilation included.
    """

    loss: float
    cost: float
    curve: list[tuple[float, float]]
    seconds: float


# ----------------------------------------------------------------------------------------------
# Optimizers (cached, so every seed reuses the compilations).


@functools.cache
def optimizer(kind: str, preset: str, lr: float, budget: float | None = None):
    """Adam, or the default preset with only the rate (and the budget in mode ``d``)."""
    if kind == ADAM:
        return optax.adam(lr)
    make = getattr(tp, preset)
    return make(lr) if budget is None else make(lr, budget=budget)


def _cost_dtype():
    """float64 under x64 (:func:`main` enables it), else float32."""
    return jnp.result_type(float)


def _spent_by_optimizer(state) -> jax.Array:
    """What the optimizer spent on its own (``tp.info(state).cost``), 0 for Adam."""
    if not tp.info_all(state):
        return jnp.zeros([], _cost_dtype())
    return jnp.asarray(tp.info(state).cost, _cost_dtype())


# ----------------------------------------------------------------------------------------------
# Modes b, c, d: the user's own jitted loop.


@functools.cache
def _own_chunk(loss_fn, opt, n: int, batch: int | None, steps: int, budget: float):
    """A jitted chunk of ``steps`` steps of the user's own loop: mini-batches of ``batch``
    from a fresh permutation, or (``batch=None``) the full batch; a step runs only while the
    cost spent is below ``budget``."""
    step_cost = 1.0 if batch is None else 1.0 / (n // batch)

    def chunk(params, state, key, spent, data):
        def value_fn(p):
            return loss_fn(p, data)

        key, sub = jax.random.split(key)
        if batch is None:
            order = jnp.zeros((steps, 0), jnp.int32)
        else:
            order = jax.random.permutation(sub, n)[: steps * batch].reshape(steps, batch)

        def step(carry, indices):
            def run(carry):
                params, state, spent = carry
                mini = data if batch is None else jax.tree.map(lambda x: x[indices], data)
                loss, grad = jax.value_and_grad(loss_fn)(params, mini)
                before = _spent_by_optimizer(state)
                updates, state = opt.update(grad, state, params, value=loss, value_fn=value_fn)
                spent = spent + step_cost + _spent_by_optimizer(state) - before
                return optax.apply_updates(params, updates), state, spent

            return lax.cond(carry[2] < budget, run, lambda c: c, carry), None

        (params, state, spent), _ = lax.scan(step, (params, state, spent), order)
        return params, state, key, spent, value_fn(params)

    return jax.jit(chunk)


def own_loop(task: W.Task, opt, budget: float, seed: int, batch: int | None) -> Run:
    """The user's own jitted loop (mini-batch, or full-batch with ``batch=None``) to
    ``budget``."""
    started = time.perf_counter()
    n = int(jax.tree.leaves(task.data)[0].shape[0])
    batch = None if batch is None or batch >= n else batch
    steps = max(1, int(budget) // 100) if batch is None else n // batch
    chunk = _own_chunk(task.loss_fn, opt, n, batch, steps, float(budget))
    params, state = task.params, opt.init(task.params)
    key, spent, curve = jax.random.key(seed), jnp.zeros([], _cost_dtype()), []
    while float(spent) < budget:
        params, state, key, spent, loss = chunk(params, state, key, spent, task.data)
        curve.append((float(spent), float(loss)))
    return Run(curve[-1][1], curve[-1][0], curve, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Mode a: tp.train.


def train_mode(task: W.Task, opt, budget: float, seed: int, batch: int) -> Run:
    """``tp.train`` with ``cost_budget=budget`` (strict: the final cost never exceeds it)."""
    started = time.perf_counter()
    result = tp.train(
        task.loss_fn, task.params, task.data, opt, batch_size=batch, max_epochs=10**6,
        cost_budget=budget, strict_budget=True, seed=seed, progress=False,
    )  # fmt: skip
    curve = [(r["cost"], r["train_loss"]) for r in result.history]
    return Run(curve[-1][1], curve[-1][0], curve, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Mode e: nnx.Optimizer inside nnx.jit.


def _holder(params):
    """An ``nnx.Module`` holding ``params``' leaves as ``nnx.Param``s, and the function that
    reads them back as the pytree."""
    from flax import nnx

    leaves, treedef = jax.tree.flatten(params)

    class Holder(nnx.Module):
        def __init__(self):
            self.leaves = nnx.List([nnx.Param(x) for x in leaves])

    def read(model):
        return jax.tree.unflatten(treedef, [p[...] for p in model.leaves])

    return Holder(), read


@functools.cache
def _nnx_step(loss_fn, treedef):
    """The jitted step (returning what the optimizer spent so far, 0 for Adam) and the
    full-batch evaluation of a :func:`_holder` model."""
    from flax import nnx

    import twophase.flax as tpf

    def model_loss(model, batch):
        return loss_fn(jax.tree.unflatten(treedef, [p[...] for p in model.leaves]), batch)

    @nnx.jit
    def step(model, optim, batch, data):
        loss, grads = nnx.value_and_grad(model_loss)(model, batch)
        optim.update(model, grads, value=loss, value_fn=tpf.nnx_value_fn(model, model_loss, data))
        return _spent_by_optimizer(optim.opt_state)

    @nnx.jit
    def evaluate(model, data):
        return model_loss(model, data)

    return step, evaluate


def nnx_mode(task: W.Task, opt, budget: float, seed: int, batch: int) -> Run:
    """``nnx.Optimizer(model, opt, wrt=nnx.Param)`` stepped in ``nnx.jit``, mini-batch (the
    step is ``nnx.cached_partial``-bound to the model and optimizer, as flax advises for
    small steps)."""
    from flax import nnx

    started = time.perf_counter()
    model, _ = _holder(task.params)
    optim = nnx.Optimizer(model, opt, wrt=nnx.Param)
    step, evaluate = _nnx_step(task.loss_fn, jax.tree.structure(task.params))
    bound = nnx.cached_partial(step, model, optim)
    n = int(jax.tree.leaves(task.data)[0].shape[0])
    batch = min(batch, n)
    per_epoch = n // batch
    rng, spent, own, curve = np.random.default_rng(seed), 0.0, 0.0, []
    while spent < budget:
        order = rng.permutation(n)[: per_epoch * batch].reshape(per_epoch, batch)
        for indices in order:
            if spent >= budget:
                break
            before, own = (
                own,
                float(bound(jax.tree.map(lambda x, i=indices: x[i], task.data), task.data)),
            )
            spent += 1.0 / per_epoch + own - before
        curve.append((spent, float(evaluate(model, task.data))))
    return Run(curve[-1][1], curve[-1][0], curve, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# One workload, every mode.


def run_mode(workload: W.Workload, mode: str, kind: str, lr: float, seed: int, budget: float):
    """One run: ``kind`` (Adam or the default) on ``workload``'s ``seed`` in ``mode``."""
    task = workload.task(seed)
    pinn = workload.family == "pinn"
    told = budget if mode == "d" else None
    opt = optimizer(kind, workload.preset, lr, told if kind == DEFAULT else None)
    if mode == "a":
        return train_mode(task, opt, budget, seed, workload.batch_size)
    if mode == "e":
        return nnx_mode(task, opt, budget, seed, workload.batch_size)
    full = mode == "c" or (mode == "d" and pinn)
    return own_loop(task, opt, budget, seed, None if full else workload.batch_size)


def batching(workload: W.Workload, mode: str) -> str:
    """``"full"`` or ``"mini"``: which Adam rate a mode uses."""
    full = mode == "c" or (mode == "d" and workload.family == "pinn")
    return "full" if full else "mini"


def spread(run: Run, budget: float) -> float:
    """(max - min) / median of the losses in the last :data:`LAST` of the budget."""
    tail = [loss for cost, loss in run.curve if cost >= (1 - LAST) * budget] or [run.loss]
    return (max(tail) - min(tail)) / max(statistics.median(tail), 1e-300)


def compare(workload, modes, seeds, rates, budget_scale=1.0, log=print) -> list[dict]:
    """Adam and the default on ``workload`` in each of ``modes`` over ``seeds``: one row per
    mode (medians over seeds)."""
    budget = workload.budget * budget_scale
    rows = []
    for mode in modes:
        lr = rates[workload.name][batching(workload, mode)]
        runs = {
            kind: [run_mode(workload, mode, kind, lr, s, budget) for s in seeds]
            for kind in (ADAM, DEFAULT)
        }
        row = {
            "workload": workload.name,
            "half": workload.half,
            "family": workload.family,
            "mode": mode,
            "lr": lr,
            "budget": budget,
            "adam": statistics.median(r.loss for r in runs[ADAM]),
            "default": statistics.median(r.loss for r in runs[DEFAULT]),
            "adam_spread": statistics.median(spread(r, budget) for r in runs[ADAM]),
            "adam_losses": [r.loss for r in runs[ADAM]],
            "default_losses": [r.loss for r in runs[DEFAULT]],
            "costs": [r.cost for k in runs for r in runs[k]],
            "seconds": sum(r.seconds for k in runs for r in runs[k]),
        }
        row["ratio"] = row["default"] / row["adam"]
        log(
            f"{workload.name:20s} {mode} ratio {row['ratio']:.3g} (default {row['default']:.3g}, "
            f"adam {row['adam']:.3g}) {row['seconds']:.1f} s"
        )
        rows.append(row)
        jax.clear_caches()  # each mode compiles its own steps; a whole suite would exhaust memory
    return rows


# ----------------------------------------------------------------------------------------------
# The Adam rate sweep and the hindsight capture.


def sweep_adam(workloads, seed: int = 0, budget_scale: float = 1.0, log=print) -> dict:
    """Each workload's best Adam rate (lowest final training loss on ``seed``), mini-batch
    (mode b's loop) and full-batch (mode c's)."""
    chosen = {}
    for workload in workloads:
        chosen[workload.name] = {}
        for kind, mode in (("mini", "b"), ("full", "c")):
            losses = {
                lr: run_mode(workload, mode, ADAM, lr, seed, workload.budget * budget_scale).loss
                for lr in workload.adam_rates
            }
            best = min(losses, key=lambda lr: losses[lr] if math.isfinite(losses[lr]) else 1e300)
            chosen[workload.name][kind] = best
            log(f"{workload.name:20s} {kind}: {best:g} of {losses}")
    return chosen


def read_rates(workloads, path: Path = RATES_FILE) -> dict:
    """The swept rates from ``path``; a workload missing there gets the middle of its
    ``adam_rates`` (a line on stderr says so)."""
    stored = json.loads(path.read_text())["rates"] if path.exists() else {}
    rates = {}
    for w in workloads:
        if w.name not in stored:
            middle = w.adam_rates[len(w.adam_rates) // 2]
            print(f"no swept Adam rate for {w.name}; using {middle:g}", file=sys.stderr)
            stored[w.name] = {"mini": middle, "full": middle}
        rates[w.name] = stored[w.name]
    return rates


def capture(rows: list[dict], best: dict) -> dict[tuple[str, str], float]:
    """``{(half, mode): captured share of the best fixed split's log-gain}``: ``sum log(ratio)
    / sum log(min(1, best))`` over the workloads with a hindsight entry."""
    sums: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        found = best.get(row["workload"], {}).get(row["mode"])
        if found is None:
            continue
        total = sums.setdefault((row["half"], row["mode"]), [0.0, 0.0])
        total[0] += math.log(row["ratio"])
        total[1] += math.log(min(1.0, found))
    return {k: (a / b if b < 0 else float("nan")) for k, (a, b) in sums.items()}


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (validation half first)."""
    lines = [
        "| half | workload | mode | default | Adam | default / Adam | Adam spread, last 5% "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["half"] != W.VALIDATION, r["workload"], r["mode"])):
        lines.append(
            f"| {r['half']} | {r['workload']} | {r['mode']} | {r['default']:.3g} | "
            f"{r['adam']:.3g} | {r['ratio']:.3g} | {100 * r['adam_spread']:.1f}% | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict], hindsight: dict | None) -> str:
    """Per half and mode: the worst ratio, the geometric mean, and (with ``hindsight``) the
    capture."""
    captured = capture(rows, hindsight) if hindsight else {}
    lines = [
        "| half | mode | workloads | worst default / Adam | geometric mean | capture |",
        "|---|---|---|---|---|---|",
    ]
    for half in (W.VALIDATION, W.TUNING):
        for mode in MODES:
            ratios = [r["ratio"] for r in rows if r["half"] == half and r["mode"] == mode]
            if not ratios:
                continue
            geo = math.exp(statistics.fmean(math.log(x) for x in ratios))
            cap = captured.get((half, mode))
            lines.append(
                f"| {half} | {mode} | {len(ratios)} | {max(ratios):.3g} | {geo:.3g} | "
                f"{'' if cap is None else f'{cap:.2f}'} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line.


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the smallest workload, one seed")
    parser.add_argument("--workloads", nargs="+", help="names (default: all available)")
    parser.add_argument("--half", choices=(W.TUNING, W.VALIDATION), help="only this half")
    parser.add_argument("--modes", default=MODES, help="letters of the modes (default: abcde)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-scale", type=float, default=1.0, help="scales every budget")
    parser.add_argument("--sweep-adam", action="store_true", help="write adam_rates.json")
    parser.add_argument("--rates", type=Path, default=RATES_FILE, help="the swept rates file")
    parser.add_argument("--hindsight", type=Path, help="best fixed splits (see the docstring)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if set(args.modes) - set(MODES) or not args.modes:
        parser.error(f"--modes takes letters of {MODES!r}, got {args.modes!r}")
    return args


def selected(args) -> list[W.Workload]:
    if args.smoke:
        return [W.smallest()]
    found = W.available(args.half)
    if args.workloads:
        unknown = set(args.workloads) - set(W.WORKLOADS)
        if unknown:
            raise SystemExit(f"unknown workloads {sorted(unknown)}; known: {sorted(W.WORKLOADS)}")
        found = [w for w in found if w.name in args.workloads]
    return found


def main(argv: Sequence[str] | None = None) -> int:
    jax.config.update("jax_enable_x64", True)  # the PINNs run in float64, as their references
    args = parse(argv)
    command = "python " + shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    workloads = selected(args)
    started = time.perf_counter()
    if args.sweep_adam:
        rates = sweep_adam(workloads, budget_scale=args.budget_scale)
        old = json.loads(args.rates.read_text()) if args.rates.exists() else {}
        stored = {
            "commands": [*old.get("commands", []), command],
            "rates": {**old.get("rates", {}), **rates},
        }
        args.rates.write_text(json.dumps(stored, indent=1))
        print(f"wrote {args.rates} in {time.perf_counter() - started:.0f} s")
        return 0
    rates = read_rates(workloads, args.rates)
    seeds = [0] if args.smoke else list(range(args.seeds))
    scale = 0.2 if args.smoke else args.budget_scale
    rows = [row for w in workloads for row in compare(w, args.modes, seeds, rates, scale)]
    hindsight = json.loads(args.hindsight.read_text())["best"] if args.hindsight else None
    print()
    print(table(rows))
    print()
    print(summary(rows, hindsight))
    print(f"\n{command}  ({time.perf_counter() - started:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
