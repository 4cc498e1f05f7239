"""Multi-process runs on one machine: 2 processes x 4 CPU devices on loopback, with
gloo CPU collectives, against a one-process run on the same data in float64.

``launch`` starts the processes of one run (``sys.executable``, a free port for
the coordinator), collects the JSON each writes, and kills them all as soon as
one fails or the timeout passes. The workers are ``tests/multiprocess_worker.py``
and ``examples/multihost.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess_worker.py"
EXAMPLE = ROOT / "examples" / "multihost.py"
PROCESSES, DEVICES_PER_PROCESS = 2, 4
TIMEOUT = 120
RTOL = 1e-10


def _has_cpu_collectives() -> bool:
    import jax

    try:
        from jax._src.lib import _jax as xla
    except ImportError:  # pragma: no cover - older jaxlib
        try:
            from jax._src.lib import xla_extension as xla
        except ImportError:
            return False
    return hasattr(xla, "make_gloo_tcp_collectives") and hasattr(
        jax.config, "jax_cpu_collectives_implementation"
    )


pytestmark = [
    pytest.mark.skipif(
        not _has_cpu_collectives(),
        reason="this jaxlib has no gloo CPU collectives: JAX cannot run several CPU processes",
    ),
]
# One pytest-xdist worker runs the whole module (`--dist loadfile`, the README's command), so
# each module-scoped run is launched once. (`--dist loadgroup` with an `xdist_group` mark no
# longer groups under pytest 9: pytest-xdist 3.8 renames `item._nodeid`, which pytest 9 no
# longer reads; the module's runs were launched once per worker, two at a time.)


class WorkerFailed(RuntimeError):
    """A process of a launched run exited with an error, or the run timed out."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, num_processes: int, out_dir: Path, *, timeout: float = TIMEOUT) -> list[dict]:
    """Runs ``[sys.executable, *argv(process_id, port)]`` as ``num_processes``
    processes and returns ``out_dir/result-<i>.json`` of each. Raises
    :class:`WorkerFailed` with the failing process's stderr as soon as one exits
    non-zero (the others are killed), or when ``timeout`` seconds pass."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("JAX_ENABLE_X64", None)
    # The processes inherit the run's compilation cache (tests/conftest.py): a resumed run
    # reuses what the interrupted one compiled. Each process still traces and compiles (or
    # loads) every jitted function once, which the tests count.
    procs, logs = [], []
    try:
        for i in range(num_processes):
            log = open(out_dir / f"stderr-{i}.txt", "w+")  # closed in `finally`
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, *map(str, argv(i, port))],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                i = failed[0]
                raise WorkerFailed(
                    f"process {i} exited with {procs[i].returncode}:\n{_tail(logs[i])}"
                )
            if time.monotonic() > deadline:
                raise WorkerFailed(
                    f"timed out after {timeout} s; process 0 said:\n{_tail(logs[0])}"
                )
            time.sleep(0.05)
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            i = failed[0]
            raise WorkerFailed(f"process {i} exited with {procs[i].returncode}:\n{_tail(logs[i])}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for log in logs:
            log.close()
    return [json.loads((out_dir / f"result-{i}.json").read_text()) for i in range(num_processes)]


def _tail(log, chars: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-chars:]


def worker(task: str, out_dir: Path, *extra):
    return lambda i, port: [WORKER, task, out_dir, i, PROCESSES, port, *extra]


def max_rel_diff(a, b) -> float:
    """Largest ``|a - b| / max(|b|, tiny)`` over two nested lists / dicts of numbers."""
    leaves_a, leaves_b = _leaves(a), _leaves(b)
    assert len(leaves_a) == len(leaves_b)
    a, b = np.asarray(leaves_a, float), np.asarray(leaves_b, float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _leaves(tree) -> list:
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for t in tree for x in _leaves(t)]
    return [tree]


# --------------------------------------------------------------------------- #
# Hand-written jitted steps: adam_cg and adam_lbfgs across the switch.


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("steps")
    multi = launch(worker("steps", tmp / "multi"), PROCESSES, tmp / "multi")
    (single,) = launch(
        lambda i, port: [WORKER, "steps", tmp / "single", i, 1, port], 1, tmp / "single"
    )
    return multi, single


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["adam_cg", "adam_lbfgs"])
def test_steps_match_one_process(steps, opt):
    multi, single = steps
    ref = single[opt]
    # Both cross the switch and then make progress: the comparison is not vacuous.
    assert ref["phases"] == [0] * 3 + [1] * 9 and set(ref["switch_steps"][3:]) == {4}
    assert ref["losses"][-1] < 0.5 * ref["losses"][3]
    for run in multi:
        assert run["process_count"] == PROCESSES
        assert run[opt]["phases"] == ref["phases"]
        assert run[opt]["switch_steps"] == ref["switch_steps"]
        assert max_rel_diff(run[opt]["losses"], ref["losses"]) < RTOL
        assert max_rel_diff(run[opt]["params"], ref["params"]) < RTOL


@pytest.mark.parametrize("opt", ["adam_cg", "adam_lbfgs"])
def test_steps_compile_once_on_every_process(steps, opt):
    multi, _ = steps
    for run in multi:
        assert run[opt]["traces"] == 1 and run[opt]["executables"] == 1


def test_checkpoint_of_global_lbfgs_state_roundtrips(steps):
    pytest.importorskip("orbax.checkpoint")
    multi, _ = steps
    for run in multi:
        lbfgs = run["adam_lbfgs"]
        assert lbfgs["checkpoint_roundtrip"]
        assert lbfgs["loss_after_restore"] == lbfgs["loss_after_save"]
        assert lbfgs["loss_after_save"] < lbfgs["losses"][-1]


def test_closing_over_global_data_says_what_to_do(steps):
    multi, _ = steps
    for run in multi:
        message = run["closing_over_error"]
        assert message is not None and "Pass `data` as an argument" in message
        message = run["train_error"]
        assert message is not None and "`data` must be global jax.Arrays" in message
        assert "make_array_from_process_local_data" in message


# --------------------------------------------------------------------------- #
# tp.train through the README's recipe, examples/multihost.py: strict budget, a
# checkpoint, interrupted after 3 epochs and resumed on both processes.


def example(out_dir: Path, *extra):
    def argv(i, port):
        return [
            EXAMPLE,
            "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", PROCESSES,
            "--process-id", i,
            "--cpu-devices", DEVICES_PER_PROCESS,
            "--x64",
            "--out", out_dir / f"result-{i}.json",
            *extra,
        ]  # fmt: skip

    return argv


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    pytest.importorskip("orbax.checkpoint")
    tmp = tmp_path_factory.mktemp("train")
    ckpt = tmp / "ckpt"
    started = time.monotonic()
    first = launch(
        example(tmp / "first", "--checkpoint-dir", ckpt, "--max-epochs", 3),
        PROCESSES,
        tmp / "first",
    )
    resumed = launch(example(tmp / "resumed", "--checkpoint-dir", ckpt), PROCESSES, tmp / "resumed")
    (single,) = launch(
        lambda i, port: [EXAMPLE, "--x64", "--out", tmp / "single" / "result-0.json"],
        1,
        tmp / "single",
    )
    logs = [(tmp / "resumed" / f"stderr-{i}.txt").read_text() for i in range(PROCESSES)]
    print(f"train runs: {time.monotonic() - started:.1f} s")
    return first, resumed, single, logs


def _without_wall_time(history):
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in history]


@pytest.mark.slow
def test_train_interrupted_and_resumed_matches_one_process(train_runs):
    first, resumed, ref, _ = train_runs
    # The reference crosses the switch and stops at the strict budget.
    assert [r["phase"] for r in ref["history"]][:3] == [0, 0, 1]
    assert ref["stop_reason"] == "cost_budget" and ref["history"][-1]["cost"] <= 12
    assert ref["epochs"] > 3
    for run in first:
        assert run["process_count"] == PROCESSES and run["epochs"] == 3
    for run in resumed:
        history = run["history"]
        assert run["stop_reason"] == ref["stop_reason"]
        assert [r["epoch"] for r in history] == [r["epoch"] for r in ref["history"]]
        for key in ("phase", "steps", "switch_step", "cost", "cg_iterations"):
            assert [r[key] for r in history] == [r[key] for r in ref["history"]], key
        for key in ("train_loss", "grad_norm"):
            got, want = [r[key] for r in history], [r[key] for r in ref["history"]]
            assert max_rel_diff(got, want) < RTOL, key
        assert max_rel_diff(run["params"], ref["params"]) < RTOL
        assert (run["phase"], run["switch_step"]) == (ref["phase"], ref["switch_step"])


@pytest.mark.slow  # the train_runs fixture: ~70 s of multi-process training
def test_train_history_identical_on_every_process(train_runs):
    first, resumed, _, _ = train_runs
    for runs in (first, resumed):
        histories = [_without_wall_time(run["history"]) for run in runs]
        assert all(h == histories[0] for h in histories)
        assert all(run["params"] == runs[0]["params"] for run in runs)


@pytest.mark.slow
def test_train_compiles_once_on_every_process(train_runs):
    first, resumed, _, _ = train_runs
    for run in first:
        assert run["executables"] == {"phase0": 1, "phase1": 1, "evaluate": 1}
    for run in resumed:  # resumed in phase 1: no mini-batch epoch left
        assert run["executables"] == {"phase0": 0, "phase1": 1, "evaluate": 1}


@pytest.mark.slow
def test_train_progress_bar_on_process_0_only(train_runs):
    *_, logs = train_runs
    # tqdm writes "training: 4/12 epoch-equivalent ..." on stderr (a log: no bar).
    assert "training:" in logs[0] and "epoch-equivalent" in logs[0]
    assert "training:" not in logs[1] and "epoch-equivalent" not in logs[1]


# --------------------------------------------------------------------------- #
# Failures end the run.


def test_a_failing_worker_ends_the_run_quickly(tmp_path):
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match="worker 1 fails on purpose") as failure:
        launch(worker("fail", tmp_path), PROCESSES, tmp_path, timeout=90)
    # Process 1's own error, not process 0's: process 0 was still waiting for it
    # (gloo gives up after 30 s, jax.distributed's shutdown barrier after 300 s).
    assert "process 1 exited" in str(failure.value)
    assert time.monotonic() - started < 60  # ~4 s on an idle machine


def test_launcher_timeout_kills_the_run(tmp_path):
    started = time.monotonic()
    argv = lambda i, port: ["-c", "import time; time.sleep(60)"]
    with pytest.raises(WorkerFailed, match="timed out"):
        launch(argv, PROCESSES, tmp_path, timeout=2)
    assert time.monotonic() - started < 10
