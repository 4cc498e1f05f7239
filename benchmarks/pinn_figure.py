"""The PINN suite's figure: relative L2 error against wall time, one panel per problem.

Each panel draws Adam and each method family's chosen row (``benchmarks/pinn.py``: the best
split on the tuning seeds, and the default policies) on one seed: the first validation seed
run, else the first tuning seed. Wall time is the training loop's, compilation excluded; a
row rerun to reach Adam's wall time is drawn from its longer run. The dotted vertical line is
Adam's wall time at the budget (the "equal wall time" of the tables).

Usage::

    python benchmarks/pinn.py ... --figure pinn.png         # while running the suite
    python benchmarks/pinn_figure.py results.json pinn.png   # from a saved --out file
"""

from __future__ import annotations

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def figure_seed(result: dict) -> str:
    """The seed a panel draws: the first validation seed run, else the first tuning seed."""
    seeds = result["validation_seeds"] or result["tuning_seeds"]
    return str(seeds[0])


def curves(result: dict) -> dict[str, tuple[list[float], list[float]]]:
    """``{label: (wall seconds, relative L2 error)}`` for Adam and each family's chosen row."""
    runs = result["runs"][figure_seed(result)]
    found = {}
    for label, name in [("Adam", "Adam"), *result["best"].items()]:
        run = runs.get(name)
        if run is None:
            continue
        curve = run.get("wall_curve", run["curve"])
        text = label if label == name else f"{label} ({name.rsplit(' ', 1)[-1]})"
        found[text] = (curve["wall"], curve["error"])
    return found


def plot_suite(results: dict, path: str) -> None:
    """Writes the figure of ``results`` (``benchmarks/pinn.py``'s suite results, by problem)
    to ``path`` (PNG)."""
    names = list(results)
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(max(4.2 * columns, 7), 3.4 * rows), squeeze=False
    )
    for ax, name in zip(axes.flat, names, strict=False):
        result = results[name]
        for label, (wall, error) in curves(result).items():
            ax.plot(wall, error, label=label, linewidth=1.2)
        adam = result["runs"][figure_seed(result)]["Adam"]
        ax.axvline(adam["wall"], color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{name} (seed {figure_seed(result)})")
        ax.set_xlabel("wall time, s")
        ax.set_ylabel("relative L2 error")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize="small")
    fig.tight_layout(rect=(0, 0.12 if rows == 1 else 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python benchmarks/pinn_figure.py results.json out.png")
    with open(argv[0]) as f:
        plot_suite(json.load(f)["results"], argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
