"""Table 1 at CPU scale: every model of the experiment, Adam vs Adam+CG vs CG at equal cost.

For each ``--model`` on ``--dataset`` this runs, from the same initial weights and mini-batch
schedule (``twophase.experiments.runner``): Adam alone, CG alone, Adam+CG with the default
detector (``--switch auto`` of ``python -m twophase``) and Adam+CG with a fixed switch after
each fraction in ``--splits`` of the budget (the paper's experiments used 30%). Every run gets
the same budget in epoch-equivalents (a mini-batch epoch = 1, a full-batch evaluation = 1,
line search and detector included). Prints one markdown table with the training loss of each
run, its ratio to Adam's, the switch epoch and the best fixed split, and writes the records to
``--out`` as JSON.

This is ``python -m twophase --sweep`` for several models at once, with a short list of splits
so that the ViT and VGG models fit a CPU budget. ``--splits`` with no value and ``--skip-cg`` keep
only Adam and the automatic switch (e.g. to re-measure the detector); ``--skip-auto`` drops the
automatic switch (e.g. to add preconditioned splits to a table whose automatic runs exist).

Usage::

    python benchmarks/experiment_grid.py --dataset mnist5k --epochs 30 \\
        --models vit-mlp vit-nomlp vit-nomlp-wkewq vit-nomlp-wkewq-wvwo vgg5-max-relu mlp
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence

from _problems import command_line

from twophase.experiments import models as _models
from twophase.experiments import runner as _runner


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}e}" if abs(x) < 1e-3 else f"{x:.{digits + 1}f}"


def run_model(args, model: str) -> dict:
    config = _runner.ExperimentConfig(
        dataset=args.dataset,
        model=model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=False,
        max_train=args.max_train,
        precondition=args.precondition,
    )
    problem = _runner.build_problem(config)
    start = time.perf_counter()
    runs = {"adam": _runner.run_one(config, "adam", problem=problem)}
    if not args.skip_cg:
        runs["cg"] = _runner.run_one(config, "cg", problem=problem)
    if not args.skip_auto:
        runs["adam+cg auto"] = _runner.run_one(config, "adam+cg", problem=problem, switch="auto")
    for k in _runner.split_epochs(args.epochs, args.splits):
        runs[f"adam+cg after {k}"] = _runner.run_one(config, "adam+cg", problem=problem, switch=k)
    records = {name: run.record for name, run in runs.items()}
    return {
        "model": model,
        "params": problem.num_params,
        "Q": problem.q,
        "steps_per_epoch": problem.steps_per_epoch,
        "seconds": time.perf_counter() - start,
        "records": records,
    }


def switch_cell(record: dict | None) -> str:
    """The switch epoch of a run record: "never", the epoch, or "not run" without a record."""
    if record is None:
        return "not run"
    return "never" if record["switch_epoch"] is None else str(record["switch_epoch"])


def table_rows(result: dict) -> list[str]:
    records = result["records"]
    adam = records["adam"]["train_loss"]
    fixed = {k: r for k, r in records.items() if k.startswith("adam+cg after")}
    best = min(fixed, key=lambda k: fixed[k]["train_loss"]) if fixed else None

    def cell(name: str) -> str:
        if name not in records:
            return "not run"
        r = records[name]
        return f"{fmt(r['train_loss'])} ({r['train_loss'] / adam:.2f})"

    cg_acc = f"{records['cg']['val_acc']:.3f}" if "cg" in records else "-"

    auto = records.get("adam+cg auto")
    best_ratio = None if best is None else fixed[best]["train_loss"] / adam
    return [
        "| "
        + " | ".join(
            [
                result["model"],
                str(result["params"]),
                f"{result['Q']:.2f}",
                str(result["steps_per_epoch"]),
                f"{fmt(adam)} / {records['adam']['train_acc']:.3f}",
                cell("adam+cg auto"),
                switch_cell(auto),
                "; ".join(f"{k.split()[-1]}: {fixed[k]['train_loss'] / adam:.2f}" for k in fixed),
                "-" if best is None else f"{best.split()[-1]} ({best_ratio:.2f})",
                cell("cg"),
                f"{records['adam']['val_acc']:.3f} / {cg_acc}",
                f"{result['seconds']:.0f}",
            ]
        )
        + " |"
    ]


HEADER = [
    "| model | P | Q | Adam steps/epoch | Adam train loss / acc | Adam+CG auto (ratio) | "
    "auto switch epoch | fixed split after k Adam epochs: ratio | best fixed split (ratio) | "
    "CG alone (ratio) | val acc Adam / CG | seconds |",
    "|---|---:|---:|---:|---|---|---|---|---|---|---|---:|",
]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--models", nargs="+", default=list(_models.MODEL_NAMES))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--splits", type=float, nargs="*", default=[0.3, 0.6, 0.9], help="none: no fixed split"
    )
    parser.add_argument("--skip-cg", action="store_true", help="do not run CG alone")
    parser.add_argument(
        "--skip-auto", action="store_true", help="do not run Adam+CG with the default detector"
    )
    parser.add_argument(
        "--precondition",
        action="store_true",
        help="Adam+CG runs precondition CG with Adam's second moments",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON file for the records")
    args = parser.parse_args(argv)
    print("command:", command_line())
    print(
        f"dataset {args.dataset}, budget {args.epochs} epoch-equivalents per run, "
        f"batch {args.batch_size}, seed {args.seed}"
        f"{', Adam+CG preconditioned' if args.precondition else ''}; "
        "ratio = train loss / Adam's\n",
        flush=True,
    )
    results = []
    for model in args.models:
        result = run_model(args, model)
        results.append(result)
        if len(results) == 1:
            print("\n".join(HEADER))
        print("\n".join(table_rows(result)), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2, default=str)
    print("\n" + "\n".join(HEADER))
    for result in results:
        print("\n".join(table_rows(result)))


if __name__ == "__main__":
    main()
