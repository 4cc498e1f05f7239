"""twophase.training.train: phase-aware epochs, cost accounting, stops, checkpoints."""

from __future__ import annotations

import collections
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp
from twophase.training import TrainResult, history_columns, train

N = 512
BATCH = 128
STEPS = N // BATCH  # steps per epoch
SWITCH_EPOCHS = 2

# Loss calls actually executed, by batch size (BATCH: mini-batch, N: full batch).
CALLS: collections.Counter = collections.Counter()


def _record(size):
    CALLS[int(size)] += 1


def forward(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss_fn(params, batch):
    x, y = batch
    jax.debug.callback(_record, x.shape[0])
    return jnp.mean((forward(params, x) - y) ** 2)


def plain_loss(params, batch):
    x, y = batch
    return jnp.mean((forward(params, x) - y) ** 2)


def accuracy(params, batch):
    x, y = batch
    return jnp.mean(jnp.argmax(forward(params, x), -1) == jnp.argmax(y, -1)).astype(jnp.float32)


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = jnp.asarray(x / 16.0, jnp.float32)
    y = jax.nn.one_hot(jnp.asarray(y), 10, dtype=jnp.float32)
    return (x[:N], y[:N]), (x[N : N + 200], y[N : N + 200])


@pytest.fixture(scope="module")
def params0():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": 0.3 * jax.random.normal(k1, (64, 32)),
        "b1": jnp.zeros(32),
        "w2": 0.3 * jax.random.normal(k2, (32, 10)),
        "b2": jnp.zeros(10),
    }


# One optimizer object shared by the tests: train's compilations are cached per
# (loss_fn, optimizer, shapes), so the tests below compile it once.
ADAM_CG = tp.adam_cg(1e-2, policy=tp.switch_at(SWITCH_EPOCHS * STEPS))
ADAM = optax.adam(1e-2)


@pytest.fixture(scope="module")
def two_phase_run(digits, params0):
    CALLS.clear()
    result = train(
        loss_fn, params0, digits[0], ADAM_CG, batch_size=BATCH, max_epochs=6, progress=False
    )
    jax.effects_barrier()
    return result, dict(CALLS)


@pytest.mark.slow
def test_history_keys_and_columns(two_phase_run):
    result, _ = two_phase_run
    assert isinstance(result, TrainResult)
    assert result.stop_reason == "max_epochs"
    assert len(result.history) == 6
    expected = {
        "epoch", "phase", "steps", "train_loss", "grad_norm", "grad_norm_stat", "switch_step",
        "epoch_cost", "cost", "wall_seconds", "nonfinite", "skipped_steps", "cg_iterations",
        "linesearch_failures",
    }  # fmt: skip
    assert set(result.history[0]) == expected
    columns = history_columns(result.history)
    assert columns["epoch"] == [1, 2, 3, 4, 5, 6]
    assert columns["phase"] == [0, 0, 1, 1, 1, 1]
    assert columns["steps"] == [STEPS, STEPS, 1, 1, 1, 1]
    assert columns["grad_norm_stat"] == [None] * 6  # switch_at has no statistic
    assert columns["switch_step"][-1] == SWITCH_EPOCHS * STEPS
    assert columns["cg_iterations"] == [0, 0, 1, 2, 3, 4]  # one CG iteration per phase-1 epoch
    assert columns["linesearch_failures"][-1] == int(tp.info(result.opt_state).linesearch_failures)
    assert not any(columns["nonfinite"])
    assert all(b >= a for a, b in itertools.pairwise(columns["wall_seconds"]))
    assert history_columns([{"a": 1}, {"b": 2}]) == {"a": [1, None], "b": [None, 2]}


