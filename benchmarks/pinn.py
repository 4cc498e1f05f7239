"""Physics-informed networks: Adam, L-BFGS, and Adam->L-BFGS / CG / Newton-CG / LM at equal cost.

**The suite (the default).** Every problem of ``twophase.experiments.pinn`` (``--problems``;
convection, reaction, wave, burgers, allen_cahn, helmholtz, oscillator), each over ``--seeds``
(default 0-4; the seed draws the initial network, the collocation points are the problem's).
Seeds 0-1 are the TUNING seeds: Adam's learning rate (the grid ``--adam-lrs``, by the mean
log10 final loss) and each family's best fixed split (the switch after ``j / 41`` of the budget,
``SWEEP_SPLITS``; the chain's ``CHAIN_SPLITS``) are chosen there, where every row runs. Seeds
2-4 are the VALIDATION seeds: Adam and each family's chosen row run there with those choices
held fixed, and the tables print both halves (median [min, max] over seeds); to split the
work, run ``--seeds 0 1 --out tuning.json`` first and then ``--seeds 2 3 4 --tuned
tuning.json`` (the choices read from the earlier run), or one seed an invocation. Families
(``SUITE_ROWS``, ``--families``): Adam->L-BFGS with the default policy
(``tp.adam_lbfgs(lr, steps_per_epoch=1, budget=B)``) and at fixed splits; Adam->L-BFGS->Nystrom
Newton-CG (the anchor's NNCG, a nested ``two_phase``); Adam->Levenberg-Marquardt with the
default policy and at fixed splits, on the residual form (``pinn.make_gauss_newton_loss``):
these rows need ``twophase.levenberg_marquardt`` and are skipped with a printed note where the
package lacks it. Each row is read at equal evaluations (its end, at the budget ``B``) and at
equal wall time: Adam's wall time ``W`` at ``B`` (the last logged point at or before ``W``). A
row that ends its budget before ``WALL_SLACK * W`` is rerun with ``WALL_CAP * B`` until ``W``;
one slower than ``WALL_LIMIT * W`` is stopped there (noted). Cost counts what
``twophase.experiments.pinn.train`` counts, and a second phase's ``tp.info(state).cost``
beyond its evaluations and HVPs (an LM phase's Jacobians) is charged too (the column "of which
Jacobians etc."). ``--figure PNG`` draws the relative L2 error against wall time, one panel per
problem (``benchmarks/pinn_figure.py``). One CPU-scale run (width 50, 1000 residual points,
3000 evaluations) is one problem at one seed; ``--full`` is the anchor's scale for a GPU
(``benchmarks/gpu_repro.sh --pinn``).

**The anchor table** (``--anchor-table``, or ``--methods`` / ``--all``): the comparison with
Rathore et al. at one seed, described below.

The three failure-mode problems of Krishnapriyan et al. (NeurIPS 2021) as set up by Rathore et
al., "Challenges in Training PINNs" (ICML 2024): convection (beta = 40), reaction (rho = 5),
wave (beta = 5) (``twophase.experiments.pinn``). Each method trains the same tanh MLP from the
same Xavier-normal initialisation on the FULL loss (residual + initial + boundary terms) until a
budget of ``--budget`` evaluations is spent, and the table reports the final loss, its terms,
the relative L2 error against the exact solution on the grid, the cost and the wall time. The
"grid residual" column is the mean squared PDE residual over every interior grid point (not only
the training ones): far above the training residual term, it flags a network that fits its
residual points and nothing between them.

Cost: every full-batch value-and-gradient evaluation counts one and every Hessian-vector
product ``tp.HVP_COST`` (1.5) evaluations. An Adam step is a full-batch gradient step (one
evaluation). L-BFGS (``optax.lbfgs(memory_size=100)``, zoom strong-Wolfe line search) is
charged each line-search step, plus the evaluation at the current point when its state holds
none (as ``TwoPhaseState.second_phase_evals`` counts); CG and Newton-CG are charged
``tp.info(state).value_and_grad_evals`` (line-search trials included) and Newton-CG also its
``hessian_vector_products``. A step that would take the cost above the budget is discarded
(strict equal cost): ``twophase.experiments.pinn.train``. The table shows the cost, the
evaluations and the HVPs separately, and "zero steps": each second phase's
``tp.info(state).linesearch_failures`` (its steps that made no progress; ``"a+b"`` for
L-BFGS then Newton-CG, ``"?"`` where the state keeps no such count), so a stalled second
phase is visible. Wall time is the training loop's, compilation excluded (shown
separately); the loss terms logged along the way are not counted.

Methods (``METHODS``: one ``(name, make, split)`` line each; ``make(hyperparams)`` returns
the optimizer): Adam over a learning-rate grid (the best final loss is reported, and its
learning rate is used by every two-phase method); L-BFGS alone; Adam->L-BFGS; Adam->CG and
Adam->Newton-CG (``tp.adam_newton_cg``, ``tp.newton_cg`` defaults), plain and preconditioned
by Adam's second moments (``precondition=True``), and Newton-CG on the Gauss-Newton matrix
of the loss's residuals ("GN": ``curvature="gauss_newton"``, given
``pinn.make_gauss_newton_loss`` as its objective); all with the anchor's fixed switch after
1/41, 11/41 and 31/41 of the budget (its 1k, 11k, 31k of 41k iterations), and Adam->L-BFGS and
Adam->CG precond also after 2, 5, 8, 16 and 21 of 41 (``FINE_SPLITS``), Adam->L-BFGS also with
memory 10, 30 and 300 ("m10" ...) and with optax's backtracking (Armijo) line search instead of
zoom ("backtracking") after 5 and 11 of 41 (``VARIANT_SPLITS``); Adam->L-BFGS->Newton-CG,
switching to L-BFGS at the same points and to Newton-CG after L-BFGS has had half of the steps
left (``LBFGS_SHARE``; ``--lbfgs-share``), also with the anchor's damping grid's 1e-2 ("damping
1e-2"); and the default switching policy of ``tp.adam_cg(lr)`` /
``tp.adam_lbfgs(lr)`` / ``tp.adam_newton_cg(lr)`` told the budget (``steps_per_epoch=1``: one
Adam step is one epoch).

Three stages are a nested ``tp.two_phase``: the outer first transformation is
``tp.adam_lbfgs(lr, policy=tp.switch_at(k1))``, the outer second ``tp.newton_cg()``, the
outer detector ``tp.switch_at(k2)``, whose step count includes L-BFGS's steps. Why nesting:
it needs nothing new in the core (two_phase takes any transformation as its first, and an
inner two_phase ignores the incoming gradient in its own second phase), the whole chain is
one state and one compiled step (``tests/experiments/test_pinn.py`` checks that it compiles
once and enters Newton-CG at step ``k2``), and ``tp.info`` of each level reads that level's
counts. The cost of that choice: the outer switch counts steps, not cost (an L-BFGS step
costs one evaluation or more), the outer ``tp.info(state)`` reports only Newton-CG's counts
(``train`` adds the inner level's), and a ``fallback`` of the outer level would return to
L-BFGS, not Adam. The alternative, a "chain" transformation with a list of phases and
switches, would be a new core API for one benchmark row.

The anchor's numbers (``ANCHOR``; lowest loss / relative L2 over 5 seeds and a tuned grid, width
up to 400, 10,000 residual points, 41k iterations, float64) are printed beside ours. Our default
is a CPU scale (one seed, width 50, 1000 residual points, 3000 evaluations); ``--full`` is the
anchor's scale for a GPU (width 200, 10,000 residual points on a 201 x 101 grid, 41,000
evaluations: the anchor counts 41k *iterations*, an L-BFGS iteration costing one evaluation or
more, so our L-BFGS gets fewer iterations).

Usage::

    python benchmarks/pinn.py [--problems NAME ...] [--seeds S ...] [--families F ...]
        [--budget N] [--full] [--width W] [--depth D] [--residual N] [--grid NX NT]
        [--adam-lrs LR ...] [--lbfgs-share F] [--float32] [--log-points N]
        [--tuned tuning.json] [--out results.json] [--figure pinn.png]
    python benchmarks/pinn.py --anchor-table [--methods NAME ... | --all] [--seed S] ...
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)  # the benchmark asks for float64 (see --float32)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _problems import command_line, markdown_table  # noqa: E402

import twophase as tp  # noqa: E402
from twophase.experiments import pinn  # noqa: E402

Hyperparams = dict  # {"lr": Adam's learning rate, "switch": the first second-phase step,
#                      "switch2": the first third-stage step of a chain,
#                      "budget": the run's budget, told to the default policy}


class Method(NamedTuple):
    """A row: ``make(hyperparams)`` returns the optimizer; ``split`` (``j`` of a switch after
    ``j / 41`` of the budget) sets ``hyperparams["switch"]``. The hyperparameters are traced, so
    rows sharing ``make`` share one compilation (``twophase.experiments.pinn.train``)."""

    name: str
    make: Callable[[Hyperparams], optax.GradientTransformation]
    split: int | None = None
    gauss_newton: bool = False  # give it pinn.make_gauss_newton_loss as value_fn


SPLITS = (1, 11, 31)  # the anchor's switch after 1k, 11k, 31k of 41k iterations
FINE_SPLITS = (2, 5, 8, 16, 21)  # a finer grid of switches (wave: issue 19's target)
VARIANT_SPLITS = (5, 11)  # the L-BFGS memory and line-search variants' switches
LBFGS_MEMORY = 100
LBFGS_SHARE = 0.5  # Adam->L-BFGS->Newton-CG: L-BFGS's share of the steps left after Adam


def switch_step(budget: int, j: int) -> int:
    """The first second-phase step of a switch after ``j / 41`` of the budget."""
    return max(1, round(budget * j / 41))


def adam(h: Hyperparams) -> optax.GradientTransformation:
    return optax.adam(h["lr"])


def lbfgs(h: Hyperparams) -> optax.GradientTransformation:
    return optax.lbfgs(memory_size=LBFGS_MEMORY)


def adam_lbfgs_at(h: Hyperparams) -> optax.GradientTransformation:
    return tp.adam_lbfgs(
        h["lr"], second=optax.lbfgs(memory_size=LBFGS_MEMORY), policy=tp.switch_at(h["switch"])
    )


def adam_lbfgs_memory_at(memory: int) -> Callable[[Hyperparams], optax.GradientTransformation]:
    """Adam->L-BFGS with ``memory`` pairs (static, so one function per memory)."""

    def make(h: Hyperparams) -> optax.GradientTransformation:
        return tp.adam_lbfgs(
            h["lr"], second=optax.lbfgs(memory_size=memory), policy=tp.switch_at(h["switch"])
        )

    return make


LBFGS_MEMORIES = (10, 30, 300)
ADAM_LBFGS_MEMORY_AT = {m: adam_lbfgs_memory_at(m) for m in LBFGS_MEMORIES}
BACKTRACKING_STEPS = 30


def adam_lbfgs_backtracking_at(h: Hyperparams) -> optax.GradientTransformation:
    # optax.lbfgs with a backtracking (Armijo) search instead of the zoom strong-Wolfe one;
    # store_grad keeps the accepted point's gradient, so each trial counts one evaluation.
    search = optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=BACKTRACKING_STEPS, store_grad=True
    )
    second = optax.lbfgs(memory_size=LBFGS_MEMORY, linesearch=search)
    return tp.two_phase(optax.adam(h["lr"]), second, tp.switch_at(h["switch"]))


def adam_cg_at(h: Hyperparams) -> optax.GradientTransformation:
    return tp.adam_cg(h["lr"], policy=tp.switch_at(h["switch"]))


def adam_cg_precond_at(h: Hyperparams) -> optax.GradientTransformation:
    return tp.adam_cg(h["lr"], policy=tp.switch_at(h["switch"]), precondition=True)


SHORT_INNER = 10


def adam_newton_cg_at(h: Hyperparams) -> optax.GradientTransformation:
    return tp.adam_newton_cg(h["lr"], policy=tp.switch_at(h["switch"]))


def adam_newton_cg_precond_at(h: Hyperparams) -> optax.GradientTransformation:
    return tp.adam_newton_cg(h["lr"], policy=tp.switch_at(h["switch"]), precondition=True)


def adam_newton_cg_nystrom_at(h: Hyperparams) -> optax.GradientTransformation:
    # Rathore et al.'s NNCG preconditioner: a rank-60 Nystrom sketch of the Hessian, taken
    # every 20 outer iterations (60 products each, counted), applied with the damping.
    return tp.adam_newton_cg(
        h["lr"], second=tp.newton_cg(preconditioner="nystrom"), policy=tp.switch_at(h["switch"])
    )


def adam_newton_cg_short_at(h: Hyperparams) -> optax.GradientTransformation:
    # Cheaper outer iterations: at most SHORT_INNER products per inner solve (default 100).
    return tp.adam_newton_cg(
        h["lr"],
        second=tp.newton_cg(max_inner_iterations=SHORT_INNER, preconditioner="state"),
        policy=tp.switch_at(h["switch"]),
        precondition=True,
    )


def adam_newton_cg_gn_at(h: Hyperparams) -> optax.GradientTransformation:
    return tp.adam_newton_cg(
        h["lr"], second=tp.newton_cg(curvature="gauss_newton"), policy=tp.switch_at(h["switch"])
    )


def newton_cg_step(budget: float, j: int, share: float = LBFGS_SHARE) -> int:
    """The first Newton-CG step of the Adam->L-BFGS->Newton-CG chain switching to L-BFGS
    after ``j / 41`` of the budget: L-BFGS gets ``share`` of the steps left (default half; a
    step count: an L-BFGS step costs one evaluation or more, so it spends at least that share
    of the rest)."""
    first = switch_step(budget, j)
    return first + max(1, round(share * (budget - first)))


def adam_lbfgs_then(h: Hyperparams, third: optax.GradientTransformation):
    """Three stages as a nested two_phase: the outer first transformation is Adam->L-BFGS
    (its own switch_at counts Adam's steps), the outer second is ``third``, and the outer
    switch_at counts every step of the inner chain (Adam's and L-BFGS's)."""
    adam_then_lbfgs = tp.adam_lbfgs(
        h["lr"], second=optax.lbfgs(memory_size=LBFGS_MEMORY), policy=tp.switch_at(h["switch"])
    )
    return tp.two_phase(adam_then_lbfgs, third, tp.switch_at(h["switch2"]))


def adam_lbfgs_newton_cg_at(h: Hyperparams) -> optax.GradientTransformation:
    return adam_lbfgs_then(h, tp.newton_cg())


def adam_lbfgs_newton_cg_gn_at(h: Hyperparams) -> optax.GradientTransformation:
    return adam_lbfgs_then(h, tp.newton_cg(curvature="gauss_newton"))


def adam_lbfgs_newton_cg_nystrom_at(h: Hyperparams) -> optax.GradientTransformation:
    # The anchor's Adam+L-BFGS+NNCG at our equal cost.
    return adam_lbfgs_then(h, tp.newton_cg(preconditioner="nystrom"))


def adam_lbfgs_newton_cg_nystrom_damped_at(h: Hyperparams) -> optax.GradientTransformation:
    # The chain's NNCG starting from the damping of the anchor's grid (1e-2; default 1e-3).
    return adam_lbfgs_then(h, tp.newton_cg(preconditioner="nystrom", damping=1e-2))


def adam_lbfgs_default(h: Hyperparams) -> optax.GradientTransformation:
    # Full batch: one Adam step is one epoch; the default policy is told the budget.
    return tp.adam_lbfgs(
        h["lr"], second=optax.lbfgs(memory_size=LBFGS_MEMORY), steps_per_epoch=1, budget=h["budget"]
    )


def adam_cg_default(h: Hyperparams) -> optax.GradientTransformation:
    return tp.adam_cg(h["lr"], steps_per_epoch=1, budget=h["budget"])


def adam_newton_cg_default(h: Hyperparams) -> optax.GradientTransformation:
    return tp.adam_newton_cg(h["lr"], steps_per_epoch=1, budget=h["budget"])


def adam_newton_cg_nystrom_default(h: Hyperparams) -> optax.GradientTransformation:
    return tp.adam_newton_cg(
        h["lr"],
        second=tp.newton_cg(preconditioner="nystrom"),
        steps_per_epoch=1,
        budget=h["budget"],
    )


METHODS: list[Method] = [
    Method("L-BFGS", lbfgs),
    *[Method(f"Adam->L-BFGS {j}/41", adam_lbfgs_at, j) for j in sorted(SPLITS + FINE_SPLITS)],
    *[
        Method(f"Adam->L-BFGS m{m} {j}/41", ADAM_LBFGS_MEMORY_AT[m], j)
        for m in LBFGS_MEMORIES
        for j in VARIANT_SPLITS
    ],
    *[
        Method(f"Adam->L-BFGS backtracking {j}/41", adam_lbfgs_backtracking_at, j)
        for j in VARIANT_SPLITS
    ],
    *[Method(f"Adam->CG {j}/41", adam_cg_at, j) for j in SPLITS],
    *[
        Method(f"Adam->CG precond {j}/41", adam_cg_precond_at, j)
        for j in sorted(SPLITS + FINE_SPLITS)
    ],
    *[Method(f"Adam->Newton-CG {j}/41", adam_newton_cg_at, j) for j in SPLITS],
    *[Method(f"Adam->Newton-CG precond {j}/41", adam_newton_cg_precond_at, j) for j in SPLITS],
    *[Method(f"Adam->Newton-CG precond short {j}/41", adam_newton_cg_short_at, j) for j in SPLITS],
    *[Method(f"Adam->Newton-CG nystrom {j}/41", adam_newton_cg_nystrom_at, j) for j in SPLITS],
    *[
        Method(f"Adam->L-BFGS->Newton-CG nystrom {j}/41", adam_lbfgs_newton_cg_nystrom_at, j)
        for j in SPLITS
    ],
    *[
        Method(
            f"Adam->L-BFGS->Newton-CG nystrom damping 1e-2 {j}/41",
            adam_lbfgs_newton_cg_nystrom_damped_at,
            j,
        )
        for j in SPLITS
    ],
    *[Method(f"Adam->L-BFGS->Newton-CG {j}/41", adam_lbfgs_newton_cg_at, j) for j in SPLITS],
    *[
        Method(f"Adam->Newton-CG GN {j}/41", adam_newton_cg_gn_at, j, gauss_newton=True)
        for j in SPLITS
    ],
    *[
        Method(
            f"Adam->L-BFGS->Newton-CG GN {j}/41", adam_lbfgs_newton_cg_gn_at, j, gauss_newton=True
        )
        for j in SPLITS
    ],
    Method("tp.adam_lbfgs default", adam_lbfgs_default),
    Method("tp.adam_cg default", adam_cg_default),
    Method("tp.adam_newton_cg default", adam_newton_cg_default),
    Method("tp.adam_newton_cg nystrom default", adam_newton_cg_nystrom_default),
]

# The rows run without --methods / --all: the issues' comparison (L-BFGS alone, Adam->L-BFGS
# and Adam->CG at the anchor's switches, Adam->CG preconditioned, Newton-CG with the anchor's
# Nystrom preconditioner alone and after L-BFGS, each preset's default policy), about 20-30
# minutes for the three problems on 2 cores. --all adds the variants measured once in
# benchmarks/RESULTS.md (finer splits, L-BFGS memories and line searches, other Newton-CG
# preconditioners and curvatures).
DEFAULT_METHODS = (
    "L-BFGS",
    *(f"Adam->L-BFGS {j}/41" for j in SPLITS),
    *(f"Adam->CG {j}/41" for j in SPLITS),
    "Adam->CG precond 11/41",
    "Adam->Newton-CG nystrom 1/41",
    "Adam->L-BFGS->Newton-CG nystrom 11/41",
    "tp.adam_lbfgs default",
    "tp.adam_cg default",
    "tp.adam_newton_cg default",
)

# Rathore et al. (ICML 2024), lowest loss / relative L2 error (/work/shared/PINN.md).
ANCHOR = {
    "Adam": {
        "convection": (1.40e-4, 5.96e-2),
        "reaction": (4.73e-6, 2.12e-2),
        "wave": (2.03e-2, 3.49e-1),
    },
    "L-BFGS": {
        "convection": (1.51e-5, 8.26e-3),
        "reaction": (8.93e-6, 3.83e-2),
        "wave": (1.84e-2, 3.35e-1),
    },
    "Adam+L-BFGS": {
        "convection": (5.95e-6, 4.19e-3),
        "reaction": (3.26e-6, 1.92e-2),
        "wave": (1.12e-3, 5.52e-2),
    },
    "Adam+L-BFGS+NNCG": {
        "convection": (None, 1.94e-3),
        "reaction": (2.89e-7, 9.92e-3),
        "wave": (6.13e-5, 1.27e-2),
    },
}


def anchor_for(method: str) -> str:
    """The anchor's row comparable with ``method`` (``""`` if none)."""
    if method == "Adam (best lr)":
        return "Adam"
    if method == "L-BFGS":
        return "L-BFGS"
    if method.startswith("Adam->L-BFGS->Newton-CG"):
        return "Adam+L-BFGS+NNCG"
    if method.startswith("Adam->L-BFGS"):
        return "Adam+L-BFGS"
    return ""


def format_anchor(row: str, problem: str) -> str:
    if not row or problem not in ANCHOR[row]:
        return ""
    loss, l2 = ANCHOR[row][problem]
    loss_text = "10x below Adam+L-BFGS" if loss is None else f"{loss:.3g}"
    return f"{loss_text} / {l2:.3g}"


def format_zero_steps(zero_steps) -> str:
    """``linesearch_failures`` per second phase (``"3+0"`` for L-BFGS then Newton-CG);
    ``""`` where the state reports none (Adam, optax.lbfgs alone)."""
    if not zero_steps:
        return ""
    return "+".join("?" if z is None else str(z) for z in zero_steps)


# ----------------------------------------------------------------------------------------------
# The suite (the default): every problem, tuning and validation seeds, equal evaluations and
# equal wall time.

SWEEP_SPLITS = (1, 5, 11, 21, 31)  # the best fixed split's sweep, j / 41 of the budget
CHAIN_SPLITS = SPLITS  # Adam->L-BFGS->NNCG: the anchor's switches
TUNING_SEEDS = (0, 1)  # the Adam rate and the best splits are chosen on these ...
VALIDATION_SEEDS = (2, 3, 4)  # ... and reported on these, with the choices held fixed
WALL_LIMIT = 3.0  # a row stops at this multiple of Adam's wall time (flagged in the table)
WALL_SLACK = 0.9  # a row that ends its budget before this share of Adam's wall is rerun
WALL_CAP = 20  # ... with the budget raised to this multiple of it, until Adam's wall time
MIN_WALL = 1.0  # seconds: below this Adam's wall time is noise; no wall limit or rerun then


def levenberg_marquardt():
    """``twophase.levenberg_marquardt`` where the package has it, else ``None`` (the LM rows
    are skipped with a note)."""
    return getattr(tp, "levenberg_marquardt", None)


def adam_lm_at(h: Hyperparams) -> optax.GradientTransformation:
    # Adam, then Levenberg-Marquardt on the residual form (make_gauss_newton_loss).
    return tp.two_phase(optax.adam(h["lr"]), levenberg_marquardt()(), tp.switch_at(h["switch"]))


def adam_lm_default(h: Hyperparams) -> optax.GradientTransformation:
    # The adam_lm preset where there is one; else the default policy, told the budget, as the
    # presets build it (one Adam step is one epoch at full batch).
    preset = getattr(tp, "adam_lm", None)
    if preset is not None:
        return preset(h["lr"], steps_per_epoch=1, budget=h["budget"])
    policy = tp.safe_resort(steps_per_epoch=1, budget=h["budget"])
    return tp.two_phase(optax.adam(h["lr"]), levenberg_marquardt()(), policy)


class SuiteRow(NamedTuple):
    """A row of the suite: ``family`` groups a sweep over ``split`` (``None``: a default
    policy) whose best member, chosen on the tuning seeds, is reported on the validation
    seeds."""

    name: str
    family: str
    make: Callable[[Hyperparams], optax.GradientTransformation]
    split: int | None = None
    gauss_newton: bool = False
    needs_lm: bool = False


SUITE_ROWS: list[SuiteRow] = [
    SuiteRow("Adam->L-BFGS default", "Adam->L-BFGS default", adam_lbfgs_default),
    *[SuiteRow(f"Adam->L-BFGS {j}/41", "Adam->L-BFGS", adam_lbfgs_at, j) for j in SWEEP_SPLITS],
    *[
        SuiteRow(
            f"Adam->L-BFGS->NNCG {j}/41", "Adam->L-BFGS->NNCG", adam_lbfgs_newton_cg_nystrom_at, j
        )
        for j in CHAIN_SPLITS
    ],
    SuiteRow("Adam->LM default", "Adam->LM default", adam_lm_default, None, True, True),
    *[SuiteRow(f"Adam->LM {j}/41", "Adam->LM", adam_lm_at, j, True, True) for j in SWEEP_SPLITS],
]


FAMILIES = tuple(dict.fromkeys(row.family for row in SUITE_ROWS))


class Setup(NamedTuple):
    """One problem at one seed: the same collocation points for every seed (the points are
    part of the problem); the seed draws the initial network."""

    problem: pinn.Problem
    loss_fn: Callable
    gauss_newton_loss: Callable
    error_fn: Callable
    grid: jax.Array
    points: pinn.Collocation


def make_setup(name: str, s: dict, dtype) -> Setup:
    problem = pinn.make_problem(name)
    n_x, n_t = s["grid"]
    points = pinn.collocation(problem, n_x=n_x, n_t=n_t, n_residual=s["residual"], dtype=dtype)
    grid = pinn.evaluation_grid(problem, n_x, n_t, dtype=dtype)
    error_fn = jax.jit(lambda p: pinn.relative_l2_error(p, problem, grid))
    return Setup(
        problem,
        pinn.make_loss(problem, points),
        pinn.make_gauss_newton_loss(problem, points),
        error_fn,
        grid,
        points,
    )


def initial_params(setup: Setup, s: dict, seed: int, dtype):
    problem = setup.problem
    widths = (s["width"],) * s["depth"]
    return pinn.init_mlp(
        jax.random.PRNGKey(seed),
        widths,
        dtype=dtype,
        n_inputs=problem.n_inputs,
        n_outputs=problem.n_outputs,
    )


def at_wall(log: dict, wall: float) -> dict:
    """The logged point of a curve at the wall time ``wall``: the last one at or before it."""
    times = np.asarray(log["wall"])
    i = int(np.searchsorted(times, wall * (1 + 1e-9), side="right")) - 1
    return {k: float(log[k][max(i, 0)]) for k in ("loss", "error", "cost", "wall")}


def suite_run(setup: Setup, params, make, h: dict, s: dict, gauss_newton: bool, wall=None):
    """One training run at the budget (stopped at ``WALL_LIMIT`` times Adam's wall time
    ``wall``), read at equal evaluations (its end) and at equal wall time (``wall``; a run
    that ended its budget before ``WALL_SLACK * wall`` is rerun with a budget of ``WALL_CAP``
    times it until ``wall``). Neither the limit nor the rerun applies when ``wall`` is below
    ``MIN_WALL`` (tiny runs, where wall time is noise)."""
    value_fn = setup.gauss_newton_loss if gauss_newton else None
    timed = wall is not None and wall >= MIN_WALL
    common = {"hyperparams": h, "value_fn": value_fn, "error_fn": setup.error_fn}
    log = pinn.train(
        setup.loss_fn,
        params,
        make,
        budget=s["budget"],
        log_points=s["log_points"],
        wall_budget=WALL_LIMIT * wall if timed else None,
        **common,
    )
    curve = {
        "cost": log.cost.tolist(),
        "loss": log.loss.tolist(),
        "error": log.error.tolist(),
        "wall": log.wall.tolist(),
    }
    record = {
        "loss": float(log.loss[-1]),
        "l2": float(log.error[-1]),
        "cost": float(log.cost[-1]),
        "evaluations": log.evaluations,
        "hvps": log.hessian_vector_products,
        "other_cost": log.other_cost,
        "wall": log.wall_seconds,
        "compile": log.compile_seconds,
        "switch_cost": log.switch_cost,
        "stopped_by_wall": timed
        and bool(log.cost[-1] < s["budget"] - 2)
        and log.wall_seconds >= WALL_LIMIT * wall,
        "curve": curve,
    }
    if wall is None:
        return record
    if timed and log.wall_seconds < WALL_SLACK * wall:
        longer = pinn.train(
            setup.loss_fn,
            params,
            make,
            budget=WALL_CAP * s["budget"],
            log_points=WALL_CAP * s["log_points"],
            wall_budget=wall,
            **common,
        )
        curve = {
            "cost": longer.cost.tolist(),
            "loss": longer.loss.tolist(),
            "error": longer.error.tolist(),
            "wall": longer.wall.tolist(),
        }
        record["wall_curve"] = curve
    record["at_wall"] = at_wall(curve, wall)
    return record


def suite_hyperparams(lr: float, split: int | None, s: dict, dtype) -> Hyperparams:
    budget = s["budget"]
    return {
        "lr": np.asarray(lr, dtype),
        "switch": np.int32(switch_step(budget, split or 1)),
        "switch2": np.int32(newton_cg_step(budget, split or 1, s["lbfgs_share"])),
        "budget": np.float32(budget),
    }


def mean_log_loss(records: list[dict]) -> float:
    """The mean of log10 final losses (equal evaluations): the tuning criterion."""
    return float(np.mean([np.log10(max(r["loss"], 1e-300)) for r in records]))


def seed_split(seeds: list[int]) -> tuple[list[int], list[int]]:
    """(tuning seeds, validation seeds) among ``seeds``: seeds 0-1 tune, the others validate."""
    return [x for x in seeds if x in TUNING_SEEDS], [x for x in seeds if x not in TUNING_SEEDS]


def tune_adam(setup: Setup, s: dict, seeds: list[int], dtype) -> tuple[float, dict, dict]:
    """Adam over the learning-rate grid on ``seeds``: (best rate by mean log loss, its run per
    seed, mean log loss per rate)."""
    found: dict[tuple[int, float], dict] = {}
    for seed in seeds:
        params = initial_params(setup, s, seed, dtype)
        for lr in s["adam_lrs"]:
            h = suite_hyperparams(lr, None, s, dtype)
            found[seed, lr] = suite_run(setup, params, adam, h, s, False)
            found[seed, lr]["at_wall"] = at_wall(found[seed, lr]["curve"], found[seed, lr]["wall"])
    scores = {lr: mean_log_loss([found[seed, lr] for seed in seeds]) for lr in s["adam_lrs"]}
    best = min(scores, key=scores.get)
    return best, {seed: found[seed, best] for seed in seeds}, scores


def run_rows(setup, s, seed, rows, lr, runs, dtype) -> None:
    """Every row in ``rows`` at ``seed`` into ``runs[seed]`` (Adam's run there sets the wall
    time)."""
    params = initial_params(setup, s, seed, dtype)
    wall = runs[seed]["Adam"]["wall"]
    for row in rows:
        h = suite_hyperparams(lr, row.split, s, dtype)
        r = suite_run(setup, params, row.make, h, s, row.gauss_newton, wall)
        runs[seed][row.name] = r
        print(
            f"  {setup.problem.name} seed {seed}: {row.name}: loss {r['loss']:.3e}, L2 "
            f"{r['l2']:.2e} at cost {r['cost']:g}; at {wall:.1f} s: loss "
            f"{r['at_wall']['loss']:.3e}, L2 {r['at_wall']['error']:.2e}",
            flush=True,
        )


def validate(setup, s, seeds, rows, lr, best, runs, dtype) -> None:
    """Adam at ``lr`` and each family's chosen row (``best``) at every seed in ``seeds``."""
    chosen = [row for row in rows if row.name in best.values()]
    for seed in seeds:
        params = initial_params(setup, s, seed, dtype)
        h = suite_hyperparams(lr, None, s, dtype)
        runs[seed]["Adam"] = suite_run(setup, params, adam, h, s, False)
        runs[seed]["Adam"]["at_wall"] = at_wall(
            runs[seed]["Adam"]["curve"], runs[seed]["Adam"]["wall"]
        )
        run_rows(setup, s, seed, chosen, lr, runs, dtype)


def run_suite_problem(
    name: str, s: dict, seeds: list[int], rows: list[SuiteRow], dtype, tuned: dict | None = None
) -> dict:
    """One problem: Adam's rate and each family's best split chosen on the tuning seeds (every
    row runs there), then Adam and each family's chosen row on the validation seeds. With
    ``tuned`` (this problem's result from an earlier run's ``--out``), its choices are used
    and every seed is run as a validation seed."""
    setup = make_setup(name, s, dtype)
    runs: dict[int, dict] = {seed: {} for seed in seeds}
    if tuned is not None:
        families = {row.family for row in rows}
        best = {f: r for f, r in tuned["best"].items() if f in families}
        validate(setup, s, seeds, rows, tuned["best_lr"], best, runs, dtype)
        return {
            "best_lr": tuned["best_lr"],
            "adam_lrs": tuned["adam_lrs"],
            "best": best,
            "tuning_seeds": [],  # none run here
            "validation_seeds": list(seeds),
            "chosen_on": f"tuning (of an earlier run: {tuned['tuning_seeds']})",
            "runs": {str(seed): r for seed, r in runs.items()},
        }
    tuning, validation = seed_split(seeds)
    choose_on = tuning or validation  # without tuning seeds the choice is not held out
    lr, adam_runs, scores = tune_adam(setup, s, choose_on, dtype)
    for seed in choose_on:
        runs[seed]["Adam"] = adam_runs[seed]
        run_rows(setup, s, seed, rows, lr, runs, dtype)
    best = {}
    for family in dict.fromkeys(row.family for row in rows):
        members = [row.name for row in rows if row.family == family]
        best[family] = min(members, key=lambda m: mean_log_loss([runs[x][m] for x in choose_on]))
    if tuning:
        validate(setup, s, validation, rows, lr, best, runs, dtype)
    return {
        "best_lr": lr,
        "adam_lrs": {str(k): v for k, v in scores.items()},
        "best": best,
        "tuning_seeds": tuning,
        "validation_seeds": validation,
        "chosen_on": "tuning" if tuning else "validation (no tuning seed run: not held out)",
        "runs": {str(seed): r for seed, r in runs.items()},
    }


def spread(values: list[float], digits: str = ".2e") -> str:
    """``median [min, max]`` (just the value for one seed; ``""`` for none)."""
    if not values:
        return ""
    mid = f"{float(np.median(values)):{digits}}"
    if len(values) == 1:
        return mid
    return f"{mid} [{min(values):{digits}}, {max(values):{digits}}]"


def suite_table_rows(result: dict, seeds: list[int], names: list[str]) -> list[list[str]]:
    rows = []
    for name in names:
        found = [result["runs"][str(x)][name] for x in seeds if name in result["runs"][str(x)]]
        if not found:
            continue
        walls = [r["at_wall"] for r in found]
        notes = []
        if any(r.get("stopped_by_wall") for r in found):
            notes.append(f"stopped at {WALL_LIMIT:g}x Adam's wall")
        if any("wall_curve" in r for r in found):
            notes.append("rerun to Adam's wall")
        rows.append(
            [
                name,
                ",".join(str(x) for x in seeds if name in result["runs"][str(x)]),
                spread([r["loss"] for r in found]),
                spread([r["l2"] for r in found]),
                spread([r["cost"] for r in found], "g"),
                spread([r["other_cost"] for r in found], "g"),
                spread([w["loss"] for w in walls]),
                spread([w["error"] for w in walls]),
                spread([w["wall"] for w in walls], ".1f"),
                spread([r["compile"] for r in found], ".1f"),
                "; ".join(notes),
            ]
        )
    return rows


SUITE_HEADER = [
    "method",
    "seeds",
    "loss, equal evals",
    "rel. L2, equal evals",
    "cost (evals)",
    "of which Jacobians etc.",
    "loss, equal wall",
    "rel. L2, equal wall",
    "at wall s",
    "compile s",
    "notes",
]


def print_suite_problem(name: str, result: dict, rows: list[SuiteRow], s: dict) -> None:
    tuning, validation = result["tuning_seeds"], result["validation_seeds"]
    lrs = ", ".join(f"{lr}: {v:.2f}" for lr, v in result["adam_lrs"].items())
    print(
        f"\n### {name}: budget {s['budget']} evaluations; Adam's rate {result['best_lr']:g} "
        f"(mean log10 loss by rate: {lrs}); choices made on the {result['chosen_on']} seeds; "
        "median [min, max] over seeds; equal wall = Adam's wall time at the budget\n"
    )
    chosen = {v: k for k, v in result["best"].items()}
    if tuning:
        names = ["Adam", *(row.name for row in rows)]
        table = suite_table_rows(result, tuning, names)
        for line in table:
            if line[0] in chosen and chosen[line[0]] != line[0]:
                line[0] += " (chosen)"
        print(f"Tuning seeds {tuning}:\n")
        print(markdown_table(SUITE_HEADER, table))
    if validation:
        names = ["Adam", *result["best"].values()]
        print(f"\nValidation seeds {validation} (the choices above held fixed):\n")
        print(markdown_table(SUITE_HEADER, suite_table_rows(result, validation, names)))


def print_suite_summary(results: dict) -> None:
    """Per problem and family, the chosen row's median relative L2 error on the validation
    seeds (the tuning seeds where none ran), at equal evaluations / equal wall time."""
    families = list(dict.fromkeys(f for r in results.values() for f in ["Adam", *r["best"]]))
    header = ["method", *results]
    rows = []
    for family in families:
        line = [family]
        for result in results.values():
            seeds = result["validation_seeds"] or result["tuning_seeds"]
            name = "Adam" if family == "Adam" else result["best"].get(family)
            found = [result["runs"][str(x)].get(name) for x in seeds]
            found = [r for r in found if r is not None]
            if not found:
                line.append("")
                continue
            evals = float(np.median([r["l2"] for r in found]))
            wall = float(np.median([r["at_wall"]["error"] for r in found]))
            line.append(f"{evals:.2e} / {wall:.2e}")
        rows.append(line)
    print("\n### Summary: median relative L2 error, equal evaluations / equal wall time\n")
    print(markdown_table(header, rows))


def main_suite(args: argparse.Namespace, s: dict) -> dict:
    dtype = jnp.float32 if args.float32 else jnp.float64
    rows = [row for row in SUITE_ROWS if not args.families or row.family in args.families]
    if levenberg_marquardt() is None and any(row.needs_lm for row in rows):
        rows = [row for row in rows if not row.needs_lm]
        print("note: twophase.levenberg_marquardt is absent here: the Adam->LM rows are skipped.")
    results = {}
    for name in args.problems:
        started = time.perf_counter()
        tuned = None
        if getattr(args, "tuned", None):
            with open(args.tuned) as f:
                earlier = json.load(f)["results"]
            if name not in earlier:
                raise SystemExit(f"pinn.py: --tuned {args.tuned} has no results for {name}")
            tuned = earlier[name]
        results[name] = run_suite_problem(name, s, s["seeds"], rows, dtype, tuned)
        results[name]["seconds"] = time.perf_counter() - started
        print_suite_problem(name, results[name], rows, s)
        print(f"\n({name}: {results[name]['seconds']:.0f} s in all, compilation included)")
    print_suite_summary(results)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--problems", nargs="+", choices=pinn.PROBLEM_NAMES, default=list(pinn.PROBLEM_NAMES)
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help=f"seeds (default {' '.join(map(str, TUNING_SEEDS + VALIDATION_SEEDS))}: "
        f"{TUNING_SEEDS} tune, the others validate)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        help="the suite's method families to run (default all; Adam always runs)",
    )
    parser.add_argument(
        "--tuned",
        metavar="JSON",
        help="take Adam's rate and the best splits from this earlier --out file (its tuning "
        "seeds) and run every --seeds seed as a validation seed",
    )
    parser.add_argument("--figure", help="write the error-against-wall-time figure (PNG) here")
    parser.add_argument(
        "--anchor-table",
        action="store_true",
        help="the anchor comparison (DEFAULT_METHODS rows, one seed) instead of the suite",
    )
    parser.add_argument("--full", action="store_true", help="the anchor's scale (a GPU job)")
    parser.add_argument(
        "--budget", type=int, help="evaluations per method (default 3000; --full 41000)"
    )
    parser.add_argument("--width", type=int, help="hidden width (default 50; --full 200)")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    parser.add_argument("--residual", type=int, help="residual points (default 1000; --full 10000)")
    parser.add_argument(
        "--grid",
        type=int,
        nargs=2,
        metavar=("NX", "NT"),
        help="grid (default 101 101; --full 201 101)",
    )
    parser.add_argument(
        "--adam-lrs",
        type=float,
        nargs="+",
        help="Adam learning rates (default 1e-3 3e-3 1e-2; --full 1e-4 ... 1e-2)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="run only these METHODS rows (names as printed; Adam always runs)",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="run every METHODS row, not only DEFAULT_METHODS (hours on a CPU)",
    )
    parser.add_argument(
        "--lbfgs-share",
        type=float,
        default=LBFGS_SHARE,
        help="Adam->L-BFGS->Newton-CG rows: L-BFGS's share of the steps left after Adam, in "
        f"(0, 1) (default {LBFGS_SHARE})",
    )
    parser.add_argument("--seed", type=int, help="one seed (the same as --seeds S)")
    parser.add_argument("--float32", action="store_true", help="float32 instead of float64")
    parser.add_argument("--log-points", type=int, default=40, help="logged points per run")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def settings(args: argparse.Namespace) -> dict:
    full = args.full
    resolved = {
        "budget": args.budget or (41_000 if full else 3000),
        "width": args.width or (200 if full else 50),
        "depth": args.depth,
        "residual": args.residual or (10_000 if full else 1000),
        "grid": tuple(args.grid or ((201, 101) if full else (101, 101))),
        "adam_lrs": tuple(
            args.adam_lrs or ((1e-4, 3e-4, 1e-3, 3e-3, 1e-2) if full else (1e-3, 3e-3, 1e-2))
        ),
        "dtype": "float32" if args.float32 else "float64",
    }
    for name in ("budget", "width", "depth", "residual"):
        if resolved[name] < 1:
            raise SystemExit(f"pinn.py: --{name} must be positive")
    if not 0 < args.lbfgs_share < 1:
        raise SystemExit(f"pinn.py: --lbfgs-share must be in (0, 1), got {args.lbfgs_share}")
    resolved["lbfgs_share"] = args.lbfgs_share
    if args.seeds and args.seed is not None:
        raise SystemExit("pinn.py: give --seeds or --seed, not both")
    seeds = args.seeds or ([args.seed] if args.seed is not None else None)
    resolved["seeds"] = list(seeds or TUNING_SEEDS + VALIDATION_SEEDS)
    if len(set(resolved["seeds"])) != len(resolved["seeds"]) or min(resolved["seeds"]) < 0:
        raise SystemExit(f"pinn.py: --seeds must be distinct and >= 0, got {resolved['seeds']}")
    resolved["log_points"] = args.log_points
    if args.log_points < 1:
        raise SystemExit("pinn.py: --log-points must be positive")
    return resolved


