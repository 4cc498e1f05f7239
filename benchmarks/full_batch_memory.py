"""Peak compiled memory of ``value_and_grad(full_batch(...))`` versus ``batch_size``.

Compiles (does not run) one jitted value-and-gradient of an MLP loss over a fixed
data set for several chunk sizes and prints XLA's memory analysis of each
executable as a markdown table. ``temp`` is the scratch memory XLA allocates
(activations, residuals, gradient accumulators); the data and parameters are
arguments and are counted separately. With chunking, ``temp`` should scale
with the chunk, not the data set.

Run:
  python benchmarks/full_batch_memory.py [--examples 65536] [--features 784]
"""

from __future__ import annotations

import argparse
import shlex
import sys

import jax
import jax.numpy as jnp

from twophase.objectives import full_batch

MiB = 2.0**20


def init_mlp(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
    """Dense layers ``sizes[0] -> ... -> sizes[-1]`` as a list of ``{"w", "b"}``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (m, n), jnp.float32) / jnp.sqrt(m),
            "b": jnp.zeros((n,), jnp.float32),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_loss(params: list[dict[str, jax.Array]], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy of a tanh MLP; ``batch = (x (B, F), labels (B,))``."""
    x, labels = batch
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    logits = x @ params[-1]["w"] + params[-1]["b"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def memory_row(params, data, batch_size: int | None) -> dict[str, float]:
    """Compiled memory statistics (MiB) of value-and-grad for one ``batch_size``."""

    def value_and_grad(params, data):
        return jax.value_and_grad(full_batch(mlp_loss, data, batch_size=batch_size))(params)

    stats = jax.jit(value_and_grad).lower(params, data).compile().memory_analysis()
    return {
        "temp": stats.temp_size_in_bytes / MiB,
        "argument": stats.argument_size_in_bytes / MiB,
        "output": stats.output_size_in_bytes / MiB,
        "alias": stats.alias_size_in_bytes / MiB,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=65536)
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--batch-sizes",
        type=lambda s: None if s == "None" else int(s),
        nargs="+",
        default=[None, 8192, 1024, 256, 1000],
    )
    args = parser.parse_args(argv)

    # Abstract data: nothing of size N is allocated; only compilation happens.
    data = (
        jax.ShapeDtypeStruct((args.examples, args.features), jnp.float32),
        jax.ShapeDtypeStruct((args.examples,), jnp.int32),
    )
    params = init_mlp(jax.random.key(0), [args.features, *args.hidden, args.classes])
    n_params = sum(x.size for x in jax.tree.leaves(params))

    print(f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`")
    print(
        "\nvalue_and_grad(full_batch(mlp_loss, data, batch_size=...)) on "
        f"{jax.devices()[0].platform}, jax {jax.__version__}: "
        f"N={args.examples} x {args.features} float32 "
        f"({args.examples * (args.features + 1) * 4 / MiB:.1f} MiB data), "
        f"MLP {[args.features, *args.hidden, args.classes]} ({n_params:,} params).\n"
    )
    print("| batch_size | chunks + rest | temp (MiB) | arguments (MiB) | output (MiB) |")
    print("|---:|:---|---:|---:|---:|")
    for bs in args.batch_sizes:
        row = memory_row(params, data, bs)
        b = args.examples if bs is None else min(bs, args.examples)
        chunks = f"{args.examples // b} x {b} + {args.examples % b}"
        print(
            f"| {bs} | {chunks} | {row['temp']:.1f} | {row['argument']:.1f} | {row['output']:.1f} |"
        )


if __name__ == "__main__":
    main()
