"""Data-parallel training on 8 (forced host) CPU devices vs. one device.

The script runs in a subprocess because ``XLA_FLAGS`` must be set before JAX
initialises its backends. It trains the same MLP regression with
``adam_cg(detector=switch_at(4))`` twice, and again with ``adam_newton_cg``
(whose Hessian-vector products run over the sharded data through
``tp.full_batch``): (a) data sharded over an 8-device mesh along the example
axis, parameters and optimizer state replicated, the full-batch objective
``tp.full_batch`` over the sharded data; (b) everything on one device. Both
runs cross the switch and take several second-phase steps.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SWITCH, STEPS = 4, 12

SCRIPT = """
import json, sys, time

t0 = time.time()
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import twophase as tp

N, D, H, BATCH, CHUNK = 512, 8, 16, 64, 128
SWITCH, STEPS = {switch}, {steps}
rng = np.random.default_rng(0)
X = rng.normal(size=(N, D)).astype(np.float32)
Y = (np.tanh(X @ rng.normal(size=(D, H))) @ rng.normal(size=(H, 1))).astype(np.float32)
PARAMS = {{
    "w": (0.3 * rng.normal(size=(D, H))).astype(np.float32),
    "b": np.zeros(H, np.float32),
    "v": (0.3 * rng.normal(size=(H, 1))).astype(np.float32),
}}


def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) @ p["v"] - y) ** 2)


def run(sharded, ckpt_dir=None, newton=False):
    if sharded:
        mesh = Mesh(np.array(jax.devices()), ("data",))
        data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        batches = NamedSharding(mesh, P(None, "data"))  # (num_batches, BATCH, ...)
    else:
        data = replicated = batches = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    x, y = jax.device_put(X, data), jax.device_put(Y, data)
    xs = jax.device_put(X.reshape(-1, BATCH, D), batches)
    ys = jax.device_put(Y.reshape(-1, BATCH, 1), batches)
    params = jax.device_put(PARAMS, replicated)
    if newton == "nystrom":
        # The sketch's vmapped products over the sharded objective, refreshed mid-run.
        second = tp.newton_cg(preconditioner="nystrom", sketch_size=8, sketch_refresh=3)
        opt = tp.adam_newton_cg(1e-2, second=second, policy=tp.switch_at(SWITCH))
    elif newton:
        opt = tp.adam_newton_cg(1e-2, policy=tp.switch_at(SWITCH))
    else:
        opt = tp.adam_cg(1e-2, policy=tp.switch_at(SWITCH))
    full = tp.full_batch(loss_fn, (x, y), batch_size=CHUNK)
    traces = {{"n": 0}}

    @jax.jit
    def step(p, s, t):
        traces["n"] += 1
        batch = (xs[t % xs.shape[0]], ys[t % ys.shape[0]])
        value, grad = jax.value_and_grad(loss_fn)(p, batch)
        u, s = opt.update(grad, s, p, value=value, value_fn=full)
        p = optax.apply_updates(p, u)
        return p, s, full(p)

    # The state placed like the params: the step's outputs come back replicated,
    # so the second call reuses the first call's executable.
    p, s = params, jax.device_put(opt.init(params), replicated)
    losses, phases = [], []
    for t in range(STEPS):
        p, s, loss = step(p, s, t)
        losses.append(float(loss))
        phases.append(int(tp.info(s).phase))
        if ckpt_dir is not None and t == SWITCH + 1:
            from twophase.checkpoint import save_checkpoint

            save_checkpoint(ckpt_dir, t + 1, {{"params": p, "opt_state": s}})
            saved = {{"params": p, "opt_state": s}}
    out = {{
        "losses": losses,
        "phases": phases,
        "switch_step": int(tp.info(s).switch_step),
        "cg_iterations": None if newton else int(tp.info(s).cg_iterations),
        "evals": int(tp.info(s).value_and_grad_evals),
        "hvps": int(tp.info(s).hessian_vector_products),
        "traces": traces["n"],
        "executables": step._cache_size(),
        "params": jax.tree.map(lambda a: np.asarray(a).tolist(), p),
        "params_replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(p)),
        "state_replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(s)),
        "data_shards": sorted({{tuple(d.data.shape) for d in x.addressable_shards}}),
        "num_data_shards": len(x.addressable_shards),
    }}
    if ckpt_dir is not None:
        from twophase.checkpoint import restore_checkpoint

        abstract = jax.eval_shape(lambda: {{"params": params, "opt_state": opt.init(params)}})
        target = jax.tree.map(
            lambda a, b: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=b.sharding),
            abstract, saved,
        )
        _, restored = restore_checkpoint(ckpt_dir, target)
        same = jax.tree.map(
            lambda a, b: bool(a.sharding == b.sharding and np.array_equal(a, b)), restored, saved
        )
        out["checkpoint_roundtrip"] = all(jax.tree.leaves(same))
    return out


