"""Per-step trace of the default policy in the user's own full-batch loop (mode c of modes.py).

For one workload of ``workloads.py`` and one seed: each step's loss, phase, and the policy's
own account (``SafeResortState``: cost, Adam's pace, the trial's reference point and pace). A
diagnostic for a harmful workload-mode pair, not a benchmark.

Usage::

    python trace_policy.py teacher --seed 0 --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import modes
import workloads as W


def trace(name: str, seed: int, steps: int, rates_file: Path) -> list[str]:
    rates = json.loads(rates_file.read_text())["rates"] if rates_file.exists() else {}
    workload = {w.name: w for w in W.available()}[name]
    lr = rates.get(name, {}).get("full", 1e-2)
    task = workload.task(seed)
    n = int(jax.tree.leaves(task.data)[0].shape[0])
    opt = modes.optimizer(modes.DEFAULT, workload.preset, lr, None)
    chunk = modes._own_chunk(task.loss_fn, opt, n, None, 1, float(workload.budget))
    params, state = task.params, opt.init(task.params)
    key, spent = jax.random.key(seed), jnp.zeros([], modes._cost_dtype())
    lines = [f"{name} seed {seed}: {workload.preset}({lr}), full batch, budget {workload.budget}"]
    while float(spent) < min(workload.budget, steps):
        params, state, key, spent, loss = chunk(params, state, key, spent, task.data)
        d = state.detector_state
        lines.append(
            f"cost {float(spent):5.0f} loss {float(loss):.4g} phase {int(state.phase)} | policy: "
            f"cost {float(d.cost):.3g} pace {float(d.adam_pace):.3g} reference "
            f"{float(d.reference_value):.4g}@{float(d.reference_cost):.3g} trial pace "
            f"{float(d.trial_pace):.3g}"
        )
    return lines


def main(argv=None) -> int:
    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rates", type=Path, default=Path(__file__).with_name("adam_rates.json"))
    args = parser.parse_args(argv)
    print("\n".join(trace(args.workload, args.seed, args.steps, args.rates)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