def grid_residual(params, problem, points, grid) -> float:
    """The mean squared PDE residual over every interior point of the evaluation grid: far
    above the training residual when the network overfits its residual points."""
    dense = points._replace(residual=grid[pinn.grid_interior(problem, grid)])
    return float(pinn.loss_terms(params, problem, dense)[1]["residual"])


def run_one(
    problem, loss_fn, points, grid, params, make, h, budget, log_points, value_fn=None
) -> dict:
    log = pinn.train(
        loss_fn,
        params,
        make,
        budget=budget,
        log_points=log_points,
        hyperparams=h,
        value_fn=value_fn,
    )
    return {
        "grid_residual": grid_residual(log.params, problem, points, grid),
        "loss": float(log.loss[-1]),
        "terms": {k: float(v[-1]) for k, v in log.terms.items()},
        "l2": float(pinn.relative_l2_error(log.params, problem, grid)),
        "cost": float(log.cost[-1]),
        "evaluations": log.evaluations,
        "hvps": log.hessian_vector_products,
        "zero_steps": log.zero_steps,
        "steps": log.steps,
        "switch_cost": log.switch_cost,
        "wall": log.wall_seconds,
        "compile": log.compile_seconds,
        "curve": {"cost": log.cost.tolist(), "loss": log.loss.tolist()},
    }