assert jax.device_count() == 8, jax.devices()
result = {{"sharded": run(True, sys.argv[2]), "single": run(False)}}
result["sharded_newton"] = run(True, newton=True)
result["single_newton"] = run(False, newton=True)
result["sharded_nystrom"] = run(True, newton="nystrom")
result["single_nystrom"] = run(False, newton="nystrom")
result["seconds"] = time.time() - t0
with open(sys.argv[1], "w") as f:
    json.dump(result, f)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("orbax.checkpoint")
    tmp = tmp_path_factory.mktemp("multidevice")
    script = tmp / "data_parallel.py"
    script.write_text(textwrap.dedent(SCRIPT).format(switch=SWITCH, steps=STEPS))
    out = tmp / "result.json"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
    )
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_data_is_sharded_and_params_replicated(runs):
    sharded = runs["sharded"]
    assert sharded["num_data_shards"] == 8 and sharded["data_shards"] == [[64, 8]]
    assert sharded["params_replicated"] and sharded["state_replicated"]


def test_both_runs_cross_the_switch(runs):
    for run in (runs["sharded"], runs["single"]):
        assert run["phases"] == [0] * (SWITCH - 1) + [1] * (STEPS - SWITCH + 1)
        assert run["switch_step"] == SWITCH
        assert run["cg_iterations"] == STEPS - SWITCH
        assert run["losses"][-1] < 0.5 * run["losses"][SWITCH - 1]


def test_sharded_trajectory_matches_single_device(runs):
    sharded, single = runs["sharded"], runs["single"]
    # The two programs are compiled separately and may round differently in the
    # last bit, which 8 float32 CG iterations amplify: measured up to 2.5e-5 on
    # parameters of size up to 1.9. A sharding bug moves them by far more.
    _assert_same_run(sharded, single)


def _assert_same_run(sharded, single):
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-4)
    scale = max(np.abs(np.asarray(p)).max() for p in single["params"].values())
    for name in single["params"]:
        np.testing.assert_allclose(
            np.asarray(sharded["params"][name]),
            np.asarray(single["params"][name]),
            rtol=1e-4,
            atol=1e-4 * scale,
            err_msg=name,
        )


def test_no_recompilation_across_the_switch(runs):
    for run in (runs["sharded"], runs["single"]):
        assert run["traces"] == 1
        assert run["executables"] == 1


def test_sharded_checkpoint_roundtrip(runs):
    assert runs["sharded"]["checkpoint_roundtrip"]


@pytest.mark.parametrize("kind", ["newton", "nystrom"])
def test_newton_cg_hvps_over_sharded_data_match_single_device(runs, kind):
    sharded, single = runs[f"sharded_{kind}"], runs[f"single_{kind}"]
    for run in (sharded, single):
        assert run["phases"] == [0] * (SWITCH - 1) + [1] * (STEPS - SWITCH + 1)
        assert run["hvps"] > 0 and run["traces"] == 1 and run["executables"] == 1
        assert run["losses"][-1] < 0.5 * run["losses"][SWITCH - 1]
    assert sharded["params_replicated"] and sharded["state_replicated"]
    # The same iterations: the same numbers of evaluations and products.
    assert (sharded["evals"], sharded["hvps"]) == (single["evals"], single["hvps"])
    _assert_same_run(sharded, single)
