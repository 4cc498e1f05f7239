"""Tests for twophase.checkpoint: save / restore / latest_step with orbax."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp

pytest.importorskip("orbax.checkpoint")

from twophase.checkpoint import latest_step, restore_checkpoint, save_checkpoint

N, D, H, BATCH = 96, 3, 8, 16
STEPS, SWITCH = 12, 5  # steps 0..4 Adam, 5.. CG


def make_problem(dtype):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (N, D), dtype)
    teacher = jax.random.normal(k[1], (D, H), dtype)
    y = jnp.tanh(x @ teacher) @ jnp.ones((H, 1), dtype)
    params = {
        "w": 0.5 * jax.random.normal(k[2], (D, H), dtype),
        "b": jnp.zeros((H,), dtype),
        "v": 0.5 * jax.random.normal(k[3], (H, 1), dtype),
    }
    return x, y, params


def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) @ p["v"] - y) ** 2)


def make_optimizer(kind):
    if kind == "adam_cg":
        return tp.adam_cg(1e-2, policy=tp.switch_at(SWITCH))
    if kind == "adam_newton_cg":
        return tp.adam_newton_cg(1e-2, policy=tp.switch_at(SWITCH))
    if kind == "adam_newton_cg_nystrom":
        # A sketch every second Newton step: the resumed run refreshes it after the restore.
        return tp.adam_newton_cg(
            1e-2,
            second=tp.newton_cg(preconditioner="nystrom", sketch_size=4, sketch_refresh=2),
            policy=tp.switch_at(SWITCH),
        )
    return tp.adam_lbfgs(1e-2, policy=tp.switch_at(SWITCH))


def make_run(kind, dtype):
    """An optimizer, initial params and a jitted step that counts its traces."""
    x, y, params = make_problem(dtype)
    opt = make_optimizer(kind)
    full = tp.full_batch(loss_fn, (x, y), batch_size=32)
    xs, ys = x.reshape(-1, BATCH, D), y.reshape(-1, BATCH, 1)  # fixed mini-batches
    traces = {"n": 0}

    @jax.jit
    def step(p, s, t):
        traces["n"] += 1
        batch = (xs[t % len(xs)], ys[t % len(ys)])
        value, grad = jax.value_and_grad(loss_fn)(p, batch)
        u, s = opt.update(grad, s, p, value=value, value_fn=full)
        return optax.apply_updates(p, u), s

    return opt, params, step, traces


_RUNS = {}


def cached_run(kind, dtype):
    """(opt, params, step, traces, reference): compiled once per configuration;
    ``reference`` is the uninterrupted run's ``(params, state)`` after every step."""
    if (kind, dtype) not in _RUNS:
        opt, params, step, traces = make_run(kind, dtype)
        p, s, reference = params, opt.init(params), []
        for t in range(STEPS):
            p, s = step(p, s, t)
            reference.append((p, s))
        _RUNS[kind, dtype] = opt, params, step, traces, reference
    return _RUNS[kind, dtype]


def train(step, p, s, start, stop):
    for t in range(start, stop):
        p, s = step(p, s, t)
    return p, s


def avals(tree):
    return jax.tree.map(jax.typeof, tree)


@pytest.mark.parametrize(
    "kind, dtype",
    [
        ("adam_cg", jnp.float32),
        # The other presets and dtypes in the slow suite (~10 s each to run and compile).
        pytest.param("adam_cg", jnp.float64, marks=pytest.mark.slow),
        pytest.param("adam_lbfgs", jnp.float32, marks=pytest.mark.slow),
        pytest.param("adam_newton_cg", jnp.float64, marks=pytest.mark.slow),
        ("adam_newton_cg_nystrom", jnp.float64),
    ],
)
@pytest.mark.parametrize("stop_at", [3, 8], ids=["phase0", "phase1"])
def test_resume_is_bit_identical(tmp_path, kind, dtype, stop_at):
    _, params, step, traces, reference = cached_run(kind, dtype)
    p_ref, s_ref = reference[-1]
    assert int(tp.info(s_ref).phase) == 1 and int(tp.info(s_ref).switch_step) == SWITCH

    p, s = reference[stop_at - 1]
    save_checkpoint(tmp_path, stop_at, {"params": p, "opt_state": s})
    saved_avals = avals((p, s))
    del p, s

    # As a new process would: a target from a new optimizer's init, zero params.
    opt = make_optimizer(kind)
    target = {"params": optax.tree.zeros_like(params), "opt_state": opt.init(params)}
    restored_step, state = restore_checkpoint(tmp_path, target)
    assert restored_step == stop_at
    p, s = state["params"], state["opt_state"]
    assert int(tp.info(s).phase) == (0 if stop_at < SWITCH else 1)
    assert int(tp.info(s).step) == stop_at
    assert avals((p, s)) == saved_avals  # dtypes and weak types as saved
    traced = traces["n"]
    p, s = train(step, p, s, stop_at, STEPS)

    assert traces["n"] == traced  # the continued run reuses the compiled step
    chex.assert_trees_all_equal(p, p_ref)
    chex.assert_trees_all_equal(s, s_ref)
    chex.assert_trees_all_equal(tp.info(s), tp.info(s_ref))
    if kind.startswith("adam_newton_cg") and stop_at > SWITCH:
        # Interrupted mid Newton-CG: products made before and after the checkpoint.
        hvps_at_stop = int(tp.info(reference[stop_at - 1][1]).hessian_vector_products)
        assert 0 < hvps_at_stop < int(tp.info(s_ref).hessian_vector_products)


