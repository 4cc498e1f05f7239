"""One process of a multi-process run, for ``tests/test_multiprocess.py``.

Usage: ``python multiprocess_worker.py TASK OUT_DIR PROCESS_ID NUM_PROCESSES PORT``.
With ``NUM_PROCESSES > 1`` it joins ``jax.distributed`` on ``127.0.0.1:PORT`` and builds
the data as global arrays from its own rows (``jax.make_array_from_process_local_data``);
with 1 it is the one-process reference on one device, without ``jax.distributed``. Float64
throughout. It writes ``OUT_DIR/result-<PROCESS_ID>.json``.

Tasks: ``steps`` (hand-written jitted steps of ``adam_cg`` and ``adam_lbfgs`` across the
switch, and the errors for data that cannot work) and ``fail`` (process 1 raises while
process 0 waits for it in a collective). ``tp.train`` is run by ``examples/multihost.py``.
"""

import json
import os
import sys
import time
import traceback

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

TASK, OUT_DIR = sys.argv[1], sys.argv[2]
PROCESS_ID, NUM_PROCESSES, PORT = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if NUM_PROCESSES > 1:
    jax.distributed.initialize(f"127.0.0.1:{PORT}", NUM_PROCESSES, PROCESS_ID)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import twophase as tp  # noqa: E402

N, D, H, BATCH, CHUNK = 256, 4, 8, 32, 64
SWITCH, STEPS = 4, 12
rng = np.random.default_rng(0)
X = rng.normal(size=(N, D))
Y = np.tanh(X @ rng.normal(size=(D, H))) @ rng.normal(size=(H, 1))
PARAMS = {
    "w": 0.5 * rng.normal(size=(D, H)),
    "b": np.zeros(H),
    "v": 0.5 * rng.normal(size=(H, 1)),
}


def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) @ p["v"] - y) ** 2)


def global_data():
    """``(x, y)``: global arrays sharded by rows over all processes' devices (one
    device in the one-process reference), each process supplying its own rows."""
    if NUM_PROCESSES == 1:
        return jax.device_put((X, Y))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = N // NUM_PROCESSES
    mine = slice(PROCESS_ID * rows, (PROCESS_ID + 1) * rows)
    sharding = NamedSharding(mesh, P("data"))
    return tuple(jax.make_array_from_process_local_data(sharding, a[mine]) for a in (X, Y))


def replicated(tree, like):
    if NUM_PROCESSES == 1:
        return jax.device_put(tree)
    sharding = NamedSharding(like.sharding.mesh, P())
    return jax.device_put(tree, sharding)


def tolist(tree):
    return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


def run_steps(opt, data, checkpoint_dir=None):
    """``STEPS`` jitted steps on fixed mini-batches; the data are arguments."""
    traces = {"n": 0}

    @jax.jit
    def step(params, state, t, data):
        traces["n"] += 1
        full = tp.full_batch(loss_fn, data, batch_size=CHUNK)
        batch = jax.tree.map(
            lambda a: jax.lax.dynamic_slice_in_dim(a, (t % (N // BATCH)) * BATCH, BATCH), data
        )
        loss, grad = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grad, state, params, value=loss, value_fn=full)
        params = optax.apply_updates(params, updates)
        return params, state, full(params)

    params = replicated(PARAMS, data[0])
    state = replicated(opt.init(PARAMS), data[0])
    losses, phases, switch_steps = [], [], []
    for t in range(STEPS):
        params, state, loss = step(params, state, t, data)
        losses.append(float(loss))
        phases.append(int(tp.info(state).phase))
        switch_steps.append(int(tp.info(state).switch_step))
    record = {
        "losses": losses,
        "phases": phases,
        "switch_steps": switch_steps,
        "params": tolist(params),
    }
    if checkpoint_dir is not None:
        # Saved and restored by every process; the restored state (weak-typed
        # scalars included) continues without retracing.
        from twophase.checkpoint import restore_checkpoint, save_checkpoint

        saved = {"params": params, "opt_state": state}
        save_checkpoint(checkpoint_dir, STEPS, saved)
        _, restored = restore_checkpoint(checkpoint_dir, saved)
        same = jax.tree.map(
            lambda a, b: (
                bool(a.sharding == b.sharding and a.weak_type == b.weak_type)
                and bool(jnp.array_equal(a, b))
            ),
            restored,
            saved,
        )
        record["checkpoint_roundtrip"] = all(jax.tree.leaves(same))
        _, _, loss = step(restored["params"], restored["opt_state"], STEPS, data)
        record["loss_after_restore"] = float(loss)
        _, _, loss = step(params, state, STEPS, data)
        record["loss_after_save"] = float(loss)
    record["traces"] = traces["n"]
    record["executables"] = step._cache_size()
    return record


def closing_over_error(data):
    full = tp.full_batch(loss_fn, data, batch_size=CHUNK)
    try:
        jax.jit(full)(replicated(PARAMS, data[0]))
    except ValueError as e:
        return str(e)
    return None


def train_error():
    try:
        tp.train(loss_fn, PARAMS, (X, Y), tp.adam_cg(1e-2), progress=False)
    except ValueError as e:
        return str(e)
    return None


def main():
    t0 = time.perf_counter()
    out = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    if TASK == "steps":
        data = global_data()
        out["adam_cg"] = run_steps(tp.adam_cg(1e-2, policy=tp.switch_at(SWITCH)), data)
        out["adam_lbfgs"] = run_steps(
            tp.adam_lbfgs(1e-2, policy=tp.switch_at(SWITCH)),
            data,
            os.path.join(OUT_DIR, "checkpoint") if NUM_PROCESSES > 1 else None,
        )
        if NUM_PROCESSES > 1:
            out["closing_over_error"] = closing_over_error(data)
            out["train_error"] = train_error()
    elif TASK == "fail":
        data = global_data()
        if PROCESS_ID == 1:
            raise RuntimeError("worker 1 fails on purpose")
        # Process 0 needs process 1 for this reduction: it would wait forever.
        jax.jit(lambda x: jnp.sum(x))(data[0]).block_until_ready()
    out["seconds"] = time.perf_counter() - t0
    with open(os.path.join(OUT_DIR, f"result-{PROCESS_ID}.json"), "w") as f:
        json.dump(out, f)


try:
    main()
except BaseException:
    # Exit at once: a normal exit would wait at jax.distributed's shutdown barrier
    # (up to 5 minutes) for processes that may be waiting for this one.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
