"""Smoke tests of the scripts in ``benchmarks/``: each runs at a tiny size in a subprocess
(as a user would, from the ``benchmarks`` folder) and its printed table is checked for the
rows and the invariants the full-size run reports (costs within budget, finite losses, the
state-size ratio). They catch scripts broken by API changes; the numbers themselves are
measured by the full runs recorded in ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(*args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, *args],
        cwd=BENCHMARKS,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Markdown table rows whose first cell is ``first_cell``, as lists of stripped cells."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


@pytest.mark.slow  # 10 methods, each compiled: ~2 minutes on 2 shared cores
def test_switching_costs_within_budget():
    budget = 6
    out = run_script(
        "switching.py", "--quick", "--budget", str(budget), "--problems", "teacher-student-small"
    )
    rows = [r for r in table_rows(out, "teacher-student-small") if len(r) == 9]
    methods = [r[1] for r in rows]
    assert len(methods) == 10, methods  # Adam alone + 9 two-phase methods
    assert methods[0].startswith("Adam alone")
    for row in rows:
        cost, loss = float(row[6]), float(row[7])
        assert cost <= budget, row
        assert math.isfinite(loss) and loss > 0, row
    assert float(rows[0][8]) == 1.0  # Adam's ratio to itself


@pytest.mark.slow  # the basin study (RESULTS section 3): ~25 s of compilations
def test_basin_rows_and_spectrum():
    out = run_script("basin.py", "--budget", "4", "--splits", "1", "2")
    rows = [r for r in (table_rows(out, "1") + table_rows(out, "2")) if len(r) == 10]
    rows += table_rows(out, "never (Adam only)")
    assert len(rows) == 3, out
    for row in rows:
        assert math.isfinite(float(row[3])), row  # final loss
        assert float(row[6]) <= float(row[7]), row  # min eigenvalue <= max eigenvalue
        assert 0 <= int(row[9]) <= 49, row  # negative eigenvalues of a 49x49 Hessian
    assert rows[-1][1] == "0"  # the last row never runs CG


def run_grid(tmp_path, *options: str, epochs: int = 2) -> tuple[str, dict]:
    """experiment_grid.py on 256 digits images, mlp, ``epochs`` epoch-equivalents:
    (stdout, result)."""
    out_json = tmp_path / "grid.json"
    out = run_script(
        "experiment_grid.py",
        *("--dataset", "digits", "--epochs", str(epochs), "--models", "mlp"),
        *("--max-train", "256"),
        *options,
        *("--out", str(out_json)),
    )
    (result,) = json.loads(out_json.read_text())
    return out, result


@pytest.mark.slow
def test_experiment_grid_records(tmp_path):
    out, result = run_grid(tmp_path, "--splits", "0.3", epochs=10)
    assert table_rows(out, "mlp"), out
    assert set(result["records"]) == {"adam", "cg", "adam+cg auto", "adam+cg after 3"}
    records = result["records"]
    for record in records.values():
        # Equal cost, strictly: never above the budget (a CG iteration that would end
        # above it is discarded), and below it by less than one CG iteration.
        assert 5 < record["cost_epochs"] <= 10
        assert math.isfinite(record["train_loss"])
    assert records["adam"]["cost_epochs"] == 10.0
    assert records["adam+cg auto"]["switch_epoch"] is None  # too short to switch: Adam's run
    assert records["adam+cg auto"]["train_loss"] == records["adam"]["train_loss"]
    assert records["adam+cg after 3"]["switch_epoch"] == 4  # 3 Adam epochs, CG from epoch 4


@pytest.mark.slow  # ~9 s
def test_experiment_grid_skip_auto(tmp_path):
    out, result = run_grid(tmp_path, "--splits", "--skip-cg", "--skip-auto")
    (row,) = table_rows(out, "mlp")[-1:]
    assert row[5] == "not run" and row[6] == "not run", row
    assert set(result["records"]) == {"adam"}


@pytest.mark.slow  # a finished study (the polish is now safe_resort's): ~25 s
def test_final_polish_rows():
    out = run_script("final_polish.py", "--budgets", "10", "--checks", "2")
    for name in ("teacher-student-small", "teacher-student", "digits", "friedman1"):
        (row,) = table_rows(out, name)
        assert math.isfinite(float(row[2])) and math.isfinite(float(row[3])), row


def test_overhead_state_sizes():
    out = run_script("overhead.py", "--state-only")
    assert "Train step" not in out  # no timing
    # the state table's rows end with "N (+B B)": parameter-sized buffers and the rest
    (adam,) = [row for row in table_rows(out, "optax.adam") if "(+" in row[-1]]
    assert adam[2] == "1.000" and adam[3].startswith("2 "), adam
    # tp.adam_cg holds Adam's two buffers and CG's two: twice Adam's state, plus scalars.
    (default,) = table_rows(out, "tp.adam_cg (default)")
    assert abs(float(default[2]) - 2.0) < 1e-3, default
    (lbfgs,) = table_rows(out, "optax.lbfgs(memory_size=10)")
    assert float(lbfgs[2]) > float(default[2])


@pytest.mark.slow
def test_cg_suite_converges_on_rosenbrock():
    out = run_script("cg_suite.py", "--quick", "--problems", "rosenbrock-2", "--starts", "1")
    (row,) = table_rows(out, "rosenbrock-2")
    evals = int(row[2].split()[0])  # twophase polak_ribiere: "evaluations (iterations)"
    assert 0 < evals < 5000, row


def test_full_batch_memory_rows():
    sizes = ("64", "256")
    out = run_script(
        "full_batch_memory.py",
        "--examples",
        "256",
        "--features",
        "8",
        "--hidden",
        "8",
        "--batch-sizes",
        *sizes,
    )
    for size in sizes:
        (row,) = table_rows(out, size)
        assert float(row[2]) >= 0, row


@pytest.mark.slow
def test_second_phase_memory_rows():
    out = run_script("second_phase_memory.py", "--n", "65536")
    # State sizes follow from the states' documented fields: Newton-CG keeps `grad`, CG
    # `grad` and `direction`, the Nystrom variant 60 sketch columns more, L-BFGS(10) 23.
    expected_state = {
        "tp.nonlinear_cg()": 2,
        "tp.newton_cg()": 1,
        "tp.newton_cg(preconditioner=diagonal)": 2,
        "tp.newton_cg(preconditioner='nystrom'), sketch 60": 61,
        "optax.lbfgs(memory_size=10) (evaluating)": 23,
    }
    for name, buffers in expected_state.items():
        (row,) = table_rows(out, name)
        assert round(float(row[1])) == buffers, row
        assert float(row[2]) >= 0, row
    assert "free product" in out


@pytest.mark.slow  # the timing path; test_overhead_state_sizes runs the script fast
def test_overhead_train_only_at_another_batch():
    out = run_script(
        "overhead.py", "--rounds", "1", "--batch", "64", "--hidden", "32", "--train-only"
    )
    assert "batch 64," in out and "MLP 784-32-10 " in out
    timing, temp = table_rows(out, "tp.adam_cg (default detector)")  # train step, temp sizes
    assert len(timing) == 4 and float(temp[1]) > 0, (timing, temp)
    assert "Optimizer state" not in out


@pytest.mark.parametrize(
    "args, named",
    [
        (["--batch", "0"], "--batch"),
        (["--train-only", "--state-only"], "--state-only"),
        (["--hidden", "0"], "--hidden"),
    ],
)
def test_overhead_rejects_bad_options(args, named):
    done = subprocess.run(
        [sys.executable, "overhead.py", *args],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and named in done.stderr


def gpu_repro(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_repro.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gpu_repro_dry_run_commands_parse():
    """No GPU here, so the script's runs are checked without running them: every command it
    would run is accepted by ``python -m twophase``'s parser and the plan covers the paper's
    five models on both bundled data sets with the 30% split, auto and the late
    preconditioned split."""
    from twophase.experiments.cli import build_parser

    done = gpu_repro("--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    pinn_lines = [line for line in lines if line.startswith("python benchmarks/pinn.py")]
    assert_pinn_commands_parse(pinn_lines)
    lines = [line for line in lines if line not in pinn_lines]
    parser = build_parser()
    runs = set()
    out_dirs = set()
    for line in lines:
        words = line.split()
        assert words[:3] == ["python", "-m", "twophase"], line
        args = parser.parse_args(words[3:])
        epochs = 700 if args.model == "vit-mlp" else 1000
        assert args.epochs == epochs and args.no_progress, line
        if args.switch == "auto":
            kind = "auto"
        elif args.precondition:
            assert args.switch == epochs * 9 // 10, line
            kind = "late-preconditioned"
        else:
            assert args.switch == epochs * 3 // 10, line
            kind = "paper-30%"
        runs.add((args.dataset, args.model, kind))
        out_dirs.add(args.out)
    paper_models = {"vit-mlp", "vit-nomlp", "vit-nomlp-wkewq", "vit-nomlp-wkewq-wvwo"}
    paper_models.add("vgg5-max-relu")
    expected = {
        (dataset, model, kind)
        for dataset in ("mnist5k", "digits")
        for model in paper_models
        for kind in ("auto", "late-preconditioned", "paper-30%")
    }
    assert runs == expected
    assert len(out_dirs) == len(lines) == len(expected)  # no two runs share a directory


def pinn_benchmark_module():
    """benchmarks/pinn.py imported as a module (its ``main`` does not run)."""
    spec = importlib.util.spec_from_file_location("pinn_benchmark", BENCHMARKS / "pinn.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))  # for its `from _problems import ...`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def assert_pinn_commands_parse(lines: list[str]) -> None:
    """The PINN runs: one ``--full`` run per problem, each accepted by pinn.py's parser, each
    writing its own JSON file."""
    parser = pinn_benchmark_module().build_parser()
    problems, outs = [], set()
    for line in lines:
        words = line.split()
        assert words[:2] == ["python", "benchmarks/pinn.py"], line
        args = parser.parse_args(words[2:])
        assert args.full and len(args.problems) == 1 and args.out.endswith(".json"), line
        problems += args.problems
        outs.add(args.out)
    from twophase.experiments.pinn import PROBLEM_NAMES

    assert sorted(problems) == sorted(PROBLEM_NAMES)
    assert len(outs) == len(PROBLEM_NAMES)


def test_gpu_repro_pinn_only_dry_run():
    done = gpu_repro("--pinn", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert_pinn_commands_parse(done.stdout.splitlines())
    done = gpu_repro("--pinn", "--bounded")
    assert done.returncode == 2 and "exclude" in done.stderr


def test_pinn_default_rows_are_known_methods():
    module = pinn_benchmark_module()
    names = [m.name for m in module.METHODS]
    assert len(set(names)) == len(names)
    assert set(module.DEFAULT_METHODS) <= set(names), set(module.DEFAULT_METHODS) - set(names)
    # Each second phase and each preset's default policy is in the default table.
    for row in ("L-BFGS", "Adam->L-BFGS 11/41", "Adam->CG 11/41", "Adam->Newton-CG nystrom 1/41"):
        assert row in module.DEFAULT_METHODS
    assert sum(row.endswith(" default") for row in module.DEFAULT_METHODS) == 3


def test_pinn_lbfgs_share_sets_the_third_stage_and_is_checked():
    module = pinn_benchmark_module()
    first = module.switch_step(3000, 11)
    for share in (0.25, 0.5, 0.75):
        settings = module.settings(module.build_parser().parse_args(["--lbfgs-share", str(share)]))
        step = module.newton_cg_step(3000, 11, settings["lbfgs_share"])
        assert step - first == round(share * (3000 - first))
    for bad in ("0", "1", "-0.5"):
        with pytest.raises(SystemExit, match="--lbfgs-share"):
            module.settings(module.build_parser().parse_args(["--lbfgs-share", bad]))


@pytest.mark.slow  # every METHODS row compiles: minutes on 2 shared cores
def test_pinn_rows_within_budget(tmp_path):
    budget = 24
    out_json = tmp_path / "pinn.json"
    out = run_script(
        "pinn.py",
        *("--problems", "wave", "--budget", str(budget), "--width", "6", "--depth", "2"),
        *("--residual", "30", "--grid", "11", "7", "--adam-lrs", "1e-2", "3e-2"),
        *("--log-points", "2", "--all", "--out", str(out_json)),
    )
    module = pinn_benchmark_module()
    rows = [r for r in table_rows(out, "wave") if len(r) == 17]
    names = [r[1] for r in rows]
    assert names == ["Adam (best lr)", *(m.name for m in module.METHODS)], names
    for row in rows:
        loss, grid_residual, l2, cost = float(row[2]), float(row[8]), float(row[9]), float(row[10])
        evals, hvps = int(row[11]), int(row[12])
        assert cost == evals + 1.5 * hvps, row  # an HVP counts HVP_COST = 1.5 evaluations
        assert math.isfinite(loss) and loss > 0 and math.isfinite(l2), row
        assert math.isfinite(grid_residual) and grid_residual > 0, row
        assert cost <= budget, row
        terms = [float(c) for c in row[4:8]]  # boundary, initial, initial_velocity, residual
        assert abs(sum(terms) - loss) <= 0.02 * loss, row  # printed to 3 digits
    assert rows[0][16] == "0.0203 / 0.349"  # the anchor's Adam row
    assert float(rows[0][3]) == 1.0
    (summary,) = table_rows(out, "Adam (best lr)")[-1:]
    assert summary[2] == "0.0203 / 0.349", summary
    assert "Command: `" in out
    result = json.loads(out_json.read_text())["results"]["wave"]
    assert set(result["rows"]) == set(names)
    switches = {name: r["switch_cost"] for name, r in result["rows"].items()}
    assert switches["Adam->CG 11/41"] == module.switch_step(budget, 11) == 6
    assert switches["L-BFGS"] is None
    newton = result["rows"]["Adam->L-BFGS->Newton-CG 1/41"]
    assert len(newton["zero_steps"]) == 2  # L-BFGS's and Newton-CG's


def test_gpu_repro_bounded_dry_run_and_bad_options():
    done = gpu_repro("--bounded", "--dry-run")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert "--dataset mnist5k --model vit-nomlp --epochs 60 --switch 18" in line
    for args, message in [(("--bogus",), "unknown option --bogus"), (("--python",), "--python")]:
        done = gpu_repro(*args)
        assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.slow  # ~6 s
def test_cg_suite_newton_cg_rows():
    out = run_script(
        "cg_suite.py", "--quick", "--newton-cg", "--skip-hvp-cost", "--problems", "rosenbrock-2"
    )
    (row,) = table_rows(out, "rosenbrock-2")
    evals, _, hvps = row[1].split()[:3]  # twophase newton_cg: "evals + HVPs (iterations)"
    assert 0 < int(evals) < 5000 and 0 < int(hvps) < 5000, row
    assert 0 < float(row[-2]) <= 1.5, row  # cost ratio to scipy's Newton-CG


@pytest.mark.slow
def test_policy_rows_within_budget_and_report_roundtrip(tmp_path):
    budget, saved = 8, tmp_path / "runs.jsonl"
    out = run_script(
        "policy.py", "--budgets", str(budget), "--problems", "teacher-student-small",
        "--splits", "2", "--sweep-budget", str(budget), "--save", str(saved),
    )  # fmt: skip
    rows = table_rows(out.split("## All runs")[1], "teacher-student-small")
    methods = [r[2] for r in rows]
    assert methods[0] == "adam" and "new default" in methods and "paper rule" in methods
    for row in rows:
        assert float(row[5]) <= budget, row  # strict equal cost
        assert math.isfinite(float(row[6])) and float(row[6]) > 0, row
    assert float(rows[0][7]) == 1.0  # Adam's ratio to itself
    assert "No harm" in out and "geometric mean" in out
    # The saved runs print the same summary again.
    again = run_script("policy.py", "--report", str(saved))
    assert (
        again.split("## Summary")[1].split("## All runs")[0]
        == (out.split("## Summary")[1].split("## All runs")[0])
    )


@pytest.mark.slow  # ~17 s
def test_trace_policy_prints_the_policy_account_per_step():
    out = run_script("trace_policy.py", "iris", "--steps", "4")
    lines = out.strip().splitlines()
    assert lines[0].startswith("iris seed 0")
    steps = [line for line in lines[1:] if "policy: cost" in line]
    assert len(steps) == 4
    # a full-batch loop is recognised: the policy's account advances one per Adam step
    assert "cost 1 " in steps[0].split("|")[1] or "cost 1 pace" in steps[0]