def test_namedtuple_types_and_none_fields_preserved(tmp_path):
    opt, params, _, _, reference = cached_run("adam_cg", jnp.float32)
    s = reference[SWITCH][1]
    save_checkpoint(tmp_path, 0, s)
    _, r = restore_checkpoint(tmp_path, opt.init(params))
    assert type(r) is tp.TwoPhaseState
    assert type(r.second_state) is tp.NonlinearCGState
    assert r.second_state.preconditioner is None
    assert type(r.first_state[0]) is optax.ScaleByAdamState
    assert type(r.detector_state) is type(s.detector_state)
    assert jax.tree.structure(r) == jax.tree.structure(s)
    chex.assert_trees_all_equal(r, s)


def test_scalar_dtypes_float64_and_python_leaves(tmp_path):
    assert jax.config.jax_enable_x64
    state = {
        "f64": jnp.asarray([1 / 3, np.pi], jnp.float64),
        "f32": jnp.asarray(1 / 3, jnp.float32),
        "i32": jnp.asarray(-7, jnp.int32),
        "flag": jnp.asarray(True),
        "weak": jnp.asarray(0.25),  # weakly typed float64
        "numpy": np.arange(3, dtype=np.int64),
        "np_scalar": np.float32(1.5),
        "py": (3, 2.5, False),
        "none": None,
    }
    save_checkpoint(tmp_path, 1, state)
    target = jax.tree.map(lambda x: jnp.zeros_like(x) if isinstance(x, jax.Array) else x, state)
    _, r = restore_checkpoint(tmp_path, target)
    for key in ("f64", "f32", "i32", "flag", "weak"):
        assert r[key].dtype == state[key].dtype
        assert r[key].weak_type == state[key].weak_type
        np.testing.assert_array_equal(r[key], state[key])
    assert r["f64"][0] == 1 / 3  # all 53 bits
    assert isinstance(r["numpy"], np.ndarray) and r["numpy"].dtype == np.int64
    assert type(r["np_scalar"]) is np.float32 and r["np_scalar"] == 1.5
    assert r["py"] == (3, 2.5, False) and r["none"] is None


def test_restore_casts_to_target_dtype(tmp_path):
    save_checkpoint(tmp_path, 0, {"w": jnp.asarray([1.5, 2.0], jnp.float64)})
    _, r = restore_checkpoint(tmp_path, {"w": jnp.zeros(2, jnp.float32)})
    assert r["w"].dtype == jnp.float32
    np.testing.assert_array_equal(r["w"], [1.5, 2.0])


def test_restore_uses_target_sharding(tmp_path):
    device = jax.devices()[-1]
    save_checkpoint(tmp_path, 0, {"w": jnp.arange(4.0)})
    sharding = jax.sharding.SingleDeviceSharding(device)
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)}
    _, r = restore_checkpoint(tmp_path, abstract)
    assert r["w"].sharding == sharding and r["w"].dtype == jnp.float32
    np.testing.assert_array_equal(r["w"], np.arange(4.0))