def test_cost_accounting_and_no_minibatch_gradients_in_phase1(two_phase_run):
    result, calls = two_phase_run
    columns = history_columns(result.history)
    assert columns["epoch_cost"][:2] == [1.0, 1.0]
    cg_costs = columns["epoch_cost"][2:]
    assert all(c >= 1 and float(c).is_integer() for c in cg_costs)
    evals = int(tp.info(result.opt_state).value_and_grad_evals)
    assert sum(cg_costs) == evals
    np.testing.assert_allclose(columns["cost"], np.cumsum(columns["epoch_cost"]))
    # Executed loss calls: mini-batches only in the two Adam epochs; full-batch
    # ones = the optimizer's evaluations + one monitoring evaluation per epoch.
    assert calls.get(BATCH, 0) == SWITCH_EPOCHS * STEPS
    assert calls[N] == evals + len(result.history)


def test_cg_epochs_decrease_loss(two_phase_run, digits, params0):
    result, _ = two_phase_run
    losses = history_columns(result.history)["train_loss"]
    assert all(b < a for a, b in itertools.pairwise(losses[SWITCH_EPOCHS - 1 :])), losses
    assert losses[-1] < 0.6 * float(plain_loss(params0, digits[0]))
    assert int(tp.info(result.opt_state).cg_iterations) == 4
    np.testing.assert_allclose(float(plain_loss(result.params, digits[0])), losses[-1], rtol=1e-5)


def test_stop_on_cost_budget(digits, params0):
    result = train(
        loss_fn, params0, digits[0], ADAM_CG, batch_size=BATCH, max_epochs=50,
        cost_budget=4.5, progress=False,
    )  # fmt: skip
    costs = history_columns(result.history)["cost"]
    assert result.stop_reason == "cost_budget"
    assert costs[-1] >= 4.5 > costs[-2]


@pytest.mark.slow
def test_strict_budget_discards_the_epoch_that_would_exceed_it(digits, params0):
    """After the switch each epoch is one CG iteration costing its evaluations (> 1 here):
    with ``strict_budget`` the iteration that would end above the budget is discarded, and
    the result equals the non-strict run stopped one epoch earlier."""
    budget = 6.0  # costs 1, 2, 5, 7, ...: the CG iteration ending at 7 would exceed it
    common = dict(batch_size=BATCH, max_epochs=50, cost_budget=budget, progress=False)
    loose = train(plain_loss, params0, digits[0], ADAM_CG, **common)
    strict = train(plain_loss, params0, digits[0], ADAM_CG, strict_budget=True, **common)
    loose_costs = history_columns(loose.history)["cost"]
    strict_costs = history_columns(strict.history)["cost"]
    assert loose_costs[-1] > budget  # the case being tested: CG overshoots without it
    assert strict.stop_reason == "cost_budget"
    assert strict_costs[-1] <= budget < strict_costs[-1] + loose.history[-1]["epoch_cost"]
    assert len(strict.history) == len(loose.history) - 1

    def timeless(history):
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in history]

    assert timeless(strict.history) == timeless(loose.history[:-1])
    shorter = train(
        plain_loss, params0, digits[0], ADAM_CG, batch_size=BATCH,
        max_epochs=len(strict.history), progress=False,
    )  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, strict.params, shorter.params)
    np.testing.assert_array_equal(
        tp.info(strict.opt_state).value_and_grad_evals,
        tp.info(shorter.opt_state).value_and_grad_evals,
    )


def test_strict_budget_keeps_the_first_epoch_and_needs_a_budget(digits, params0):
    result = train(
        plain_loss, params0, digits[0], ADAM, batch_size=BATCH, max_epochs=5,
        cost_budget=0.5, strict_budget=True, progress=False,
    )  # fmt: skip
    assert [r["cost"] for r in result.history] == [1.0]
    assert result.stop_reason == "cost_budget"
    with pytest.raises(ValueError, match="`strict_budget`"):
        train(plain_loss, params0, digits[0], ADAM, strict_budget=True, progress=False)
    with pytest.raises(ValueError, match="`strict_budget`"):
        train(plain_loss, params0, digits[0], ADAM, cost_budget=3, strict_budget=1)


