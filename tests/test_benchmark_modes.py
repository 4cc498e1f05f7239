"""benchmarks/workloads.py and benchmarks/modes.py: the registry's declared split, the equal-cost
accounting of the users' own loops against a hand-written optax loop, the capture arithmetic,
and (slow) the smallest workload end to end in every mode, as a user runs the script."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from tests.test_benchmark_scripts import BENCHMARKS, run_script, table_rows

sys.path.insert(0, str(BENCHMARKS))
import modes
import workloads as W


def test_registry_declares_the_suite_and_its_halves():
    declared = list(W.WORKLOADS.values())
    assert len(declared) >= 16 and len(W.available()) >= 16
    families = {w.family for w in declared}
    assert families == {"regression", "classification", "pinn", "other"}
    for family in families:  # every family has workloads in both halves
        halves = {w.half for w in declared if w.family == family}
        assert halves == {W.TUNING, W.VALIDATION}, family
    assert sum(w.family == "pinn" for w in declared) >= 6
    assert "digits-vit" in W.WORKLOADS
    assert W.smallest() in W.available()


def test_unknown_pinn_problems_are_left_out(monkeypatch):
    from twophase.experiments import pinn

    monkeypatch.setattr(pinn, "PROBLEM_NAMES", ("wave",))
    names = [w.name for w in W.available() if w.family == "pinn"]
    assert names == ["pinn-wave"]


def test_seeds_share_data_and_loss_but_not_parameters():
    workload = W.WORKLOADS["linnerud"]
    a, b = workload.task(0), workload.task(1)
    assert a.loss_fn is b.loss_fn and a.data is b.data  # so jitted loops compile once
    assert not np.allclose(a.params[0]["w"], b.params[0]["w"])


@pytest.mark.parametrize("batch", [None, 4])
def test_own_loop_spends_exactly_the_budget_like_a_hand_written_loop(batch):
    # Adam in the user's own loop: `budget` epoch-equivalents are `budget * N // batch`
    # mini-batch steps, or `budget` full-batch steps; the full-batch case is checked against
    # optax.adam stepped by hand.
    task = W.WORKLOADS["linnerud"].task(0)
    budget = 6
    run = modes.own_loop(task, optax.adam(1e-2), budget, seed=0, batch=batch)
    assert run.cost == pytest.approx(budget)
    assert len(run.curve) == budget  # one point per chunk: a step, or an epoch
    if batch is None:
        opt = optax.adam(1e-2)
        params, state = task.params, opt.init(task.params)
        for _ in range(budget):
            grad = jax.grad(task.loss_fn)(params, task.data)
            updates, state = opt.update(grad, state, params)
            params = optax.apply_updates(params, updates)
        assert run.loss == pytest.approx(float(task.loss_fn(params, task.data)), rel=1e-5)


def test_capture_is_the_share_of_the_best_splits_log_gain():
    rows = [
        {"workload": "p", "half": W.VALIDATION, "mode": "a", "ratio": 0.5},
        {"workload": "q", "half": W.VALIDATION, "mode": "a", "ratio": 1.1},
        {"workload": "r", "half": W.VALIDATION, "mode": "a", "ratio": 0.9},
    ]
    best = {"p": {"a": 0.25}, "q": {"a": 1.2}}  # q's best split loses: counted as 1.0
    expected = (math.log(0.5) + math.log(1.1)) / math.log(0.25)
    assert modes.capture(rows, best) == {(W.VALIDATION, "a"): pytest.approx(expected)}


def test_spread_reads_the_last_five_percent():
    run = modes.Run(1.0, 100.0, [(10.0, 9.0), (94.0, 5.0), (96.0, 1.2), (100.0, 1.0)], 0.0)
    assert modes.spread(run, 100.0) == pytest.approx((1.2 - 1.0) / 1.1)


@pytest.mark.slow  # every mode compiles both optimizers: ~1-5 minutes on 2 shared cores
def test_smoke_runs_the_smallest_workload_in_every_mode(tmp_path):
    out = tmp_path / "rows.json"
    text = run_script("modes.py", "--smoke", "--out", str(out))
    name = W.smallest().name
    rows = [r for r in table_rows(text, W.smallest().half) if r[1] == name]
    assert sorted(r[2] for r in rows) == list(modes.MODES)
    stored = json.loads(Path(out).read_text())
    assert stored["command"].startswith("python modes.py --smoke")
    for row in stored["rows"]:
        assert math.isfinite(row["default"]) and math.isfinite(row["adam"]), row
        assert row["ratio"] == pytest.approx(row["default"] / row["adam"])
        # Equal cost: each run stops at the first step reaching the budget (mode a: never
        # above it); a second-phase step may overshoot by its own evaluations.
        for cost in row["costs"]:
            assert row["budget"] - 10 <= cost <= row["budget"] + 10, row


def test_rates_come_from_the_sweep_file_or_the_middle_of_the_grid(tmp_path, capsys):
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"commands": ["x"], "rates": {"iris": {"mini": 0.5, "full": 0.7}}}))
    iris, wine = W.WORKLOADS["iris"], W.WORKLOADS["wine"]
    rates = modes.read_rates([iris, wine], path)
    assert rates["iris"] == {"mini": 0.5, "full": 0.7}
    middle = wine.adam_rates[len(wine.adam_rates) // 2]
    assert rates["wine"] == {"mini": middle, "full": middle}
    assert "no swept Adam rate for wine" in capsys.readouterr().err
