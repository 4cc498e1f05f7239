"""Tests of ``python -m twophase`` (twophase.experiments.cli)."""

import csv
import json
import math

import pytest

from twophase.experiments import cli, runner

FAST = [
    "--dataset",
    "digits",
    "--model",
    "mlp",
    "--epochs",
    "6",
    "--batch-size",
    "128",
    "--max-train",
    "256",
    "--no-progress",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main([*FAST, "--switch", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_outputs_written(run_dir):
    for name in ("results.json", "history.csv", "grad_norm_vs_loss.png", "loss_vs_cost.png"):
        assert (run_dir / name).is_file(), name
    for name in ("grad_norm_vs_loss.png", "loss_vs_cost.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json(run_dir):
    records = json.loads((run_dir / "results.json").read_text())
    assert isinstance(records, list) and len(records) == 3
    assert [r["optimizer"] for r in records] == ["adam", "adam+cg", "cg"]
    for r in records:
        assert set(r) == set(runner.RECORD_KEYS)
        assert r["model"] == "mlp" and r["dataset"] == "digits"
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "wall_seconds", "Q"):
            assert math.isfinite(r[key])
        assert 0 < r["cost_epochs"] <= 6  # never above the budget (strict_budget)
        assert isinstance(r["params"], int) and r["params"] > 0
    assert records[0]["switch_epoch"] is None
    assert records[1]["switch_epoch"] == 3  # --switch 2: the first CG epoch is 3
    assert records[2]["switch_epoch"] is None


@pytest.mark.slow
def test_precondition_flag_reaches_adam_cg(tmp_path, capsys, run_dir):
    out = tmp_path / "pre"
    assert cli.main([*FAST, "--switch", "2", "--precondition", "--out", str(out)]) == 0
    assert "CG preconditioned by Adam's second moments" in capsys.readouterr().out
    plain = json.loads((run_dir / "results.json").read_text())
    pre = json.loads((out / "results.json").read_text())
    assert pre[0]["train_loss"] == plain[0]["train_loss"]  # Adam alone: unchanged
    assert pre[1]["switch_epoch"] == plain[1]["switch_epoch"] == 3
    assert pre[1]["train_loss"] != plain[1]["train_loss"]  # the CG phase is preconditioned


def test_history_csv(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    expected = {
        "run",
        "epoch",
        "phase",
        "train_loss",
        "grad_norm",
        "cost",
        "epoch_cost",
        "wall_seconds",
        "val_loss",
        "train_acc",
        "val_acc",
        "cg_iterations",
        "linesearch_failures",
    }
    assert expected <= columns
    assert {r["run"] for r in rows} == {"adam", "adam+cg", "cg"}
    adam = [r for r in rows if r["run"] == "adam"]
    assert [int(r["epoch"]) for r in adam] == [1, 2, 3, 4, 5, 6]
    assert float(adam[-1]["cost"]) == 6.0
    assert {r["cg_iterations"] for r in adam} == {""}  # optax.adam holds no CG
    cg = [int(r["cg_iterations"]) for r in rows if r["run"] == "cg"]
    assert cg == list(range(1, len(cg) + 1))  # one CG iteration per epoch


def test_existing_out_dir_gets_suffix(tmp_path, capsys, monkeypatch, run_dir):
    # Reuse the module's trained runs: this test is about the directory, not the training.
    trained = _results_from(run_dir)
    monkeypatch.setattr(runner, "run_comparison", lambda *args, **kwargs: trained)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (tmp_path / "run-1").mkdir()
    assert cli.main([*FAST, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # Below the table: what Adam+CG did and where it ended against Adam.
    adam, two_phase = (r.record for r in trained[:2])
    ratio = two_phase["train_loss"] / adam["train_loss"]
    assert f"adam+cg: {two_phase['explanation']}. Ends at {ratio:.3f}x Adam's" in printed
    assert str(tmp_path / "run-2") in printed
    assert (tmp_path / "run-2" / "results.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched


def _results_from(run_dir):
    records = json.loads((run_dir / "results.json").read_text())
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    results = []
    for rec in records:
        history = [
            {
                "epoch": int(r["epoch"]),
                "phase": int(r["phase"]),
                "cost": float(r["cost"]),
                "train_loss": float(r["train_loss"]),
                "grad_norm": float(r["grad_norm"]),
            }
            for r in rows
            if r["run"] == rec["optimizer"]
        ]
        results.append(runner.RunResult(rec, history, "cost_budget"))
    return results


def test_unique_out_dir(tmp_path):
    assert cli.unique_out_dir(tmp_path / "a") == tmp_path / "a"
    (tmp_path / "a").mkdir()
    assert cli.unique_out_dir(tmp_path / "a") == tmp_path / "a-1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet"], "invalid choice: 'resnet'"),
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--switch", "soon"], "expected 'auto' or an epoch number"),
        (["--switch", "0"], "expected 'auto' or an epoch number"),
        (["--epochs", "0"], "expected a positive integer"),
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
    ],
)
def test_bad_arguments(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    if "invalid choice" in message:
        assert "choose from" in err  # the valid choices are listed


def test_model_choices_listed(capsys):
    assert cli.main(["--model", "resnet"]) == 2
    err = capsys.readouterr().err
    for name in ("vit-mlp", "vgg5-max-relu", "mlp"):
        assert name in err


def test_data_dir_without_files(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "t10k-labels-idx1-ubyte" in err
    assert "Traceback" not in err
    assert err.count("\n") == 1  # one clean line
    assert not out.exists()  # nothing created on bad input


def test_file_dataset_without_data_dir(capsys):
    assert cli.main(["--dataset", "cifar10"]) == 2
    assert "data_dir" in capsys.readouterr().err


def test_help_mentions_suffix(capsys):
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "numeric suffix" in out
    assert "--no-progress" in out


def test_defaults():
    args = cli.build_parser().parse_args([])
    assert args.dataset == cli.DEFAULTS["dataset"] and args.model == cli.DEFAULTS["model"]
    assert args.batch_size == 512 and args.switch == "auto" and args.loss == "mse"
    assert args.out is None and not args.no_progress and not args.precondition
    assert cli.build_parser().parse_args(["--precondition"]).precondition


@pytest.mark.slow
def test_sweep_flag(tmp_path):
    out = tmp_path / "sweep"
    assert cli.main([*FAST, "--sweep", "--out", str(out)]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["best_switch_after"] in [r["switch_after"] for r in sweep["runs"]]


def test_progress_in_a_log_file_is_a_few_plain_lines(tmp_path, monkeypatch):
    # `python -m twophase > log 2>&1`: the bar used to redraw after every epoch, joined by
    # carriage returns ("training: 0/6 epoch-equivalent training: 1/6 ...").
    import re
    import sys

    log = tmp_path / "log"
    args = [a for a in FAST if a != "--no-progress"]
    with open(log, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setattr(sys, "stderr", stream)
        code = cli.main([*args, "--switch", "2", "--out", str(tmp_path / "run")])
        monkeypatch.undo()
    assert code == 0
    text = log.read_text()
    assert "\r" not in text
    progress = [line for line in text.splitlines() if line.startswith("training")]
    # Three runs (adam, adam+cg, cg) of a few seconds each: the last epoch's line of each, and
    # at most one line per 30 s besides.
    assert 3 <= len(progress) <= 6, progress
    pattern = (
        r"training: epoch \d+, cost [\d.]+/6 epoch-equivalents, phase [01], "
        r"loss [-+.\de]+, grad norm [-+.\de]+"
    )
    assert all(re.fullmatch(pattern, line) for line in progress), progress
    assert len(text.splitlines()) < 40
