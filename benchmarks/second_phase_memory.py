"""Parameter-sized buffers of each second phase: kept in the state, and transient in ``update``.

Compiles (does not run) one ``update`` of each second phase on a separable objective of ``n``
float32 parameters and reads XLA's memory analysis of the executable. ``state`` is the state's
size, ``temp`` the scratch memory XLA allocates while ``update`` runs (inner-solve vectors,
line-search trial points, the Hessian-vector product's tangents), both in units of one
parameter vector (``n * 4`` bytes). ``objective temp`` is the same for one ``value_and_grad`` of
the objective alone: what any method pays to evaluate it. Issue 20's memory target ("at most 5
parameter-sized buffers besides the preconditioner") reads on the Newton-CG rows.

Run:
  python benchmarks/second_phase_memory.py [--n 4194304]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from _problems import command_line, markdown_table

import twophase as tp
from twophase.second_phase.evaluating import evaluating
from twophase.second_phase.newton_cg import truncated_cg


def objective(x: jax.Array) -> jax.Array:
    # Separable and smooth: its gradient and Hessian-vector product need O(1) buffers, so the
    # optimizer's own vectors dominate `temp`.
    return jnp.sum(jnp.logaddexp(0.0, x) + 0.5 * x * x - 0.3 * x)


def state_and_temp(transformation, params) -> tuple[float, float]:
    """(state bytes, update temp bytes) of a transformation that evaluates ``objective``."""
    state = jax.eval_shape(transformation.init, params)
    state_bytes = sum(
        leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state) if hasattr(leaf, "size")
    )

    def update(state, params):
        return transformation.update(params, state, params, value_fn=objective)

    stats = jax.jit(update).lower(state, params).compile().memory_analysis()
    return state_bytes, stats.temp_size_in_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4_194_304, help="parameters (float32)")
    args = parser.parse_args(argv)
    params = jax.ShapeDtypeStruct((args.n,), jnp.float32)
    unit = args.n * 4
    objective_temp = (
        jax.jit(jax.value_and_grad(objective)).lower(params).compile().memory_analysis()
    ).temp_size_in_bytes
    diagonal = jnp.ones((args.n,), jnp.float32)
    rows_in = {
        "tp.nonlinear_cg()": tp.nonlinear_cg(),
        "tp.newton_cg()": tp.newton_cg(),
        "tp.newton_cg(preconditioner=diagonal)": tp.newton_cg(preconditioner=diagonal),
        "tp.newton_cg(preconditioner='nystrom'), sketch 60": tp.newton_cg(preconditioner="nystrom"),
        "optax.lbfgs(memory_size=10) (evaluating)": evaluating(optax.lbfgs(memory_size=10)),
    }
    rows = []
    for name, transformation in rows_in.items():
        state_bytes, temp = state_and_temp(transformation, params)
        rows.append(
            [
                name,
                f"{state_bytes / unit:.2f}",
                f"{temp / unit:.2f}",
                f"{(temp - objective_temp) / unit:.2f}",
            ]
        )
    print(f"`{command_line()}`; jax {jax.__version__}, n = {args.n} float32 parameters\n")
    print(f"objective's own value_and_grad temp: {objective_temp / unit:.2f} parameter vectors\n")
    header = ["second phase", "state (x params)", "update temp (x params)", "temp - objective's"]
    print(markdown_table(header, rows))

    def free_product_solve(grad):
        # The inner solve with a product that needs no memory: its own vectors only.
        solve = truncated_cg(lambda v: 2.0 * v, grad, jnp.float32(1e-3), jnp.float32(1e-9), 100)
        return solve.step

    inner = jax.jit(free_product_solve).lower(params).compile().memory_analysis()
    print(
        "\nNewton-CG's inner solve (`truncated_cg`) with a free product (v -> 2 v): "
        f"{inner.temp_size_in_bytes / unit:.2f} parameter vectors of temp (its own vectors)"
    )


if __name__ == "__main__":
    main()
