"""Where full-batch CG ends, by switch epoch: loss, gradient norm and Hessian spectrum.

On ``teacher-student-small`` (49 parameters, ``_problems.py``) at a budget of 1000
epoch-equivalents, ``benchmarks/switching.py`` found that CG started from Adam's point after
some epochs drives the loss to ~1e-8 (four orders of magnitude below Adam), and from others
ends just below Adam. This script reruns those fixed splits (``tp.adam_cg(lr,
policy=tp.switch_at(k epochs))`` through ``tp.train(..., strict_budget=True)`` with
``_problems.train_run``, as ``switching.py`` does: the same Adam learning rate and mini-batch
shuffles for every row; a last row never switches) and, at each run's
final point, computes the full-batch loss, gradient norm and the eigenvalues of the full-batch
Hessian (float32 ``jax.hessian`` of the 49-parameter MSE, eigenvalues in float64 by NumPy): the
smallest, the largest, their ratio where positive, and how many are negative (below ``-1e-6``
times the largest). A positive-definite Hessian at a near-zero loss is the paper's convex basin;
a negative eigenvalue marks a saddle region.

Usage::

    python benchmarks/basin.py [--budget E] [--lr LR] [--splits K ...]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _problems import command_line, markdown_table, mse, small_teacher_student, train_run
from jax.flatten_util import ravel_pytree

import twophase as tp


def end_point_spectrum(params, data) -> tuple[float, float, np.ndarray]:
    """(loss, gradient norm, ascending Hessian eigenvalues) at ``params``."""
    flat, unravel = ravel_pytree(params)

    def loss(v):
        return mse(unravel(v), *data)

    value, grad = jax.value_and_grad(loss)(flat)
    hessian = np.asarray(jax.hessian(loss)(flat), np.float64)
    return float(value), float(jnp.linalg.norm(grad)), np.linalg.eigvalsh(hessian)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=1000, help="epoch-equivalents")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--splits", type=int, nargs="*", default=[2, 10, 21, 93, 198, 423, 900])
    args = parser.parse_args(argv)
    problem = small_teacher_student()
    data = (jnp.asarray(problem.x), jnp.asarray(problem.y))
    spe = problem.steps_per_epoch

    adam_loss = train_run(problem, optax.adam(args.lr), args.budget).loss
    rows = []
    never = args.budget + 1
    for split in [*args.splits, never]:
        optimizer = tp.adam_cg(args.lr, policy=tp.switch_at(split * spe))
        run = train_run(problem, optimizer, args.budget)
        loss, grad_norm, eig = end_point_spectrum(run.params, data)
        negative = int(np.sum(eig < -1e-6 * eig[-1]))
        rows.append(
            [
                "never (Adam only)" if split == never else split,
                run.iterations,
                run.evals,
                f"{loss:.3e}",
                f"{loss / adam_loss:.3g}",
                f"{grad_norm:.2e}",
                f"{eig[0]:.2e}",
                f"{eig[-1]:.2e}",
                f"{eig[-1] / eig[0]:.1e}" if eig[0] > 0 else "-",
                negative,
            ]
        )
        print(f"[split {split} done]", flush=True)
    print("command:", command_line())
    print(
        f"{problem.name}, budget {args.budget}, Adam lr {args.lr}: Adam alone ends at "
        f"{adam_loss:.3e}\n"
    )
    print(
        markdown_table(
            [
                "switch epoch",
                "CG iterations",
                "evaluations",
                "final loss",
                "ratio to Adam",
                "gradient norm",
                "min eigenvalue",
                "max eigenvalue",
                "condition",
                "negative eigenvalues",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