@pytest.mark.slow
def test_adam_lbfgs_epochs_are_charged_their_evaluations(digits, params0):
    opt = tp.adam_lbfgs(1e-2, policy=tp.switch_at(SWITCH_EPOCHS * STEPS))
    result = train(
        plain_loss, params0, digits[0], opt, batch_size=BATCH, max_epochs=30,
        cost_budget=8, progress=False,
    )  # fmt: skip
    assert result.stop_reason == "cost_budget"
    phase1 = [r["epoch_cost"] for r in result.history if r["phase"] == 1]
    assert phase1 and all(c >= 1 for c in phase1)  # every L-BFGS step evaluates
    assert sum(phase1) == int(tp.info(result.opt_state).value_and_grad_evals)


@pytest.mark.slow  # ~15 s; MultiSteps under train: also test_multisteps_... in test_faults
def test_multisteps_wrapper_gets_value_fn(digits, params0):
    # optax.MultiSteps forwards extra arguments; train must not drop them.
    opt = optax.MultiSteps(tp.adam_cg(1e-2, policy=tp.switch_at(2)), every_k_schedule=2)
    result = train(plain_loss, params0, digits[0], opt, batch_size=BATCH, max_epochs=3,
                   progress=False)  # fmt: skip
    columns = history_columns(result.history)
    # Epoch 1: 4 mini-batches = 2 inner Adam steps, the switch. Then every phase-1 epoch
    # is one CG iteration (it used to be one every k = 2 epochs, the others doing nothing).
    assert columns["phase"] == [0, 1, 1]
    assert columns["cg_iterations"] == [0, 1, 2]
    assert columns["train_loss"][2] < columns["train_loss"][1] < columns["train_loss"][0]
    assert all(c >= 1 for c in columns["epoch_cost"][1:])  # each evaluates the objective
    # The accumulation counters are untouched in phase 1.
    assert int(result.opt_state.gradient_step) == 2


def _policy_states(state):
    is_policy = lambda node: isinstance(node, tp.policy.SafeResortState)
    return [n for n in jax.tree.leaves(state, is_leaf=is_policy) if is_policy(n)]


@pytest.mark.slow  # ~9 s
def test_multisteps_policy_counts_inner_steps(digits, params0):
    # Default policy: with k = 2, an epoch of STEPS mini-batches is STEPS / 2 inner steps.
    opt = optax.MultiSteps(tp.adam_cg(1e-2), every_k_schedule=2)
    result = train(plain_loss, params0, digits[0], opt, batch_size=BATCH, max_epochs=2,
                   progress=False)  # fmt: skip
    (policy,) = _policy_states(result.opt_state)
    assert float(policy.epoch_steps) == STEPS // 2
    np.testing.assert_allclose(float(policy.cost), result.history[-1]["cost"], rtol=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: optax.MultiSteps(tp.adam_cg(1e-2), every_k_schedule=3), "divides"),
        (lambda: optax.MultiSteps(tp.adam_cg(1e-2), lambda step: 1 + step % 2), "constant"),
        (lambda: optax.MultiSteps(tp.adam_cg(1e-2), 2).gradient_transformation(), "MultiSteps"),
        (
            lambda: optax.partition(
                {"a": optax.MultiSteps(tp.adam_cg(1e-2), 2), "b": optax.adam(1e-2)},
                {"w1": "a", "b1": "a", "w2": "b", "b2": "b"},
            ),
            "MultiSteps",
        ),
    ],
)
def test_multisteps_that_would_stall_phase_1_is_rejected(make, message, digits, params0):
    with pytest.raises(ValueError, match=message):
        train(plain_loss, params0, digits[0], make(), batch_size=BATCH, max_epochs=1,
              progress=False)  # fmt: skip


def test_stop_on_grad_tol(digits, params0):
    result = train(
        loss_fn, params0, digits[0], ADAM_CG, batch_size=BATCH, max_epochs=50,
        grad_tol=1e3, progress=False,
    )  # fmt: skip
    assert result.stop_reason == "grad_tol"
    assert len(result.history) == 1


