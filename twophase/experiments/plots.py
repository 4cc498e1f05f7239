"""The paper's Figures 5 and 6 from :func:`twophase.train` histories (matplotlib, Agg backend).

* :func:`plot_grad_norm_vs_loss` (Fig. 5): full-batch gradient norm against training loss,
  log-log, one curve per run. The loss axis is reversed so that training proceeds from left to
  right; in the paper's picture the norm first grows (non-convex region), peaks, then shrinks
  (convex region).
* :func:`plot_loss_vs_cost` (Fig. 6): training loss (log) against cost in epoch-equivalents.

Both mark the switch of a two-phase run (the last Adam epoch, from which CG starts) with a star
and an annotation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

__all__ = ["GRAD_NORM_VS_LOSS", "LOSS_VS_COST", "plot_grad_norm_vs_loss", "plot_loss_vs_cost"]

GRAD_NORM_VS_LOSS = "grad_norm_vs_loss.png"
LOSS_VS_COST = "loss_vs_cost.png"

History = Sequence[Mapping[str, Any]]

_STYLE = {
    "adam": {"color": "tab:blue", "linestyle": "-"},
    "adam+cg": {"color": "tab:red", "linestyle": "-"},
    "cg": {"color": "tab:green", "linestyle": "--"},
}


def _style(name: str, index: int) -> dict[str, Any]:
    return _STYLE.get(name, {"color": f"C{index}", "linestyle": "-"})


def _switch_index(history: History, switch_epoch: int | None) -> int | None:
    """Index of the last first-phase record (the point CG starts from), if it switched."""
    if switch_epoch is None:
        return None
    for i, record in enumerate(history):
        if record["epoch"] == switch_epoch:
            return max(i - 1, 0)
    return None


def _positive(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[float], list[float]]:
    """Drops points a log axis cannot show (non-positive, non-finite, missing)."""
    keep = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=True)
        if x is not None and y is not None and 0 < x < float("inf") and 0 < y < float("inf")
    ]
    return [x for x, _ in keep], [y for _, y in keep]


def _mark_switch(ax, x: float, y: float, label: str, color: str) -> None:
    ax.plot(
        [x],
        [y],
        marker="*",
        markersize=16,
        color=color,
        markeredgecolor="black",
        zorder=5,
        linestyle="none",
    )
    ax.annotate(
        label,
        (x, y),
        xytext=(12, 14),
        textcoords="offset points",
        fontsize=9,
        color=color,
        arrowprops={"arrowstyle": "->", "color": color, "lw": 0.8},
        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 0.85},
    )


def _finish(fig, ax, title: str | None, path: str | os.PathLike) -> None:
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _finite_loss_by_cost(history: History) -> tuple[list[float], list[float]]:
    pairs = [
        (r["cost"], r["train_loss"])
        for r in history
        if r["train_loss"] is not None and 0 < r["train_loss"] < float("inf")
    ]
    return [c for c, _ in pairs], [v for _, v in pairs]


def _plot_runs(
    histories, switch_epochs, points, switch_point, *, mark_start=False, cost_line=False
):
    """A figure with one curve per run, ``points(history) -> (xs, ys)`` (a run
    with no point is left out), a star at each run's switch
    (``switch_point(record) -> (x, y)``), and with ``mark_start`` a dot at the
    first point, with ``cost_line`` a dotted vertical line at the switch."""
    switch_epochs = dict(switch_epochs or {})
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for i, (name, history) in enumerate(histories.items()):
        style = _style(name, i)
        x, y = points(history)
        if not x:
            continue
        ax.plot(x, y, label=name, lw=1.6, marker="o", markersize=2.5, **style)
        if mark_start:
            ax.plot(
                [x[0]], [y[0]], marker="o", markersize=6, color=style["color"], linestyle="none"
            )
        k = _switch_index(history, switch_epochs.get(name))
        if k is not None:
            record = history[k]
            at = switch_point(record)
            if cost_line:
                ax.axvline(at[0], color=style["color"], lw=0.8, linestyle=":")
            label = f"{name}: switch to CG\n(after epoch {record['epoch']})"
            _mark_switch(ax, *at, label, style["color"])
    return fig, ax


def plot_grad_norm_vs_loss(
    histories: Mapping[str, History],
    path: str | os.PathLike,
    *,
    switch_epochs: Mapping[str, int | None] | None = None,
    title: str | None = None,
) -> None:
    """Fig. 5: full-batch gradient norm against training loss (log-log), one curve per run.

    Args:
      histories: ``{run name: train history}`` (records with ``train_loss``, ``grad_norm``).
      path: the PNG to write.
      switch_epochs: ``{run name: first CG epoch or None}``; marked with a star.
      title: optional title.
    """
    fig, ax = _plot_runs(
        histories,
        switch_epochs,
        lambda h: _positive([r["train_loss"] for r in h], [r["grad_norm"] for r in h]),
        lambda record: (record["train_loss"], record["grad_norm"]),
        mark_start=True,
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("training loss (full batch)  \u2192 decreasing")
    ax.set_ylabel("gradient norm (full batch)")
    _finish(fig, ax, title, path)


def plot_loss_vs_cost(
    histories: Mapping[str, History],
    path: str | os.PathLike,
    *,
    switch_epochs: Mapping[str, int | None] | None = None,
    title: str | None = None,
) -> None:
    """Fig. 6: training loss (log) against cost in epoch-equivalents, one curve per run.

    The cost counts mini-batch epochs and every full-batch evaluation (line search included).

    Args: as :func:`plot_grad_norm_vs_loss`'s, with records holding ``cost`` and
    ``train_loss``.
    """
    fig, ax = _plot_runs(
        histories,
        switch_epochs,
        _finite_loss_by_cost,
        lambda record: (record["cost"], record["train_loss"]),
        cost_line=True,
    )
    ax.set_yscale("log")
    ax.set_xlabel("cost (epoch-equivalents: mini-batch epochs + full-batch evaluations)")
    ax.set_ylabel("training loss (full batch)")
    _finish(fig, ax, title, path)
