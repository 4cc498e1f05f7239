"""Would a budget-aware "final polish" make a safe default? CG for the last 10%, with a pace check.

Context (``benchmarks/switching.py``): at equal cost the best fixed switch from Adam to full-batch
CG was the latest one tried (90% of the budget) on 7 of 8 problem-budget pairs, and a budget-blind
detector cannot time that. A user who knows the budget could ask for it: switch after 90% of the
budget, and, so that a losing switch costs little, compare CG's progress after its first ``m``
full-batch evaluations with Adam's recent pace and go back to Adam if CG is slower. This script
measures that rule on the switching problems before anything like it is offered.

What is measured, per problem and budget (epoch-equivalents: a mini-batch epoch = 1, a full-batch
value+grad evaluation = 1), with Adam's learning rate chosen by the same sweep as
``switching.py``, from the same initialisation and mini-batch schedule:

* Adam alone: full-batch training loss after the budget;
* polish: Adam for ``fraction`` x budget epochs, then ``tp.nonlinear_cg()`` (default settings)
  on the full batch until the budget is spent (identical to ``switching.py``'s fixed split);
* polish with a pace check after ``m`` evaluations: at CG's first iteration that has used at
  least ``m`` evaluations, CG's decrease of log(loss) since the switch is compared with Adam's
  mean decrease of log(loss) per epoch over the last 10% of epochs before the switch, times the
  evaluations used. If CG is ahead it continues to the end; otherwise Adam resumes (its moments
  as they were at the switch) from CG's current point for the epochs left.

The pace check here reads Adam's exact full-batch losses, which a detector would not have for
free (it sees mini-batch losses): the rule is given its best chance.

Usage::

    python benchmarks/final_polish.py [--budgets 100 300] [--fraction 0.9] [--checks 2 4 6]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree
from _problems import (
    adam_epoch,
    batch_schedule,
    command_line,
    full_loss_and_norm,
    markdown_table,
    mse,
    problems,
    run_adam,
)

import twophase as tp


@jax.jit
def cg_iteration(params, state, data):
    """One ``tp.nonlinear_cg()`` iteration on the full batch."""
    updates, state = tp.nonlinear_cg().update(
        optax.tree.zeros_like(params), state, params, value_fn=lambda p: mse(p, *data)
    )
    return optax.apply_updates(params, updates), state


def adam_epochs(params, state, lr: float, schedule: np.ndarray, data):
    """Adam over ``schedule``'s epochs: final params, state and the full-batch loss per epoch."""
    losses = []
    for idx in schedule:
        params, state, _ = adam_epoch(params, state, jnp.float32(lr), idx, data)
        losses.append(float(full_loss_and_norm(params, data)[0]))
    return params, state, losses


def cg_trace(params, data, evals_left: int) -> list[tuple[int, float, object]]:
    """``(evaluations used, loss, params)`` after each CG iteration that fits in the budget."""
    state = tp.nonlinear_cg().init(params)
    trace = []
    while True:
        new_params, new_state = cg_iteration(params, state, data)
        used = int(tp.info(new_state).value_and_grad_evals)
        if used > evals_left or (trace and used == trace[-1][0]):
            return trace
        params, state = new_params, new_state
        trace.append((used, float(mse(params, *data)), params))


def evaluate(problem, budget: int, fraction: float, checks: list[int]) -> list[str]:
    data = (jnp.asarray(problem.x), jnp.asarray(problem.y))
    schedule = batch_schedule(problem.x.shape[0], problem.batch_size, budget)
    sweep = {lr: run_adam(problem, lr, schedule, data)[0] for lr in problem.learning_rates}
    lr = min(sweep, key=sweep.get)
    split = int(fraction * budget)
    params = problem.init()
    params, state, head = adam_epochs(
        params, optax.adam(lr).init(params), lr, schedule[:split], data
    )
    adam_loss = sweep[lr]
    trace = cg_trace(params, data, budget - split)
    polish = trace[-1][1] if trace else head[-1]
    span = max(2, split // 10)
    adam_pace = (np.log(head[-span - 1]) - np.log(head[-1])) / span  # log-loss per epoch
    cells = [problem.name, f"{lr:g}", f"{adam_loss:.3e}", f"{polish / adam_loss:.3f}"]
    for m in checks:
        at = next((t for t in trace if t[0] >= m), None)
        if at is None:
            cells.append("-")
            continue
        used, loss, cg_params = at
        cg_gain = np.log(head[-1]) - np.log(loss)
        if cg_gain >= adam_pace * used:
            final, decision = polish, "keep"
        else:
            rest = schedule[split + used : budget]
            _, _, tail = adam_epochs(cg_params, state, lr, rest, data)
            final, decision = (tail[-1] if tail else loss), "back to Adam"
        cells.append(
            f"{decision} ({cg_gain:.3f} vs {adam_pace * used:.3f}): {final / adam_loss:.3f}"
        )
    return cells


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--fraction", type=float, default=0.9)
    parser.add_argument("--checks", type=int, nargs="+", default=[2, 4, 6])
    args = parser.parse_args(argv)
    print(f"command: `{command_line()}`")
    print(f"float32, jax {jax.__version__}, optax {optax.__version__}\n")
    header = [
        "problem",
        "Adam lr",
        "Adam loss",
        f"polish after {args.fraction:.0%} (ratio)",
        *(
            f"pace check after {m} evals: decision (CG vs Adam log-gain): ratio"
            for m in args.checks
        ),
    ]
    for budget in args.budgets:
        start = time.perf_counter()
        rows = [evaluate(p, budget, args.fraction, args.checks) for p in problems()]
        print(f"### Budget {budget} ({time.perf_counter() - start:.0f} s)\n")
        print(markdown_table(header, rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