def test_adam_only_with_metrics_val_and_progress(digits, params0):
    (train_data, val_data) = digits
    params_before = jax.tree.map(np.asarray, params0)
    result = train(
        plain_loss, params0, train_data, ADAM, batch_size=BATCH, max_epochs=8,
        val_data=val_data, metrics={"acc": accuracy}, progress=True,
    )  # fmt: skip
    columns = history_columns(result.history)
    assert set(columns["phase"]) == {0}
    assert columns["epoch_cost"] == [1.0] * 8
    assert columns["grad_norm_stat"] == [None] * 8
    assert columns["train_loss"][-1] < 0.5 * columns["train_loss"][0]
    assert columns["train_acc"][-1] > 0.6
    np.testing.assert_allclose(
        columns["val_acc"][-1], float(accuracy(result.params, val_data)), rtol=1e-5
    )
    np.testing.assert_allclose(
        columns["val_loss"][-1], float(plain_loss(result.params, val_data)), rtol=1e-5
    )
    # donation never touches the caller's parameters
    jax.tree.map(np.testing.assert_array_equal, params0, params_before)


def test_bare_cg_is_always_phase1(digits, params0):
    cg = tp.nonlinear_cg()
    result = train(plain_loss, params0, digits[0], cg, max_epochs=3, progress=False, donate=False)
    columns = history_columns(result.history)
    assert columns["phase"] == [1, 1, 1]
    assert sum(columns["epoch_cost"]) == int(tp.info(result.opt_state).value_and_grad_evals)
    assert all(b < a for a, b in itertools.pairwise(columns["train_loss"]))


def test_nonfinite_data_does_not_crash(digits, params0):
    x, y = digits[0]
    bad = (x.at[3].set(jnp.nan), y)
    result = train(loss_fn, params0, bad, ADAM_CG, batch_size=BATCH, max_epochs=3, progress=False)
    columns = history_columns(result.history)
    assert all(columns["nonfinite"])
    assert all(math.isnan(v) for v in columns["train_loss"])
    # one mini-batch per Adam epoch holds the bad example: skipped, params stay finite
    assert columns["skipped_steps"][:2] == [1, 2]
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(result.params))


def test_batch_larger_than_data_is_full_batch(digits, params0):
    x, y = digits[0]
    small = (x[:100], y[:100])
    result = train(plain_loss, params0, small, ADAM, batch_size=512, max_epochs=2, progress=False)
    assert history_columns(result.history)["steps"] == [1, 1]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"cost_budget": 0}, "cost_budget"),
        ({"cost_budget": -1.0}, "cost_budget"),
        ({"grad_tol": 0.0}, "grad_tol"),
        ({"full_batch_size": 0}, "full_batch_size"),
        ({"checkpoint_every": 2}, "checkpoint_every"),
        ({"metrics": {"acc": 3}}, "metrics"),
        ({"val_data": (jnp.zeros((3, 64)), jnp.zeros((4, 10)))}, "val_data"),
    ],
)
def test_bad_arguments(kwargs, name, params0):
    data = (jnp.zeros((8, 64)), jnp.zeros((8, 10)))
    with pytest.raises(ValueError, match=f"`{name}`"):
        train(plain_loss, params0, data, ADAM, progress=False, **kwargs)


@pytest.mark.parametrize(
    "data",
    [
        (jnp.zeros((8, 64)), jnp.zeros((7, 10))),
        (jnp.zeros((0, 64)), jnp.zeros((0, 10))),
        (),
    ],
)
def test_bad_data(data, params0):
    with pytest.raises(ValueError, match="`data`"):
        train(plain_loss, params0, data, ADAM, progress=False)