def main() -> None:
    args = build_parser().parse_args()
    s = settings(args)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {s}")
    if args.methods or args.all or args.anchor_table:
        main_anchor_table(args, s)
        return
    started = time.perf_counter()
    results = main_suite(args, s)
    print(f"\nTotal wall time {time.perf_counter() - started:.0f} s (compilation included).")
    print(f"Command: `{command_line()}`")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": s, "command": command_line(), "results": results}, f, indent=1)
    if args.figure:
        from pinn_figure import plot_suite

        plot_suite(results, args.figure)
        print(f"Figure: {args.figure}")


def main_anchor_table(args: argparse.Namespace, s: dict) -> None:
    """The anchor comparison: Adam's rate grid and ``DEFAULT_METHODS`` (or ``--methods``,
    ``--all``) at one seed, with the anchor's figures beside ours."""
    methods = METHODS if args.all else [m for m in METHODS if m.name in DEFAULT_METHODS]
    if args.methods:
        known = {m.name for m in METHODS}
        unknown = set(args.methods) - known
        if unknown:
            raise SystemExit(
                f"pinn.py: unknown --methods {sorted(unknown)}; known: {sorted(known)}"
            )
        methods = [m for m in METHODS if m.name in args.methods]
    dtype = jnp.float32 if args.float32 else jnp.float64
    widths = (s["width"],) * s["depth"]
    seed = s["seeds"][0]
    results: dict[str, dict] = {}
    started_all = time.perf_counter()
    for name in args.problems:
        problem = pinn.make_problem(name)
        n_x, n_t = s["grid"]
        points = pinn.collocation(
            problem, n_x=n_x, n_t=n_t, n_residual=s["residual"], seed=seed, dtype=dtype
        )
        grid = pinn.evaluation_grid(problem, n_x, n_t, dtype=dtype)
        loss_fn = pinn.make_loss(problem, points)
        gauss_newton_loss = pinn.make_gauss_newton_loss(problem, points)
        params = pinn.init_mlp(
            jax.random.PRNGKey(seed),
            widths,
            dtype=dtype,
            n_inputs=problem.n_inputs,
            n_outputs=problem.n_outputs,
        )
        rows: dict[str, dict] = {}
        adam_runs = {}
        for lr in s["adam_lrs"]:
            h = {
                "lr": np.asarray(lr, dtype),
                "switch": np.int32(1),
                "switch2": np.int32(2),
                "budget": np.float32(s["budget"]),
            }
            adam_runs[lr] = run_one(
                problem, loss_fn, points, grid, params, adam, h, s["budget"], args.log_points
            )
            print(f"  {name}: Adam lr={lr:g}: loss {adam_runs[lr]['loss']:.3e}", flush=True)
        best_lr = min(adam_runs, key=lambda lr: adam_runs[lr]["loss"])
        rows["Adam (best lr)"] = adam_runs[best_lr]
        for method in methods:
            rows[method.name] = run_one(
                problem,
                loss_fn,
                points,
                grid,
                params,
                method.make,
                {
                    "lr": np.asarray(best_lr, dtype),
                    "switch": np.int32(switch_step(s["budget"], method.split or 1)),
                    "switch2": np.int32(
                        newton_cg_step(s["budget"], method.split or 1, s["lbfgs_share"])
                    ),
                    "budget": np.float32(s["budget"]),
                },
                s["budget"],
                args.log_points,
                gauss_newton_loss if method.gauss_newton else None,
            )
            r = rows[method.name]
            summary = (
                f"loss {r['loss']:.3e}, cost {r['cost']:g} ({r['evaluations']} evaluations, "
                f"{r['hvps']} HVPs), zero steps {format_zero_steps(r['zero_steps'])}, "
                f"{r['wall']:.1f} s"
            )
            print(f"  {name}: {method.name}: {summary}", flush=True)
        results[name] = {
            "best_lr": best_lr,
            "adam_lrs": {str(k): v["loss"] for k, v in adam_runs.items()},
            "rows": rows,
        }
        print_problem(name, results[name], s["budget"])
    print_summary(results)
    print(f"\nTotal wall time {time.perf_counter() - started_all:.0f} s (compilation included).")
    print(f"Command: `{command_line()}`")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": s, "command": command_line(), "results": results}, f, indent=1)


