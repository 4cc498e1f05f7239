"""Does the default switching policy earn its keep? (issue: a budget-aware, self-correcting policy)

Every method trains the same initial parameters with ``tp.train(..., cost_budget=B,
strict_budget=True)`` on the same seeded mini-batch schedule, so they are compared at equal cost
in epoch-equivalents (a mini-batch epoch costs 1, a full-batch value+grad evaluation costs 1;
``tp.train``'s accounting). Methods:

* ``adam``: ``optax.adam`` at the best learning rate of the problem's sweep (used by every
  method; ``--sweep-budget B`` sweeps once at budget B and reuses the rate at every budget);
* ``best split``: ``tp.adam_cg(policy=switch_at(k epochs))`` for k on a geometric grid from 1
  epoch to 90% of the budget, the best in hindsight (an oracle); ``best split precond``: the
  same with ``precondition=True`` at that split and at 90%, the better of the two;
* ``paper rule``: ``grad_norm_peak(0.9)`` on the exact full-batch norm once per epoch (Algorithm 1);
* ``old default``: ``loss_plateau`` (the previous default, one-way);
* ``new default``: ``tp.adam_cg(lr, steps_per_epoch=steps per epoch)`` with no detector, i.e.
  ``tp.safe_resort``, told the budget by ``tp.train``; with ``--lbfgs`` also ``tp.adam_lbfgs``'s.

Two cost axes. The primary ratio is the final full-batch training loss over Adam's at equal
epoch-equivalents. The wall-clock ratio is each method's loss at Adam's total wall time over
Adam's final loss, reading ``history[i]["wall_seconds"]``; the epochs that compiled (the first of
each phase, more than 5x their phase's median) are charged their phase's median instead, since a
compilation is paid once per program, not per run.

The gain target: the geometric mean over problem-budget pairs of
``log(new default / adam) / log(best split / adam)``, a split that loses counting as 1.0 (no gain
to capture), must be at least 0.5; no harm: every new-default ratio at most 1.03.

Usage::

    python benchmarks/policy.py [--budgets 100 300] [--problems NAME ...] [--splits N]
        [--sweep-budget B] [--lbfgs] [--default-only] [--save FILE.jsonl]
        [--report FILE.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
from _problems import command_line, markdown_table, mse, problems

import twophase as tp


def loss_fn(params, batch):
    x, y = batch
    return mse(params, x, y)


def run(problem, optimizer, budget: int) -> dict:
    data = (np.asarray(problem.x), np.asarray(problem.y))
    result = tp.train(
        loss_fn,
        problem.init(),
        data,
        optimizer,
        batch_size=problem.batch_size,
        max_epochs=10 * budget,
        cost_budget=budget,
        strict_budget=True,
        progress=False,
        seed=0,
    )
    history = result.history
    walls = _wall_times(history)
    state = result.opt_state
    try:
        diag = tp.info(state)
        switches = None if diag.switches is None else int(diag.switches)
        returns = None if diag.fallbacks is None else int(diag.fallbacks)
    except ValueError:
        switches = returns = None
    return {
        "loss": history[-1]["train_loss"],
        "cost": history[-1]["cost"],
        "losses": [r["train_loss"] for r in history],
        "walls": walls,
        "phases": [r["phase"] for r in history],
        "switches": switches,
        "returns": returns,
    }


def _wall_times(history) -> list[float]:
    """Cumulative wall seconds with compilation outliers charged their phase's median."""
    per_epoch, previous = [], 0.0
    for record in history:
        per_epoch.append(record["wall_seconds"] - previous)
        previous = record["wall_seconds"]
    phases = np.asarray([r["phase"] for r in history])
    per_epoch = np.asarray(per_epoch)
    for phase in (0, 1):
        mask = phases == phase
        if mask.any():
            median = float(np.median(per_epoch[mask]))
            per_epoch[mask & (per_epoch > 5 * median)] = median
    return list(np.cumsum(per_epoch))


def loss_at_wall(result: dict, seconds: float) -> float:
    """The method's training loss at ``seconds`` of wall time (its last record by then)."""
    index = int(np.searchsorted(np.asarray(result["walls"]), seconds, side="right")) - 1
    return result["losses"][max(index, 0)]


def split_epochs(budget: int, count: int) -> list[int]:
    grid = np.geomspace(1, 0.9 * budget, count)
    return sorted({max(1, round(k)) for k in grid})