def test_checkpoint_resume(tmp_path, digits, params0):
    pytest.importorskip("twophase.checkpoint")
    pytest.importorskip("orbax.checkpoint")
    kwargs = dict(batch_size=BATCH, progress=False, seed=3)
    full = train(plain_loss, params0, digits[0], ADAM, max_epochs=4, **kwargs)

    directory = tmp_path / "ckpt"
    first = train(
        plain_loss, params0, digits[0], ADAM, max_epochs=2, checkpoint_dir=directory,
        checkpoint_every=1, **kwargs,
    )  # fmt: skip
    assert len(first.history) == 2
    from twophase.checkpoint import latest_step

    assert latest_step(directory) == 2
    resumed = train(
        plain_loss, params0, digits[0], ADAM, max_epochs=4, checkpoint_dir=directory, **kwargs
    )
    assert latest_step(directory) == 4
    assert history_columns(resumed.history)["epoch"] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        history_columns(resumed.history)["train_loss"],
        history_columns(full.history)["train_loss"],
        rtol=1e-5,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        resumed.params,
        full.params,
    )
    # A finished run resumes to nothing more.
    again = train(
        plain_loss, params0, digits[0], ADAM, max_epochs=4, checkpoint_dir=directory, **kwargs
    )
    assert len(again.history) == 4


def test_checkpoint_resume_two_phase_state(tmp_path, digits, params0):
    pytest.importorskip("twophase.checkpoint")
    pytest.importorskip("orbax.checkpoint")
    kwargs = dict(batch_size=BATCH, progress=False)
    directory = tmp_path / "ckpt"
    train(loss_fn, params0, digits[0], ADAM_CG, max_epochs=3, checkpoint_dir=directory, **kwargs)
    resumed = train(
        loss_fn, params0, digits[0], ADAM_CG, max_epochs=5, checkpoint_dir=directory, **kwargs
    )
    columns = history_columns(resumed.history)
    assert columns["phase"] == [0, 0, 1, 1, 1]
    assert int(tp.info(resumed.opt_state).cg_iterations) == 3


@pytest.mark.slow
def test_loss_plateau_detector_epoch_window(digits, params0):
    # The previous default detector, now passed explicitly (the default is safe_resort).
    optimizer = tp.adam_cg(3e-2, policy=tp.loss_plateau(STEPS, patience=5, history=10, z_score=1.0))
    result = train(
        plain_loss, params0, digits[0], optimizer, batch_size=BATCH, max_epochs=60,
        progress=False,
    )  # fmt: skip
    columns = history_columns(result.history)
    assert columns["train_loss"][-1] < 0.3 * columns["train_loss"][0]
    assert any(s is not None for s in columns["grad_norm_stat"])
    if 1 in columns["phase"]:
        first = columns["phase"].index(1)
        assert all(c == 1 for c in columns["phase"][first:])
        cg_losses = columns["train_loss"][first - 1 :]
        assert all(b <= a for a, b in itertools.pairwise(cg_losses))


@pytest.mark.slow
def test_switch_inside_an_epoch_skips_its_remaining_steps(digits, params0):
    optimizer = tp.adam_cg(1e-2, policy=tp.switch_at(STEPS + 1))
    result = train(
        plain_loss, params0, digits[0], optimizer, batch_size=BATCH, max_epochs=4, progress=False
    )
    columns = history_columns(result.history)
    assert columns["phase"] == [0, 0, 1, 1]
    assert columns["steps"][:2] == [STEPS, 1]
    assert columns["epoch_cost"][1] == 1 / STEPS
    assert int(tp.info(result.opt_state).switch_step) == STEPS + 1


@pytest.mark.slow
def test_default_policy_trials_are_monotone_in_cg_and_costed_like_train(digits, params0):
    result = train(
        plain_loss, params0, digits[0], tp.adam_cg(3e-2), batch_size=BATCH, max_epochs=200,
        cost_budget=60, strict_budget=True, progress=False,
    )  # fmt: skip
    columns = history_columns(result.history)
    assert columns["train_loss"][-1] < 0.3 * columns["train_loss"][0]
    assert columns["cost"][-1] <= 60
    state = result.opt_state
    assert int(tp.info(state).switches) >= 1  # at least the late polish
    np.testing.assert_allclose(float(state.detector_state.cost), columns["cost"][-1], rtol=1e-6)
    # Within each run of CG epochs the training loss never rises (a line search).
    records = list(zip(columns["train_loss"], columns["phase"], strict=True))
    for (a, pa), (b, pb) in itertools.pairwise(records):
        if pa == 1 and pb == 1:
            assert b <= a


