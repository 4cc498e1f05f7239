"""Adam -> CG with ``tp.train`` on several processes (hosts): the recipe of docs/choosing.md.

Every process runs this same script. Each one loads only its own rows of the data and
turns them into global arrays sharded over all processes' devices with
``jax.make_array_from_process_local_data``; ``tp.train`` then runs as in one process:
the same shuffling, the same switch, the same history on every process (process 0
draws the progress bar and writes ``history.json``), checkpoints written and restored
by all processes (``--checkpoint-dir`` must be a directory they share).

One process (the one-process equivalent; same result up to float rounding)::

    python examples/multihost.py

Two processes on one machine, 4 CPU devices each (gloo collectives on loopback; on
GPU / TPU hosts drop ``--cpu-devices`` and point ``--coordinator`` at process 0's
host)::

    for i in 0 1; do
      python examples/multihost.py --coordinator 127.0.0.1:12345 --num-processes 2 \\
          --process-id $i --cpu-devices 4 &
    done; wait

Add ``--checkpoint-dir DIR`` to save every epoch and resume from ``DIR`` when rerun
(e.g. after ``--max-epochs 3``), ``--x64`` for float64, ``--out FILE`` for a JSON
record of the run (per process). Tested by ``tests/test_multiprocess.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

N, D, H = 512, 4, 8  # examples, inputs, hidden units
BATCH, CHUNK = 64, 128  # mini-batch and full-batch chunk sizes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-process runs)")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--cpu-devices", type=int, help="simulate this many CPU devices")
    parser.add_argument("--x64", action="store_true", help="float64 throughout")
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--cost-budget", type=float, default=12.0)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--out", help="write a JSON record of the run here")
    args = parser.parse_args(argv)
    if args.num_processes > 1 and not args.coordinator:
        parser.error("--num-processes > 1 needs --coordinator")
    return args


def load_rows(start: int, stop: int):
    """Rows ``[start, stop)`` of a synthetic regression (``x``: (rows, D), ``y``: (rows, 1)).
    Stands in for reading a shard from disk: every row is generated from its own index."""
    import numpy as np

    teacher = np.random.default_rng(0)
    w, v = teacher.normal(size=(D, H)), teacher.normal(size=(H, 1))
    x = np.stack([np.random.default_rng([1, i]).normal(size=D) for i in range(start, stop)])
    return x, np.tanh(x @ w) @ v


def main(args: argparse.Namespace) -> None:
    if args.cpu_devices:  # before JAX initialises its backends
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.cpu_devices}"
        )
    import jax

    jax.config.update("jax_enable_x64", args.x64)
    if args.num_processes > 1:
        if args.cpu_devices:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import twophase as tp

    # This process's share of the rows, as global arrays split by rows over every
    # device of every process. With one process it is all rows on one device.
    rows = N // jax.process_count()
    start = jax.process_index() * rows
    local = load_rows(start, start + rows)
    if jax.process_count() > 1:
        mesh = Mesh(np.array(jax.devices()), ("data",))
        sharding = NamedSharding(mesh, P("data"))
        data = tuple(jax.make_array_from_process_local_data(sharding, a) for a in local)
    else:
        data = local

    def loss_fn(params, batch):  # the MEAN loss over the batch
        x, y = batch
        return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) @ params["v"] - y) ** 2)

    # The same initial parameters on every process (here: the same seed).
    rng = np.random.default_rng(42)
    params = {
        "w": 0.5 * rng.normal(size=(D, H)),
        "b": np.zeros(H),
        "v": 0.5 * rng.normal(size=(H, 1)),
    }
    dtype = np.float64 if args.x64 else np.float32
    params = {k: v.astype(dtype) for k, v in params.items()}
    data = jax.tree.map(lambda a: a.astype(dtype), data)

    steps_per_epoch = N // BATCH
    result = tp.train(
        loss_fn,
        params,
        data,
        tp.adam_cg(1e-2, policy=tp.switch_at(2 * steps_per_epoch)),  # CG from epoch 3
        batch_size=BATCH,
        full_batch_size=CHUNK,
        max_epochs=args.max_epochs,
        cost_budget=args.cost_budget,
        strict_budget=True,
        checkpoint_dir=args.checkpoint_dir,
    )

    diagnostics = tp.info(result.opt_state)
    last = result.history[-1]
    if jax.process_index() == 0:
        print(
            f"{jax.process_count()} process(es), {jax.device_count()} device(s): "
            f"{len(result.history)} epochs, switch at step {int(diagnostics.switch_step)}, "
            f"train loss {last['train_loss']:.6g}, cost {last['cost']:.4g}, "
            f"stopped by {result.stop_reason}"
        )
    if args.out:
        from twophase import training

        switch_epochs = [r["epoch"] for r in result.history if r["phase"] == 1]
        record = {
            "process_count": jax.process_count(),
            "epochs": len(result.history),
            "switch_step": int(diagnostics.switch_step),
            "switch_epoch": switch_epochs[0] if switch_epochs else None,
            "phase": int(diagnostics.phase),
            "stop_reason": result.stop_reason,
            "train_loss": [r["train_loss"] for r in result.history],
            "history": result.history,
            "params": jax.tree.map(lambda a: np.asarray(a).tolist(), result.params),
            # Executables per jitted piece of tp.train in this process (each compiles once).
            "executables": {
                "phase0": training._phase0_epoch._cache_size(),
                "phase1": training._phase1_step._cache_size(),
                "evaluate": training._evaluate._cache_size(),
            },
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except BaseException:
        # A failing process exits at once: a normal exit would first wait at
        # jax.distributed's shutdown barrier (minutes) for the other processes,
        # which may themselves be waiting for this one in a collective.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