def methods(
    lr: float, spe: int, lbfgs: bool
) -> dict[str, Callable[[], optax.GradientTransformation]]:
    chosen = {
        "paper rule": lambda: tp.adam_cg(lr, policy=tp.grad_norm_peak(0.9, spe)),
        "old default": lambda: tp.adam_cg(
            lr, policy=tp.loss_plateau(spe, patience=5, history=10, z_score=1.0)
        ),
        "new default": lambda: tp.adam_cg(lr, steps_per_epoch=spe),
        "new default (L-BFGS)": lambda: tp.adam_lbfgs(lr, steps_per_epoch=spe),
    }
    if not lbfgs:
        del chosen["new default (L-BFGS)"]
    return chosen


def evaluate(
    problem, budget: int, n_splits: int, lr: float | None, lbfgs: bool, default_only: bool = False
) -> dict:
    """All methods on one problem at one budget; ``lr=None`` sweeps the problem's rates;
    ``default_only``: Adam and the new default only."""
    start = time.perf_counter()
    spe = problem.steps_per_epoch
    rates = problem.learning_rates if lr is None else (lr,)
    adam = {rate: run(problem, optax.adam(rate), budget) for rate in rates}
    lr = min(adam, key=lambda k: adam[k]["loss"])
    results = {"adam": adam[lr]}
    if default_only:
        results["new default"] = run(problem, tp.adam_cg(lr, steps_per_epoch=spe), budget)
        return _report(problem, budget, lr, results, start)
    splits = {
        k: run(problem, tp.adam_cg(lr, policy=tp.switch_at(k * spe)), budget)
        for k in split_epochs(budget, n_splits)
    }
    best = min(splits, key=lambda k: splits[k]["loss"])
    results[f"best split ({best})"] = splits[best]
    pre = {
        k: run(
            problem,
            tp.adam_cg(lr, policy=tp.switch_at(k * spe), precondition=True),
            budget,
        )
        for k in sorted({best, round(0.9 * budget)})
    }
    best_pre = min(pre, key=lambda k: pre[k]["loss"])
    results[f"best split precond ({best_pre})"] = pre[best_pre]
    for name, make in methods(lr, spe, lbfgs).items():
        results[name] = run(problem, make(), budget)
    return _report(problem, budget, lr, results, start)


def _report(problem, budget, lr, results, start) -> dict:
    return {
        "problem": problem.name,
        "budget": budget,
        "lr": lr,
        "results": results,
        "seconds": time.perf_counter() - start,
    }


def _r(x: float) -> str:
    return f"{x:.3f}" if x >= 0.01 else f"{x:.2e}"