def test_resume_takes_the_new_budget_and_epoch_length(tmp_path, digits, params0):
    # A resumed run used to keep the policy's old budget (10) and epoch length (STEPS).
    pytest.importorskip("orbax.checkpoint")
    directory = tmp_path / "ckpt"
    opt = tp.adam_cg(1e-2)
    kwargs = dict(max_epochs=200, checkpoint_dir=directory, progress=False)
    first = train(plain_loss, params0, digits[0], opt, batch_size=BATCH, cost_budget=3, **kwargs)
    (policy,) = _policy_states(first.opt_state)
    assert (float(policy.budget), float(policy.epoch_steps)) == (3, STEPS)
    resumed = train(
        plain_loss, params0, digits[0], opt, batch_size=BATCH // 2, cost_budget=5, **kwargs
    )
    assert resumed.history[-1]["cost"] >= 5
    assert len(resumed.history) > len(first.history)
    (policy,) = _policy_states(resumed.opt_state)
    assert float(policy.budget) == 5
    assert float(policy.epoch_steps) == N // (BATCH // 2)
    # The statistics go on from the checkpoint: the policy's cost is train's.
    np.testing.assert_allclose(float(policy.cost), resumed.history[-1]["cost"], rtol=1e-5)


def test_resume_rejects_a_budget_contradicting_the_policys_own(tmp_path, digits, params0):
    pytest.importorskip("orbax.checkpoint")
    directory = tmp_path / "ckpt"
    opt = tp.adam_cg(1e-2, budget=2)
    kwargs = dict(batch_size=BATCH, max_epochs=200, checkpoint_dir=directory, progress=False)
    train(plain_loss, params0, digits[0], opt, cost_budget=2, **kwargs)
    with pytest.raises(ValueError, match="cost_budget"):
        train(plain_loss, params0, digits[0], opt, cost_budget=4, **kwargs)


def test_configuration_fields_are_all_that_configure_sets(params0):
    # reconcile_configuration copies CONFIGURATION_FIELDS; configure must set no other field.
    from twophase.training import CONFIGURATION_FIELDS, reconcile_configuration

    state = tp.adam_cg(1e-2).init(params0)
    configured = tp.policy.configure(state, budget=7.0, steps_per_epoch=3)
    (before,), (after,) = _policy_states(state), _policy_states(configured)
    changed = {
        name
        for name in before._fields
        if not np.array_equal(getattr(before, name), getattr(after, name))
    }
    assert changed <= set(CONFIGURATION_FIELDS)
    assert changed  # the test sees configure at work
    # And reconciling a configured state onto the fresh one brings back its configuration.
    (back,) = _policy_states(reconcile_configuration(configured, state))
    for name in before._fields:
        np.testing.assert_array_equal(getattr(back, name), getattr(before, name))


def test_progress_in_a_log_is_plain_lines(digits, params0, capsys, monkeypatch):
    import twophase.training as training

    # stderr is captured (not a terminal): plain lines, one per PROGRESS_SECONDS.
    train(plain_loss, params0, digits[0], ADAM, batch_size=BATCH, max_epochs=5, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1  # a short run: only the last epoch's line
    assert lines[0].startswith("training: epoch 5/5, cost 5 epoch-equivalents, phase 0, loss ")
    monkeypatch.setattr(training, "PROGRESS_SECONDS", 0.0)
    train(plain_loss, params0, digits[0], ADAM, batch_size=BATCH, max_epochs=3, progress=True,
          cost_budget=2.5)  # fmt: skip
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["training: epoch 1", "training: epoch 2",
                                                      "training: epoch 3"]  # fmt: skip
    assert all(line.count("training") == 1 for line in lines)
    assert lines[-1].startswith("training: epoch 3, cost 3/2.5 epoch-equivalents, phase 0, loss")