def test_keep_rotation_and_specific_step(tmp_path):
    for step in range(5):
        save_checkpoint(tmp_path, 10 * step, {"x": jnp.asarray(float(step))}, keep=2)
    assert latest_step(tmp_path) == 40
    assert sorted(int(n) for n in os.listdir(tmp_path)) == [30, 40]
    step, r = restore_checkpoint(tmp_path, {"x": jnp.zeros(())}, step=30)
    assert step == 30 and float(r["x"]) == 3.0
    step, r = restore_checkpoint(tmp_path, {"x": jnp.zeros(())})
    assert step == 40 and float(r["x"]) == 4.0
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 0 .*steps \[30, 40\]"):
        restore_checkpoint(tmp_path, {"x": jnp.zeros(())}, step=0)
    # An older step may be saved again; rotation keeps the largest steps.
    save_checkpoint(tmp_path, 35, {"x": jnp.asarray(3.5)}, keep=2)
    assert sorted(int(n) for n in os.listdir(tmp_path)) == [35, 40]


def test_overwrite(tmp_path):
    save_checkpoint(tmp_path, 3, {"x": jnp.asarray(1.0)})
    with pytest.raises(FileExistsError, match=r"step 3 already exists.*overwrite=True"):
        save_checkpoint(tmp_path, 3, {"x": jnp.asarray(2.0)})
    _, r = restore_checkpoint(tmp_path, {"x": jnp.zeros(())})
    assert float(r["x"]) == 1.0
    save_checkpoint(tmp_path, 3, {"x": jnp.asarray(2.0)}, overwrite=True)
    _, r = restore_checkpoint(tmp_path, {"x": jnp.zeros(())})
    assert float(r["x"]) == 2.0


@pytest.mark.parametrize("step", [-1, 1.0, True, "3"])
def test_bad_step(tmp_path, step):
    with pytest.raises(ValueError, match="`step` must be a non-negative int"):
        save_checkpoint(tmp_path, step, {"x": jnp.ones(())})
    save_checkpoint(tmp_path, 0, {"x": jnp.ones(())}, overwrite=True)
    with pytest.raises(ValueError, match="`step` must be a non-negative int"):
        restore_checkpoint(tmp_path, {"x": jnp.ones(())}, step=step)


@pytest.mark.parametrize("keep", [0, -2, True, 1.5])
def test_bad_keep(tmp_path, keep):
    with pytest.raises(ValueError, match="`keep` must be a positive int"):
        save_checkpoint(tmp_path, 0, {"x": jnp.ones(())}, keep=keep)
    assert latest_step(tmp_path) is None


def test_bad_state(tmp_path):
    with pytest.raises(ValueError, match="`state` has no array leaves"):
        save_checkpoint(tmp_path, 0, {"a": None, "b": ()})
    with pytest.raises(TypeError, match=r"leaf `\['name'\]`: .*got str"):
        save_checkpoint(tmp_path, 0, {"name": "adam", "x": jnp.ones(())})


def test_missing_orbax_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"pip install twophase\[checkpoint\]"):
        save_checkpoint(tmp_path, 0, {"x": jnp.ones(())})
    with pytest.raises(ImportError, match=r"pip install twophase\[checkpoint\]"):
        latest_step(tmp_path)


def test_no_checkpoints(tmp_path):
    missing = tmp_path / "missing"
    assert latest_step(missing) is None
    with pytest.raises(FileNotFoundError, match=f"no checkpoints in '{missing}'"):
        restore_checkpoint(missing, {"x": jnp.ones(())})
    assert not missing.exists()  # reading never creates the directory
    with pytest.raises(FileNotFoundError, match=f"no checkpoints in '{tmp_path}'"):
        restore_checkpoint(tmp_path, {"x": jnp.ones(())})
    assert latest_step(tmp_path) is None


def test_structure_mismatch(tmp_path):
    opt = make_optimizer("adam_cg")
    _, _, params = make_problem(jnp.float32)
    save_checkpoint(tmp_path, 7, {"params": params, "opt_state": opt.init(params)})

    with pytest.raises(
        ValueError,
        match=r"does not match checkpoint step 7.*only in the "
        r"checkpoint: `\['opt_state'\]\.phase`",
    ):
        restore_checkpoint(tmp_path, {"params": params})
    other = {"params": params, "opt_state": optax.adam(1e-3).init(params)}
    with pytest.raises(ValueError, match=r"only in the target: `\['opt_state'\]\[0\]\.count`"):
        restore_checkpoint(tmp_path, other)
    wrong = dict(params, w=jnp.zeros((H, D)))
    with pytest.raises(
        ValueError,
        match=r"shapes differ: .*`\['params'\]\['w'\]` \(3, 8\) in "
        r"the checkpoint vs \(8, 3\) in the target",
    ):
        restore_checkpoint(tmp_path, {"params": wrong, "opt_state": opt.init(wrong)})
    renamed = {"weights": params, "opt_state": opt.init(params)}
    with pytest.raises(ValueError, match=r"only in the checkpoint: `\['params'\]"):
        restore_checkpoint(tmp_path, renamed)