def print_problem(name: str, result: dict, budget: int) -> None:
    adam_loss = next(iter(result["rows"].values()))["loss"]
    term_names = list(next(iter(result["rows"].values()))["terms"])
    header = [
        "problem",
        "method",
        "final loss",
        "x Adam",
        *term_names,
        "grid residual",
        "rel. L2",
        "cost",
        "evals",
        "HVPs",
        "zero steps",
        "switch at",
        "wall s (compile s)",
        "anchor loss / L2",
    ]
    rows = []
    for method, r in result["rows"].items():
        rows.append(
            [
                name,
                method,
                f"{r['loss']:.3e}",
                f"{r['loss'] / adam_loss:.3g}",
                *[f"{r['terms'][t]:.2e}" for t in term_names],
                f"{r['grid_residual']:.2e}",
                f"{r['l2']:.3e}",
                f"{r['cost']:g}",
                r["evaluations"],
                r["hvps"],
                format_zero_steps(r["zero_steps"]),
                "" if r["switch_cost"] is None else f"{r['switch_cost']:g}",
                f"{r['wall']:.1f} ({r['compile']:.1f})",
                format_anchor(anchor_for(method), name),
            ]
        )
    lrs = ", ".join(f"{lr}: {loss:.3e}" for lr, loss in result["adam_lrs"].items())
    print(
        f"\n### {name} (budget {budget} evaluations; Adam's final loss by learning rate: {lrs}; "
        f"the two-phase methods use {result['best_lr']:g})\n"
    )
    print(markdown_table(header, rows))


def print_summary(results: dict) -> None:
    names = list(results)
    methods = list(next(iter(results.values()))["rows"])
    header = ["method", *[f"{n} (ours)" for n in names], *[f"{n} (anchor)" for n in names]]
    rows = []
    for method in methods:
        ours = []
        for n in names:
            r = results[n]["rows"][method]
            ours.append(f"{r['loss']:.2e} / {r['l2']:.2e}")
        rows.append([method, *ours, *[format_anchor(anchor_for(method), n) for n in names]])
    nncg = "Adam+L-BFGS+NNCG (anchor only)"
    rows.append([nncg, *[""] * len(names), *[format_anchor("Adam+L-BFGS+NNCG", n) for n in names]])
    print("\n### Summary: final loss / relative L2 error\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
