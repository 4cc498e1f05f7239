"""Tests of twophase.experiments.runner: the equal-cost comparison and the fixed-split sweep."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp
from twophase.experiments import runner

TINY = {"dataset": "digits", "model": "mlp", "max_train": 256, "max_val": 128, "progress": False}


@pytest.fixture(scope="module")
def problem():
    return runner.build_problem(runner.ExperimentConfig(epochs=8, batch_size=64, **TINY))


@pytest.fixture(scope="module")
def comparison(problem):
    config = runner.ExperimentConfig(epochs=8, batch_size=64, switch=2, **TINY)
    return runner.run_comparison(config, problem=problem)


def test_problem_is_pure_and_counts_params(problem):
    assert problem.num_params == sum(x.size for x in jax.tree.leaves(problem.params))
    # mlp on 8x8 digits: 64*64 + 64 + 64*10 + 10.
    assert problem.num_params == 4810
    assert problem.q == pytest.approx(256 * 10 / 4810)
    assert problem.steps_per_epoch == 256 // 64
    value = jax.jit(problem.loss_fn)(problem.params, problem.data)
    assert value.shape == () and math.isfinite(float(value))


@pytest.mark.slow  # the comparison fixture: ~40 s; the CLI tests run the runner
def test_records_schema_and_values(comparison):
    assert [r.record["optimizer"] for r in comparison] == list(runner.OPTIMIZERS)
    for r in comparison:
        rec = r.record
        assert tuple(rec) == runner.RECORD_KEYS
        assert rec["model"] == "mlp" and rec["dataset"] == "digits"
        for key in ("train_loss", "val_loss", "wall_seconds", "Q"):
            assert math.isfinite(rec[key]) and rec[key] > 0, key
        for key in ("train_acc", "val_acc"):
            assert 0.0 <= rec[key] <= 1.0
        assert rec["params"] == 4810
        assert r.stop_reason == "cost_budget"


@pytest.mark.slow
def test_equal_cost_never_above_the_budget(comparison):
    for r in comparison:
        cost = r.record["cost_epochs"]
        # Never above the budget (strict_budget): a CG iteration that would end above it is
        # discarded, so a run ends less than about one CG iteration below it.
        assert 8 - max(h["epoch_cost"] for h in r.history) < cost <= 8
        assert cost == pytest.approx(sum(h["epoch_cost"] for h in r.history))
    adam, adam_cg, _ = comparison
    assert adam.record["cost_epochs"] == 8 and len(adam.history) == 8
    # Here Adam+CG's next CG iteration would have ended above 8: it stopped at 7.
    assert adam_cg.record["cost_epochs"] == 7


@pytest.mark.slow
def test_fixed_switch_convention(comparison):
    adam, adam_cg, cg = comparison
    assert adam.record["switch_epoch"] is None
    assert cg.record["switch_epoch"] is None
    # --switch 2: two Adam epochs, the first CG epoch is 3.
    assert adam_cg.record["switch_epoch"] == 3
    assert [h["phase"] for h in adam_cg.history[:3]] == [0, 0, 1]
    assert all(h["phase"] == 1 for h in cg.history)
    # Same initial weights and shuffling: Adam+CG follows Adam until its switch.
    for a, b in zip(adam.history[:2], adam_cg.history[:2], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_switch_epoch_helper():
    two_phase = [
        {"epoch": 1, "phase": 0, "switch_step": -1},
        {"epoch": 2, "phase": 1, "switch_step": 4},
    ]
    assert runner.switch_epoch(two_phase) == 2
    assert runner.switch_epoch(two_phase[:1]) is None
    assert runner.switch_epoch([{"epoch": 1, "phase": 0, "switch_step": None}]) is None
    assert runner.switch_epoch([]) is None


def test_auto_switch_runs(problem):
    config = runner.ExperimentConfig(epochs=6, batch_size=64, **TINY)
    (result,) = runner.run_comparison(config, ("adam+cg",), problem=problem)
    switch = result.record["switch_epoch"]
    assert switch is None or 2 <= switch <= len(result.history)
    # The default policy's trials and returns, in one line (from the history's phases).
    phases = [r["phase"] for r in result.history]
    explanation = result.record["explanation"]
    assert explanation.startswith("never switched" if 1 not in phases else "CG tried")


def test_sweep_fixed_splits_logic(problem, monkeypatch):
    calls = []

    def fake_run_one(config, optimizer, *, problem=None, switch=None):
        calls.append((optimizer, switch))
        record = {
            "train_loss": {1: 0.3, 3: 0.1, 4: float("nan")}[switch],
            "switch_epoch": switch + 1,
        }
        return runner.RunResult(record, [], "cost_budget")

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    config = runner.ExperimentConfig(epochs=6, **TINY)
    sweep = runner.sweep_fixed_splits(config, fractions=(0.2, 0.5, 0.51, 0.7), problem=problem)
    # round(0.5 * 6) == round(0.51 * 6): deduplicated; a NaN loss is never the best.
    assert calls == [("adam+cg", 1), ("adam+cg", 3), ("adam+cg", 4)]
    assert list(sweep.runs) == [1, 3, 4]
    assert sweep.best_epoch == 3 and sweep.best is sweep.runs[3]


@pytest.mark.slow
def test_sweep_fixed_splits(problem):
    config = runner.ExperimentConfig(epochs=6, batch_size=64, **TINY)
    sweep = runner.sweep_fixed_splits(config, fractions=(0.2, 0.5), problem=problem)
    assert list(sweep.runs) == [1, 3]
    for k, run in sweep.runs.items():
        assert run.record["switch_epoch"] == k + 1
    losses = {k: run.record["train_loss"] for k, run in sweep.runs.items()}
    assert sweep.best_epoch == min(losses, key=losses.get)


def test_sweep_rejects_bad_fractions():
    config = runner.ExperimentConfig(epochs=6, **TINY)
    for fractions in ((), (0.0,), (1.0,)):
        with pytest.raises(ValueError, match="fractions"):
            runner.sweep_fixed_splits(config, fractions=fractions)


def test_split_epochs():
    assert runner.split_epochs(10, (0.1, 0.5, 0.9)) == [1, 5, 9]
    assert runner.split_epochs(3, (0.01, 0.99)) == [1, 2]


@pytest.mark.slow
def test_markdown_table(comparison):
    table = runner.markdown_table([r.record for r in comparison])
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 3
    assert lines[0].startswith("| run | train loss | train acc | val loss | val acc")
    assert "| adam+cg |" in table
    # Below the table, one line explains what the two-phase run did.
    assert table.splitlines()[-1].startswith("adam+cg: ")


def _record(optimizer, train_loss, explanation=None):
    return {
        "optimizer": optimizer,
        "train_loss": train_loss,
        "train_acc": 1.0,
        "val_loss": 0.02,
        "val_acc": 0.9,
        "switch_epoch": None,
        "explanation": explanation,
        "cost_epochs": 1000.0,
        "wall_seconds": 1.0,
        "params": 5,
        "Q": 1.0,
    }


def test_markdown_table_explanation_ends_with_the_ratio_to_adam():
    what = "CG tried 2x (epochs 7, 960), returned to Adam 1x; CG from epoch 960 to the end"
    above = runner.markdown_table(
        [_record("adam", 0.00078), _record("adam+cg", 0.000897, what), _record("cg", 0.0024)]
    )
    assert above.splitlines()[-1] == (
        f"adam+cg: {what}. Ends at 1.150x Adam's training loss (0.000897 vs 0.000780): "
        "not below Adam"
    )
    below = runner.markdown_table([_record("adam", 0.002), _record("adam+cg", 0.0018, what)])
    assert below.splitlines()[-1].endswith(
        "Ends at 0.900x Adam's training loss (0.001800 vs 0.002000): below Adam"
    )
    # Without an Adam run (the sweep's table) or a finite loss: the explanation alone.
    alone = runner.markdown_table([_record("adam+cg", 0.0018, what)])
    assert alone.splitlines()[-1] == f"adam+cg: {what}"
    nan = runner.markdown_table([_record("adam", 0.002), _record("adam+cg", math.nan, what)])
    assert nan.splitlines()[-1] == f"adam+cg: {what}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "resnet"}, "valid choices: vit-mlp"),
        ({"dataset": "imagenet"}, "valid choices: digits"),
        ({"loss": "hinge"}, "valid choices: mse, xent"),
        ({"switch": 0}, "`switch`"),
        ({"switch": "soon"}, "`switch`"),
        ({"epochs": 0}, "`epochs`"),
        ({"lr": -1.0}, "`lr`"),
        ({"precondition": "yes"}, "`precondition`"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        runner.ExperimentConfig(**kwargs)


def test_make_optimizer_precondition_reaches_adam_cg():
    """``precondition=True`` gives CG Adam's second moments at the switch: the first CG update
    equals ``tp.adam_cg(precondition=True)``'s and differs from the plain one's."""
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    scales = jnp.array([1.0, 10.0, 0.1])

    def value_fn(p):
        return 0.5 * jnp.sum(scales * p["w"] ** 2)

    def first_cg_update(tx):
        state = tx.init(params)
        p = params
        for _ in range(2):  # one Adam step (then the switch), then one CG step
            value, grad = jax.value_and_grad(value_fn)(p)
            updates, state = tx.update(grad, state, p, value=value, value_fn=value_fn)
            p = optax.apply_updates(p, updates)
        return updates["w"]

    made = runner.make_optimizer("adam+cg", lr=1e-2, steps_per_epoch=1, switch=1, precondition=True)
    reference = tp.adam_cg(1e-2, policy=tp.switch_at(1), precondition=True)
    plain = runner.make_optimizer("adam+cg", lr=1e-2, steps_per_epoch=1, switch=1)
    np.testing.assert_allclose(first_cg_update(made), first_cg_update(reference), rtol=1e-6)
    assert not np.allclose(first_cg_update(made), first_cg_update(plain), rtol=1e-3)


def test_make_optimizer_unknown():
    with pytest.raises(ValueError, match="valid choices: adam, adam\\+cg, cg"):
        runner.make_optimizer("sgd", lr=1e-3, steps_per_epoch=1)


def test_missing_data_dir_files(tmp_path):
    config = runner.ExperimentConfig(dataset="mnist", data_dir=str(tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        runner.build_problem(config)


def test_xent_loss_runs(problem):
    config = runner.ExperimentConfig(epochs=2, batch_size=64, loss="xent", **TINY)
    (result,) = runner.run_comparison(config, ("adam",))
    assert math.isfinite(result.record["train_loss"])


@pytest.mark.slow
def test_vit_comparison():
    config = runner.ExperimentConfig(
        dataset="digits",
        model="vit-nomlp-wkewq-wvwo",
        epochs=4,
        batch_size=128,
        switch=2,
        max_train=256,
        max_val=64,
        progress=False,
    )
    results = runner.run_comparison(config)
    assert results[1].record["switch_epoch"] == 3
    for r in results:
        assert math.isfinite(r.record["train_loss"])


def test_explain_reads_trials_returns_and_the_policy_giving_up():
    history = [{"phase": p} for p in [0, 0, 1, 0, 0, 1, 0, 0, 0, 1]]
    text = runner.explain(history)
    assert text == (
        "CG tried 3x (epochs 3, 6, 10), returned to Adam 2x where CG gained less than Adam "
        "would have; CG from epoch 10 to the end"
    )
    assert "stopped trying" not in runner.explain(history, exploring=True)
    gave_up = runner.explain(history, exploring=False)
    assert "; stopped trying after two trials" in gave_up and gave_up.endswith("to the end")


def test_explanation_reads_the_policys_final_exploring_flag():
    policy = tp.safe_resort(4, budget=100.0)
    state = {"inner": (policy.init(None),)}
    assert runner._exploring(state) is True
    state = {"inner": (state["inner"][0]._replace(exploring=jnp.zeros([], bool)),)}
    assert runner._exploring(state) is False
    assert runner._exploring({"adam": optax.adam(1e-3).init(jnp.ones(2))}) is None