def test_a_field_added_since_the_save_takes_the_targets_value(tmp_path):
    # A checkpoint written before a state field existed (a policy's new statistic):
    # the saved leaves come back, the new field keeps the target's value, with a warning.
    saved = {"w": jnp.arange(3.0), "count": jnp.int32(5)}
    save_checkpoint(tmp_path, 4, saved)
    target = {"w": jnp.zeros(3), "count": jnp.int32(0), "added": jnp.float32(7.0)}
    with pytest.warns(UserWarning, match=r"predates `\['added'\]`"):
        step, restored = restore_checkpoint(tmp_path, target)
    assert step == 4
    np.testing.assert_array_equal(restored["w"], np.arange(3.0))
    assert int(restored["count"]) == 5 and float(restored["added"]) == 7.0
    # Without a value for the new field (an abstract target) it is an error naming it.
    abstract = dict(target, added=jax.ShapeDtypeStruct((), jnp.float32))
    with pytest.raises(ValueError, match=r"only in the target: `\['added'\]`"):
        restore_checkpoint(tmp_path, abstract)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_save_failing_midway_keeps_previous(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    save_checkpoint(tmp_path, 1, {"x": jnp.asarray(1.0)})

    def fail(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as m:
        m.setattr(ocp.handlers.StandardCheckpointHandler, "async_save", fail)
        with pytest.raises(OSError, match="simulated"):
            save_checkpoint(tmp_path, 2, {"x": jnp.asarray(2.0)})
    # The half-written step stayed in its temporary directory.
    assert sorted(os.listdir(tmp_path)) == ["1", "2.orbax-checkpoint-tmp"]
    assert latest_step(tmp_path) == 1
    step, r = restore_checkpoint(tmp_path, {"x": jnp.zeros(())})
    assert step == 1 and float(r["x"]) == 1.0
    with pytest.raises(FileNotFoundError, match="holds steps \\[1\\]"):
        restore_checkpoint(tmp_path, {"x": jnp.zeros(())}, step=2)
    # The next save cleans up and succeeds.
    save_checkpoint(tmp_path, 2, {"x": jnp.asarray(2.0)})
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    assert float(restore_checkpoint(tmp_path, {"x": jnp.zeros(())})[1]["x"]) == 2.0


KILLED_SAVE = """
import os, sys
import jax, jax.numpy as jnp
from orbax.checkpoint._src.path import async_path
from twophase.checkpoint import save_checkpoint

directory = sys.argv[1]
save_checkpoint(directory, 1, {"x": jnp.asarray(1.0), "w": jnp.ones((64, 64))})

rename = async_path.rename

async def die(src, dst):  # dies with all data written, before the step's own rename
    if os.path.basename(dst) != "2":
        return await rename(src, dst)
    assert sorted(os.listdir(src)) == [
        "_CHECKPOINT_METADATA", "commit_success.txt", "layout", "state"
    ], os.listdir(src)
    os._exit(17)

async_path.rename = die
save_checkpoint(directory, 2, {"x": jnp.asarray(2.0), "w": jnp.zeros((64, 64))})
print("not killed")
"""


def test_save_killed_before_commit_keeps_previous(tmp_path):
    pytest.importorskip("orbax.checkpoint._src.path.async_path")
    script = tmp_path / "killed_save.py"
    script.write_text(textwrap.dedent(KILLED_SAVE))
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(script), str(ckpt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 17, proc.stdout + proc.stderr
    assert sorted(os.listdir(ckpt)) == ["1", "2.orbax-checkpoint-tmp"]
    assert latest_step(ckpt) == 1
    target = {"x": jnp.zeros(()), "w": jnp.zeros((64, 64))}
    step, r = restore_checkpoint(ckpt, target)
    assert step == 1 and float(r["x"]) == 1.0
    np.testing.assert_array_equal(r["w"], np.ones((64, 64)))
    save_checkpoint(ckpt, 2, {"x": jnp.asarray(2.0), "w": jnp.zeros((64, 64))})
    assert sorted(os.listdir(ckpt)) == ["1", "2"]