def tables(reports: list[dict]) -> tuple[str, str]:
    rows, summary = [], []
    captures, harms, log_new, log_best = [], [], [], []
    for rep in reports:
        adam = rep["results"]["adam"]
        adam_wall = adam["walls"][-1]
        best_key = next((k for k in rep["results"] if k.startswith("best split (")), "-")
        best_ratio = min(
            (
                rep["results"][k]["loss"] / adam["loss"]
                for k in rep["results"]
                if k.startswith("best split")
            ),
            default=math.nan,
        )
        for name, res in rep["results"].items():
            ratio = res["loss"] / adam["loss"]
            wall_ratio = loss_at_wall(res, adam_wall) / adam["loss"]
            rows.append(
                [
                    rep["problem"],
                    rep["budget"],
                    name,
                    res["switches"] if res["switches"] is not None else "-",
                    res["returns"] if res["returns"] is not None else "-",
                    f"{res['cost']:.1f}",
                    f"{res['loss']:.3e}",
                    _r(ratio),
                    _r(wall_ratio),
                ]
            )
        new = rep["results"]["new default"]["loss"] / adam["loss"]
        harms.append(new)
        if math.isnan(best_ratio):  # --default-only: no split to compare with
            capture = math.nan
        else:
            log_new.append(math.log(new))
            log_best.append(math.log(min(best_ratio, 1.0)))
            capture = 1.0 if best_ratio >= 1 else min(math.log(new) / math.log(best_ratio), 1.0)
        # A default below the best split captures everything (clipped at 1); a loss gives < 0.
        captures.append(capture)
        summary.append(
            [
                rep["problem"],
                rep["budget"],
                best_key,
                _r(best_ratio) if not math.isnan(best_ratio) else "-",
                *(
                    _r(rep["results"][k]["loss"] / adam["loss"]) if k in rep["results"] else "-"
                    for k in ("paper rule", "old default")
                ),
                _r(new),
                _r(rep["results"]["new default (L-BFGS)"]["loss"] / adam["loss"])
                if "new default (L-BFGS)" in rep["results"]
                else "-",
                "-" if math.isnan(capture) else f"{capture:.2f}",
            ]
        )
    header = [
        "problem",
        "budget",
        "method",
        "switches",
        "returns",
        "cost",
        "train loss",
        "ratio (equal epochs)",
        "ratio (equal wall)",
    ]
    full = markdown_table(header, rows)
    summary_header = [
        "problem",
        "budget",
        "best split (epoch)",
        "best split",
        "paper rule",
        "old default",
        "new default",
        "new default L-BFGS",
        "log-gain captured",
    ]
    captures = [c for c in captures if not math.isnan(c)]
    mean_capture = float(np.mean(captures)) if captures else float("nan")
    # In geometric mean over the pairs: log(geomean new / Adam) / log(geomean best / Adam).
    pooled = sum(log_new) / sum(log_best) if sum(log_best) < 0 else float("nan")
    geo_new = math.exp(np.mean(log_new)) if log_new else math.nan
    geo_best = math.exp(np.mean(log_best)) if log_best else math.nan
    text = markdown_table(summary_header, summary)
    text += (
        f"\n\nNo harm (new default <= 1.03x Adam on every pair): "
        f"{'met' if max(harms) <= 1.03 else 'MISSED'} (worst {max(harms):.3f}). "
        f"Log-gain captured in geometric mean: {pooled:.2f} (target >= 0.5; geometric means "
        f"{geo_new:.3f}x new default, {geo_best:.3f}x "
        f"best split); mean of the per-pair captures {mean_capture:.2f}."
    )
    return text, full


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--problems", nargs="+", default=None)
    parser.add_argument("--splits", type=int, default=5, help="fixed splits per problem")
    parser.add_argument(
        "--sweep-budget",
        type=int,
        default=None,
        help="choose each problem's Adam learning rate by a sweep at this budget and reuse it "
        "at every budget (default: sweep at every budget)",
    )
    parser.add_argument("--lbfgs", action="store_true", help="also adam_lbfgs's default")
    parser.add_argument(
        "--default-only",
        action="store_true",
        help="run Adam and the new default only (no splits, paper rule, old default)",
    )
    parser.add_argument("--save", default=None, help="append each report as a JSON line here")
    parser.add_argument(
        "--report", nargs="+", default=None, help="only print the tables of saved JSON lines"
    )
    args = parser.parse_args(argv)
    if args.report:
        reports = [json.loads(line) for path in args.report for line in open(path)]
        summary, full = tables(reports)
        print(f"\n`{command_line()}`\n\n## Summary\n\n{summary}\n\n## All runs\n\n{full}")
        return
    chosen = [p for p in problems() if args.problems is None or p.name in args.problems]
    if not chosen:
        parser.error(f"--problems: none of {args.problems} is known")
    jax.config.update("jax_platforms", "cpu")
    rates: dict[str, float] = {}
    if args.sweep_budget is not None:
        for problem in chosen:
            adam = {
                rate: run(problem, optax.adam(rate), args.sweep_budget)["loss"]
                for rate in problem.learning_rates
            }
            rates[problem.name] = min(adam, key=adam.get)
            print(f"# {problem.name}: lr {rates[problem.name]} (sweep at {args.sweep_budget})")
    reports = []
    for budget in args.budgets:
        for problem in chosen:
            rep = evaluate(
                problem,
                budget,
                args.splits,
                rates.get(problem.name),
                args.lbfgs,
                args.default_only,
            )
            reports.append(rep)
            print(f"# {problem.name} budget {budget}: {rep['seconds']:.0f} s", flush=True)
            if args.save:
                with open(args.save, "a") as f:
                    f.write(json.dumps(rep) + "\n")
    summary, full = tables(reports)
    print(f"\n`{command_line()}`\n\n## Summary\n\n{summary}\n\n## All runs\n\n{full}")


if __name__ == "__main__":
    main()
