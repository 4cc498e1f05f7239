"""The PINN suite of ``benchmarks/pinn.py``: its seed split, method families, equal-wall-time
reading and the LM rows' skip, and one tiny run end to end (the smallest problem, the ODE)
through its tables, JSON and figure."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

import twophase as tp
from tests.test_benchmark_scripts import run_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module():
    """benchmarks/pinn.py imported as a module (its ``main`` does not run)."""
    spec = importlib.util.spec_from_file_location("pinn_suite_benchmark", BENCHMARKS / "pinn.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))  # for its `from _problems import ...`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_seed_split_and_selectors():
    module = benchmark_module()
    assert module.seed_split([0, 1, 2, 3, 4]) == ([0, 1], [2, 3, 4])
    assert module.seed_split([3, 0]) == ([0], [3])
    parse = module.build_parser().parse_args
    assert module.settings(parse([]))["seeds"] == [0, 1, 2, 3, 4]
    assert module.settings(parse(["--seed", "3"]))["seeds"] == [3]
    assert module.settings(parse(["--seeds", "1", "4"]))["seeds"] == [1, 4]
    with pytest.raises(SystemExit, match="--seeds or --seed"):
        module.settings(parse(["--seeds", "1", "--seed", "2"]))
    with pytest.raises(SystemExit, match="distinct"):
        module.settings(parse(["--seeds", "1", "1"]))
    args = parse(["--problems", "burgers", "oscillator", "--families", "Adam->LM"])
    assert args.problems == ["burgers", "oscillator"] and args.families == ["Adam->LM"]
    with pytest.raises(SystemExit):  # argparse: not a problem
        parse(["--problems", "heat"])


def test_families_cover_the_issue_rows():
    module = benchmark_module()
    assert set(module.FAMILIES) == {
        "Adam->L-BFGS default",
        "Adam->L-BFGS",
        "Adam->L-BFGS->NNCG",
        "Adam->LM default",
        "Adam->LM",
    }
    for family in ("Adam->L-BFGS", "Adam->LM"):  # the best split's sweep
        splits = [row.split for row in module.SUITE_ROWS if row.family == family]
        assert splits == list(module.SWEEP_SPLITS)
    lm = [row for row in module.SUITE_ROWS if row.needs_lm]
    assert {row.family for row in lm} == {"Adam->LM default", "Adam->LM"}
    assert all(row.gauss_newton for row in lm)  # LM takes the residual form


def test_lm_rows_are_skipped_with_a_note_when_absent(capsys):
    module = benchmark_module()
    args = argparse.Namespace(problems=[], families=None, float32=False, seeds=[0])
    module.main_suite(args, {})
    out = capsys.readouterr().out
    absent = getattr(tp, "levenberg_marquardt", None) is None
    assert ("Adam->LM rows are skipped" in out) == absent
    assert (module.levenberg_marquardt() is None) == absent


def test_at_wall_reads_the_last_point_at_or_before_the_time():
    module = benchmark_module()
    curve = {
        "wall": [0.0, 1.0, 2.0, 3.0],
        "loss": [4.0, 3.0, 2.0, 1.0],
        "error": [0.4, 0.3, 0.2, 0.1],
        "cost": [0, 10, 20, 30],
    }
    assert module.at_wall(curve, 2.5) == {"loss": 2.0, "error": 0.2, "cost": 20.0, "wall": 2.0}
    assert module.at_wall(curve, 2.0)["loss"] == 2.0
    assert module.at_wall(curve, 9.0)["loss"] == 1.0
    assert module.spread([3.0, 1.0, 2.0]) == "2.00e+00 [1.00e+00, 3.00e+00]"


def tiny_run(*args: str) -> str:
    return run_script(
        "pinn.py",
        *("--problems", "oscillator", "--budget", "24", "--width", "4", "--depth", "1"),
        *("--residual", "12", "--grid", "4", "4", "--adam-lrs", "1e-2", "3e-2"),
        *("--log-points", "3", "--families", "Adam->L-BFGS default", *args),
    )


def check_runs(runs: dict, budget: int = 24) -> None:
    assert set(runs) == {"Adam", "Adam->L-BFGS default"}
    for run in runs.values():
        assert run["cost"] <= budget and math.isfinite(run["l2"]) and run["l2"] > 0
        curve = run["curve"]
        assert curve["cost"][0] == 0 and curve["cost"][-1] == run["cost"]
        assert len(curve["error"]) == len(curve["wall"]) == len(curve["loss"])
        assert curve["error"][-1] == run["l2"]
        assert run["at_wall"]["wall"] <= max(runs["Adam"]["wall"], curve["wall"][0])
    assert runs["Adam"]["cost"] == budget  # one evaluation a step


@pytest.mark.slow
def test_suite_runs_end_to_end_on_the_smallest_problem(tmp_path):
    # One process: the tuning seed 0, then the validation seed 2 with its choices; two
    # training loops compile (Adam's and the default policy's): ~20 s of CPU.
    out_json, figure = tmp_path / "pinn.json", tmp_path / "pinn.png"
    out = tiny_run("--seeds", "0", "2", "--out", str(out_json), "--figure", str(figure))
    assert "Tuning seeds [0]" in out and "Validation seeds [2]" in out
    assert "Command: `" in out and "Summary" in out
    result = json.loads(out_json.read_text())["results"]["oscillator"]
    assert result["tuning_seeds"] == [0] and result["validation_seeds"] == [2]
    assert result["best"] == {"Adam->L-BFGS default": "Adam->L-BFGS default"}
    assert result["best_lr"] in (1e-2, 3e-2)
    check_runs(result["runs"]["0"])
    check_runs(result["runs"]["2"])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # two processes, four compilations: ~40 s of CPU
def test_validation_run_takes_an_earlier_runs_choices(tmp_path):
    tuning_json, validation_json = tmp_path / "tuning.json", tmp_path / "validation.json"
    figure = tmp_path / "pinn.png"
    out = tiny_run("--seeds", "0", "--out", str(tuning_json))
    assert "Tuning seeds [0]" in out and "Validation seeds" not in out
    tuned = json.loads(tuning_json.read_text())["results"]["oscillator"]
    assert tuned["tuning_seeds"] == [0] and tuned["validation_seeds"] == []
    out = tiny_run("--seeds", "2", "--tuned", str(tuning_json), "--out", str(validation_json))
    assert "Validation seeds [2]" in out and "Tuning seeds" not in out
    result = json.loads(validation_json.read_text())["results"]["oscillator"]
    assert result["best_lr"] == tuned["best_lr"] and result["best"] == tuned["best"]
    assert result["validation_seeds"] == [2] and set(result["runs"]) == {"2"}
    check_runs(result["runs"]["2"])
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from pinn_figure import main as figure_main
    finally:
        sys.path.remove(str(BENCHMARKS))
    figure_main([str(validation_json), str(figure)])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
