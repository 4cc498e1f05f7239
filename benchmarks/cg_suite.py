"""Evaluations to a small gradient: twophase's nonlinear CG against scipy, optax and jaxopt.

What is measured. Each solver starts from the problem's standard point and runs until the
Euclidean gradient norm at its current iterate is at most ``GTOL = 1e-5`` (float64 throughout).
A cell reports ``evaluations (iterations)``; a run that hits the cap (``--max-evals``
evaluations or ``--max-iters`` iterations) or stops early reports ``no conv`` with the gradient
norm reached. The last rows give the geometric mean of evaluations over the problems (only for
solvers that converged on all of them) and twophase ``hager_zhang`` (the default rule) relative
to scipy.

How evaluations are counted. One evaluation is one computation of the objective *with* its
gradient (every solver here always asks for both). The objective is wrapped by
:class:`EvalCounter`: a host-side counter incremented by ``jax.debug.callback`` inside the traced
objective, so it counts exactly the evaluations that the compiled code executes (a callback inside
an untaken ``lax.cond`` branch or a finished ``while_loop`` does not run; tracing does not count).
For scipy the counter sits in the Python function passed with ``jac=True``, which returns
``(f, g)`` together, so one call is one evaluation (it equals ``nfev``). Each solver's own count is
read as well and any mismatch is printed below the table:

* twophase: ``twophase.info(state).value_and_grad_evals``;
* optax L-BFGS: ``value_and_grad_from_state`` evaluates only on the first iteration (the state's
  value is ``inf``); later the zoom line search's value and gradient are reused, and each zoom
  step makes one evaluation, so the count is ``1 + sum(info.num_linesearch_steps)``;
* jaxopt NonlinearCG: ``state.num_fun_eval`` (starts at 1 for ``init_state``'s evaluation).

The JAX solvers run one jitted step per iteration from a Python loop that checks the stop
criterion; each (solver, problem) step compiles once (checked). ``--sweep`` runs a grid of
twophase variants (beta x c2 x initial_step x restart_threshold), using twophase's own count,
and ranks them by the geometric mean of their evaluation ratios to scipy CG.

Usage::

    python benchmarks/cg_suite.py [--quick] [--problems NAME ...] [--starts K]
                                  [--sweep full|focused] [--jobs N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import itertools
import math
import multiprocessing
import pathlib
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jaxopt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optax.tree  # noqa: E402
import scipy  # noqa: E402
import scipy.optimize  # noqa: E402
from _problems import markdown_table  # noqa: E402
from jax import lax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import twophase  # noqa: E402

GTOL = 1e-5
BETAS = ("fletcher_reeves", "polak_ribiere", "hestenes_stiefel", "dai_yuan", "hager_zhang")
DEFAULT_BETA = "polak_ribiere"


# --------------------------------------------------------------------------- problems


class Problem(NamedTuple):
    """An unconstrained test problem: ``fn`` maps a flat float64 vector to a scalar."""

    name: str
    fn: Callable[[jax.Array], jax.Array]
    x0: jax.Array


def strongly_typed(tree):
    """``tree`` with no weak-typed leaves, so that a jitted step's outputs, fed back as its
    inputs, match the first call's types (a weak type would cost a second compilation)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), tree)


def rosenbrock(x: jax.Array) -> jax.Array:
    """Extended Rosenbrock (More, Garbow & Hillstrom #21): ``n/2`` independent 2-d pairs."""
    odd, even = x[0::2], x[1::2]
    return jnp.sum(100.0 * (even - odd**2) ** 2 + (1.0 - odd) ** 2)


def chained_rosenbrock(x: jax.Array) -> jax.Array:
    """Chained Rosenbrock, ``scipy.optimize.rosen``: neighbouring coordinates coupled."""
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def extended_powell(x: jax.Array) -> jax.Array:
    """Extended Powell singular function (MGH #22), ``n`` a multiple of 4."""
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    return jnp.sum((a + 10 * b) ** 2 + 5 * (c - d) ** 2 + (b - 2 * c) ** 4 + 10 * (a - d) ** 4)


def trigonometric(x: jax.Array) -> jax.Array:
    """Trigonometric function (MGH #26)."""
    n = x.shape[0]
    i = jnp.arange(1, n + 1, dtype=x.dtype)
    residuals = n - jnp.sum(jnp.cos(x)) + i * (1 - jnp.cos(x)) - jnp.sin(x)
    return jnp.sum(residuals**2)


def diagonal_quadratic(eigenvalues: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """``f(x) = 0.5 * sum(eigenvalues * x**2)``."""

    def fn(x):
        return 0.5 * jnp.sum(eigenvalues * x**2)

    return fn


def _init_mlp(key: jax.Array, inputs: int, hidden: int) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (inputs, hidden)) / math.sqrt(inputs),
        "b1": 0.1 * jax.random.normal(k2, (hidden,)),
        "w2": jax.random.normal(k3, (hidden, 1)) / math.sqrt(hidden),
        "b2": jnp.zeros((1,)),
    }


def _mlp(params: dict, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def mlp_problem(hidden: int = 16, examples: int = 256, seed: int = 0) -> Problem:
    """Full-batch MSE of a ``2 -> hidden tanh -> 1`` network fitting a random teacher of the
    same shape (so a zero-loss minimiser exists); parameters as one flat vector."""
    key_x, key_teacher, key_student = jax.random.split(jax.random.PRNGKey(seed), 3)
    inputs = jax.random.normal(key_x, (examples, 2))
    targets = _mlp(_init_mlp(key_teacher, 2, hidden), inputs)
    x0, unravel = ravel_pytree(_init_mlp(key_student, 2, hidden))

    def fn(x):
        return jnp.mean((_mlp(unravel(x), inputs) - targets) ** 2)

    return Problem(f"mlp-tanh-{x0.size}", fn, x0)


def make_problems() -> dict[str, Problem]:
    """The suite, keyed by name."""
    alternating = jnp.tile(jnp.array([-1.2, 1.0]), 50)
    problems = [
        Problem("rosenbrock-2", rosenbrock, jnp.array([-1.2, 1.0])),
        Problem("rosenbrock-100", rosenbrock, alternating),
        Problem("chained-rosenbrock-100", chained_rosenbrock, alternating),
        Problem("ext-powell-100", extended_powell, jnp.tile(jnp.array([3.0, -1.0, 0.0, 1.0]), 25)),
        Problem("trigonometric-100", trigonometric, jnp.full(100, 1.0 / 100)),
        Problem(
            "ill-quadratic-1000",
            diagonal_quadratic(jnp.logspace(0.0, 4.0, 1000)),
            jnp.ones(1000),
        ),
        mlp_problem(),
    ]
    return {p.name: p._replace(x0=strongly_typed(p.x0)) for p in problems}


def perturbed(problem: Problem, start: int) -> Problem:
    """Start ``0`` is the standard point; start ``k > 0`` scales it by ``1 + 1e-10 u`` with
    ``u`` uniform in [-1, 1] (seed ``k``). CG iteration counts are chaotic in the start (a
    1e-10 change can move them by 2x on some problems), so single runs rank solvers noisily;
    ``--starts K`` reports the median over ``K`` starts."""
    if start == 0:
        return problem
    u = np.random.default_rng(start).uniform(-1.0, 1.0, problem.x0.shape)
    return problem._replace(x0=strongly_typed(problem.x0 * (1.0 + 1e-10 * jnp.asarray(u))))


def median_result(results: Sequence[Result]) -> Result:
    """The run with the median evaluation count (the lower median for an even count); it
    counts as converged only if every run converged."""
    ordered = sorted(results, key=lambda r: (not r.converged, r.evals))
    middle = ordered[(len(ordered) - 1) // 2]
    return middle._replace(converged=all(r.converged for r in results))


# --------------------------------------------------------------------------- counting


class EvalCounter:
    """Host-side count of objective evaluations, also from inside compiled code."""

    def __init__(self) -> None:
        self.count = 0

    def _bump(self) -> None:
        self.count += 1

    def wrap(self, fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
        """``fn`` that increments the counter each time the compiled code evaluates it."""

        def counted(x):
            jax.debug.callback(self._bump)
            return fn(x)

        return counted

    def read(self) -> int:
        jax.effects_barrier()
        return self.count


# --------------------------------------------------------------------------- solvers


@dataclasses.dataclass(frozen=True)
class Caps:
    evaluations: int
    iterations: int


class Result(NamedTuple):
    """Outcome of one solver on one problem.

    ``evals`` is the host count when one was kept, else the solver's own count;
    ``own_evals`` is the solver's own count (``None`` where it has none).
    """

    evals: int
    iterations: int
    grad_norm: float
    converged: bool
    seconds: float
    own_evals: int | None = None
    notes: str = ""


def _iterate(step, carry, caps: Caps):
    """Calls the jitted ``step(carry) -> (carry, grad_norm, own_evals)`` until the gradient
    norm is at most ``GTOL`` or a cap is hit. Returns ``(carry, iterations, grad_norm,
    own_evals)``."""
    iterations, grad_norm, own_evals = 0, math.inf, 0
    while iterations < caps.iterations and own_evals < caps.evaluations:
        carry, grad_norm, own_evals = step(carry)
        iterations += 1
        grad_norm, own_evals = float(grad_norm), int(own_evals)
        if grad_norm <= GTOL or not math.isfinite(grad_norm):
            break
    if step._cache_size() != 1:
        warnings.warn(f"step compiled {step._cache_size()} times", stacklevel=2)
    return carry, iterations, grad_norm, own_evals


@dataclasses.dataclass(frozen=True)
class CGVariant:
    """A twophase ``nonlinear_cg`` configuration (``c2`` is the Wolfe curvature constant)."""

    beta: str = DEFAULT_BETA
    c2: float | None = None  # None: the default line search
    initial_step: str = "slope"  # keep in step with twophase.nonlinear_cg's default
    restart_threshold: float | str | None = "auto"

    def build(self) -> optax.GradientTransformationExtraArgs:
        linesearch = "wolfe" if self.c2 is None else twophase.wolfe_linesearch(c2=self.c2)
        return twophase.nonlinear_cg(
            self.beta,
            linesearch,
            restart_threshold=self.restart_threshold,
            initial_step=self.initial_step,
        )

    def label(self) -> str:
        c2 = "default" if self.c2 is None else f"{self.c2:g}"
        return f"{self.beta}, c2={c2}, {self.initial_step}, restart={self.restart_threshold}"


def run_twophase(problem: Problem, variant: CGVariant, caps: Caps, count_host=True) -> Result:
    counter = EvalCounter()
    fn = counter.wrap(problem.fn) if count_host else problem.fn
    opt = variant.build()

    @jax.jit
    def step(carry):
        x, state = carry
        updates, state = opt.update(x, state, x, value_fn=fn)
        info = twophase.info(state)
        return (optax.apply_updates(x, updates), state), info.grad_norm, info.value_and_grad_evals

    start = time.perf_counter()
    carry = (problem.x0, opt.init(problem.x0))
    (_, state), iterations, grad_norm, own = _iterate(step, carry, caps)
    info = twophase.info(state)
    notes = [
        f"{name}={int(value)}"
        for name, value in (
            ("ls_failures", info.linesearch_failures),
            ("nonfinite", info.nonfinite_events),
        )
        if int(value)
    ]
    return Result(
        evals=counter.read() if count_host else own,
        iterations=iterations,
        grad_norm=grad_norm,
        converged=grad_norm <= GTOL,
        seconds=time.perf_counter() - start,
        own_evals=own,
        notes=", ".join(notes),
    )


def run_scipy_cg(problem: Problem, caps: Caps) -> Result:
    value_and_grad = jax.jit(jax.value_and_grad(problem.fn))
    counter = EvalCounter()

    def fun(x):
        counter._bump()
        value, grad = value_and_grad(jnp.asarray(x))
        return float(value), np.asarray(grad)

    fun(np.asarray(problem.x0))  # compile outside the timing
    counter.count = 0
    start = time.perf_counter()
    res = scipy.optimize.minimize(
        fun,
        np.asarray(problem.x0),
        jac=True,
        method="CG",
        options=dict(gtol=GTOL, norm=2, maxiter=caps.iterations),
    )
    seconds = time.perf_counter() - start
    grad_norm = float(np.linalg.norm(value_and_grad(jnp.asarray(res.x))[1]))
    return Result(
        evals=counter.count,
        iterations=int(res.nit),
        grad_norm=grad_norm,
        converged=grad_norm <= GTOL,
        seconds=seconds,
        own_evals=int(res.nfev),
        notes="" if res.success else f"status {res.status}",
    )


def run_optax_lbfgs(problem: Problem, caps: Caps) -> Result:
    counter = EvalCounter()
    fn = counter.wrap(problem.fn)
    opt = optax.lbfgs(memory_size=10)
    value_and_grad = optax.value_and_grad_from_state(fn)

    @jax.jit
    def step(carry):
        x, state, evals = carry
        # Evaluates only while the state's value is inf (the first iteration).
        evals += jnp.isinf(optax.tree.get(state, "value")).astype(evals.dtype)
        value, grad = value_and_grad(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fn)
        evals += optax.tree.get(state, "info").num_linesearch_steps.astype(evals.dtype)
        grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        return (optax.apply_updates(x, updates), state, evals), grad_norm, evals

    start = time.perf_counter()
    # optax's init state holds weak-typed scalars.
    carry = strongly_typed((problem.x0, opt.init(problem.x0), jnp.zeros([], jnp.int32)))
    _, iterations, grad_norm, own = _iterate(step, carry, caps)
    return Result(
        evals=counter.read(),
        iterations=iterations,
        grad_norm=grad_norm,
        converged=grad_norm <= GTOL,
        seconds=time.perf_counter() - start,
        own_evals=own,
    )


def run_jaxopt_cg(problem: Problem, caps: Caps) -> Result:
    counter = EvalCounter()
    solver = jaxopt.NonlinearCG(fun=counter.wrap(problem.fn), maxiter=caps.iterations, tol=GTOL)

    @jax.jit
    def step(carry):
        x, state = carry
        x, state = solver.update(x, state)
        # state.error is the norm of the *previous* gradient; use the current one.
        return (x, state), optax.tree.norm(state.grad), state.num_fun_eval

    start = time.perf_counter()
    state = jax.jit(solver.init_state)(problem.x0)
    _, iterations, grad_norm, own = _iterate(step, strongly_typed((problem.x0, state)), caps)
    return Result(
        evals=counter.read(),
        iterations=iterations,
        grad_norm=grad_norm,
        converged=grad_norm <= GTOL,
        seconds=time.perf_counter() - start,
        own_evals=own,
    )


def solvers() -> dict[str, Callable[[Problem, Caps], Result]]:
    """Columns of the default table."""
    columns = {
        f"twophase {beta}": (lambda p, c, b=beta: run_twophase(p, CGVariant(beta=b), c))
        for beta in BETAS
    }
    columns["scipy CG"] = run_scipy_cg
    columns["optax L-BFGS(10)"] = run_optax_lbfgs
    columns["jaxopt NonlinearCG"] = run_jaxopt_cg
    return columns


# --------------------------------------------------------------------------- tables


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def format_cell(result: Result) -> str:
    if result.converged:
        return f"{result.evals} ({result.iterations})"
    return f"no conv, {result.evals} ({result.iterations}), ‖g‖={result.grad_norm:.1e}"


def ratio(numerator: Result, denominator: Result) -> float:
    """Evaluation ratio; ``inf`` when the numerator did not converge."""
    return numerator.evals / denominator.evals if numerator.converged else math.inf


def default_table(results: dict[str, dict[str, Result]], columns: Sequence[str]) -> str:
    """Rows = problems, columns = solvers, plus the geometric-mean row and the ratio column."""
    reference, default = "scipy CG", f"twophase {DEFAULT_BETA}"
    header = ["problem", *columns, f"{DEFAULT_BETA} / scipy"]
    rows = []
    for problem, row in results.items():
        r = ratio(row[default], row[reference])
        rows.append([problem, *(format_cell(row[c]) for c in columns), f"{r:.2f}"])
    means = []
    for column in columns:
        cells = [row[column] for row in results.values()]
        failed = sum(not c.converged for c in cells)
        mean = geometric_mean([c.evals for c in cells])
        means.append(f"{mean:.0f}" if not failed else f"({mean:.0f}, {failed} no conv)")
    ratios = [ratio(row[default], row[reference]) for row in results.values()]
    means.append(f"{geometric_mean(ratios):.2f}")
    rows.append(["geometric mean (evals)", *means])
    return markdown_table(header, rows)


def consistency_notes(results: dict[str, dict[str, Result]]) -> list[str]:
    """Solver-internal counts that disagree with the host count, and solver notes."""
    notes = []
    for problem, row in results.items():
        for column, result in row.items():
            if result.own_evals is not None and result.own_evals != result.evals:
                notes.append(
                    f"{problem} / {column}: host count {result.evals} != own count "
                    f"{result.own_evals}"
                )
            if result.notes:
                notes.append(f"{problem} / {column}: {result.notes}")
    return notes


# --------------------------------------------------------------------------- sweep


def sweep_variants() -> list[CGVariant]:
    grid = itertools.product(
        BETAS, (0.05, 0.1, 0.2, 0.4), ("slope", "quadratic", "max"), (0.2, None)
    )
    return [CGVariant(b, c2, s, r) for b, c2, s, r in grid]


def focused_variants() -> list[CGVariant]:
    """The neighbourhood of the best variants of the full sweep, for a run with ``--starts``."""
    grid = itertools.product(
        ("polak_ribiere", "hestenes_stiefel", "hager_zhang"),
        (0.1, 0.2, 0.3),
        ("slope",),
        (0.2, None),
    )
    return [CGVariant(b, c2, s, r) for b, c2, s, r in grid]


def _sweep_one(
    variant: CGVariant, names: Sequence[str], caps: Caps, starts: int = 1
) -> list[Result]:
    problems = make_problems()
    return [
        median_result(
            [
                run_twophase(perturbed(problems[n], k), variant, caps, count_host=False)
                for k in range(starts)
            ]
        )
        for n in names
    ]


def run_sweep(
    variants: Sequence[CGVariant],
    names: Sequence[str],
    caps: Caps,
    scipy_results: dict[str, Result],
    jobs: int,
    starts: int = 1,
) -> str:
    """Runs every variant on every problem (in ``jobs`` processes) and ranks them."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        outcomes = list(
            pool.map(
                _sweep_one,
                variants,
                itertools.repeat(names),
                itertools.repeat(caps),
                itertools.repeat(starts),
            )
        )
    scored = []
    for variant, results in zip(variants, outcomes, strict=True):
        ratios = [ratio(r, scipy_results[n]) for n, r in zip(names, results, strict=True)]
        scored.append((geometric_mean(ratios), max(ratios), variant, results))
    scored.sort(key=lambda s: (s[0], s[1]))
    header = ["rank", "variant", *names, "geo-mean ratio", "worst ratio"]
    rows = [
        [str(i + 1), v.label(), *(format_cell(r) for r in res), f"{g:.3f}", f"{w:.2f}"]
        for i, (g, w, v, res) in enumerate(scored)
    ]
    return markdown_table(header, rows)


# --------------------------------------------------------------------------- Newton-CG


class NewtonResult(NamedTuple):
    """A second-order solver's outcome: ``evals`` value+gradient evaluations and ``hvps``
    Hessian-vector products to ``||g||_2 <= GTOL``; ``seconds`` excludes compilation."""

    evals: int
    hvps: int
    iterations: int
    grad_norm: float
    converged: bool
    seconds: float
    notes: str = ""

    def cost(self) -> int:
        """Evaluations plus HVPs, each counted as one."""
        return self.evals + self.hvps


def _time_jitted(step, carry, caps: Caps, counter: EvalCounter | None):
    """Compiles and warms ``step`` on ``carry`` (not counted), then times ``_iterate`` from
    ``carry`` with the counter reset."""
    jax.block_until_ready(step(carry))
    if counter is not None:
        counter.read()
        counter.count = 0
    start = time.perf_counter()
    out = _iterate(step, carry, caps)
    jax.block_until_ready(out[0])
    return out, time.perf_counter() - start


def run_newton_cg(problem: Problem, caps: Caps) -> NewtonResult:
    """twophase ``newton_cg()`` (defaults). The host counter fires once per evaluation and
    once per HVP (``jax.jvp`` of ``jax.grad`` runs the objective's forward pass once), so it
    must equal ``value_and_grad_evals + hessian_vector_products``."""
    counter = EvalCounter()
    fn = counter.wrap(problem.fn)
    opt = twophase.newton_cg()

    @jax.jit
    def step(carry):
        x, state = carry
        updates, state = opt.update(x, state, x, value_fn=fn)
        grad_norm = jnp.where(jnp.isfinite(state.value), optax.tree.norm(state.grad), jnp.inf)
        own = state.value_and_grad_evals + state.hessian_vector_products
        return (optax.apply_updates(x, updates), state), grad_norm, own

    carry = (problem.x0, opt.init(problem.x0))
    ((_, state), iterations, grad_norm, _), seconds = _time_jitted(step, carry, caps, counter)
    host = counter.read()
    evals, hvps = int(state.value_and_grad_evals), int(state.hessian_vector_products)
    notes = [
        f"{name}={int(getattr(state, name))}"
        for name in ("negative_curvature", "linesearch_failures", "nonfinite_events")
        if int(getattr(state, name))
    ]
    if host != evals + hvps:
        notes.append(f"host count {host} != evals + HVPs {evals + hvps}")
    return NewtonResult(
        evals, hvps, iterations, grad_norm, grad_norm <= GTOL, seconds, ", ".join(notes)
    )


def run_scipy_newton_cg(problem: Problem, caps: Caps) -> NewtonResult:
    """scipy's Newton-CG with ``jac=True`` (one call of ``fun`` = one value+gradient
    evaluation; scipy memoizes the gradient, so its nfev and njev count the same calls) and
    ``hessp`` (one call = one HVP = nhev). It has no gradient tolerance: the callback stops
    it at the first iterate with ``||g||_2 <= GTOL``, read from the evaluation scipy made
    there (recomputed, uncounted, if it made none)."""
    value_and_grad = jax.jit(jax.value_and_grad(problem.fn))
    hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(problem.fn), (x,), (v,))[1])
    count = {"evals": 0, "hvps": 0, "iterations": 0, "grad_norm": math.inf}
    last = {}

    def fun(x):
        count["evals"] += 1
        value, grad = value_and_grad(jnp.asarray(x))
        last["x"], last["g"] = np.array(x), np.asarray(grad)
        return float(value), last["g"]

    def hessp(x, v):
        count["hvps"] += 1
        return np.asarray(hvp(jnp.asarray(x), jnp.asarray(v)))

    def callback(intermediate_result):
        x = intermediate_result.x
        count["iterations"] += 1
        if "x" in last and np.array_equal(last["x"], x):
            grad = last["g"]
        else:
            grad = np.asarray(value_and_grad(jnp.asarray(x))[1])
        count["grad_norm"] = float(np.linalg.norm(grad))
        if count["grad_norm"] <= GTOL or count["evals"] + count["hvps"] >= caps.evaluations:
            raise StopIteration

    x0 = np.asarray(problem.x0)
    fun(x0), hessp(x0, x0)  # compile outside the timing
    count.update(evals=0, hvps=0)
    start = time.perf_counter()
    scipy.optimize.minimize(
        fun,
        x0,
        jac=True,
        hessp=hessp,
        method="Newton-CG",
        callback=callback,
        options=dict(xtol=1e-300, maxiter=caps.iterations),
    )
    seconds = time.perf_counter() - start
    return NewtonResult(
        count["evals"],
        count["hvps"],
        count["iterations"],
        count["grad_norm"],
        count["grad_norm"] <= GTOL,
        seconds,
    )


def run_lbfgs_timed(problem: Problem, caps: Caps) -> NewtonResult:
    """``optax.lbfgs(memory_size=10)`` as :func:`run_optax_lbfgs`, timed without compilation."""
    counter = EvalCounter()
    fn = counter.wrap(problem.fn)
    opt = optax.lbfgs(memory_size=10)
    value_and_grad = optax.value_and_grad_from_state(fn)

    @jax.jit
    def step(carry):
        x, state = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fn)
        grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        return (optax.apply_updates(x, updates), state), grad_norm, jnp.zeros([], jnp.int32)

    carry = strongly_typed((problem.x0, opt.init(problem.x0)))
    (_, iterations, grad_norm, _), seconds = _time_jitted(step, carry, caps, counter)
    return NewtonResult(counter.read(), 0, iterations, grad_norm, grad_norm <= GTOL, seconds)


def newton_cell(result: NewtonResult) -> str:
    text = f"{result.evals} + {result.hvps} ({result.iterations})"
    if not result.converged:
        text = f"no conv, {text}, ‖g‖={result.grad_norm:.1e}"
    return text


def newton_table(results: dict[str, dict[str, NewtonResult]]) -> str:
    """Rows = problems; per solver ``evals + HVPs (iterations)`` and seconds; the cost ratios
    (evaluations + HVPs, and with HVPs weighted by ``HVP_COST``) of twophase to scipy."""
    from twophase.second_phase.newton_cg import HVP_COST

    names = list(next(iter(results.values())))
    header = ["problem"]
    for name in names:
        header += [f"{name}: evals + HVPs (iters)", f"{name}: s"]
    header += ["cost ratio to scipy", f"weighted ratio (HVP = {HVP_COST:g})"]
    rows, ratios, weighted = [], [], []
    for problem, row in results.items():
        ours, ref = row["twophase newton_cg"], row["scipy Newton-CG"]
        r = ours.cost() / ref.cost() if ours.converged and ref.converged else math.inf
        w = (ours.evals + HVP_COST * ours.hvps) / (ref.evals + HVP_COST * ref.hvps)
        w = w if ours.converged and ref.converged else math.inf
        ratios.append(r)
        weighted.append(w)
        cells = [problem]
        for name in names:
            cells += [newton_cell(row[name]), f"{row[name].seconds:.3f}"]
        rows.append([*cells, f"{r:.2f}", f"{w:.2f}"])
    finite = [r for r in ratios if math.isfinite(r)]
    finite_w = [w for w in weighted if math.isfinite(w)]
    means = [f"{geometric_mean(finite):.2f}", f"{geometric_mean(finite_w):.2f}"]
    rows.append(["geometric mean", *([""] * (2 * len(names))), *means])
    return markdown_table(header, rows)


def logistic_problem(examples: int = 10000, features: int = 20, seed: int = 0) -> Problem:
    """Mean logistic loss of a linear classifier with a small L2 term."""
    key_x, key_w = jax.random.split(jax.random.PRNGKey(seed))
    inputs = jax.random.normal(key_x, (examples, features))
    labels = jnp.sign(inputs @ jax.random.normal(key_w, (features,)) + 0.1)

    def fn(w):
        return jnp.mean(jnp.logaddexp(0.0, -labels * (inputs @ w))) + 1e-3 * jnp.sum(w**2)

    return Problem(f"logistic-{examples}x{features}", fn, jnp.zeros(features))


def hvp_cost_table(repeats: int = 15, calls: int = 200) -> tuple[str, list[float], list[float]]:
    """Wall time of one HVP over one value+gradient evaluation.

    Each is run ``calls`` times inside one jitted ``lax.fori_loop`` (no dispatch overhead),
    compiled first; the fastest of ``repeats`` interleaved runs (the least disturbed on a
    shared machine). Two HVP timings:

    * *new point*: every call at a different point (the carry moves ``x`` and ``v``), so
      nothing can be shared between calls: the cost of an HVP on its own;
    * *fixed point*: every call at the same ``x`` with a new ``v``, the pattern of the inner
      CG solve (a ``lax.while_loop`` over ``v`` at fixed parameters), where XLA's loop
      invariant code motion may hoist the parts of the forward and reverse passes that do
      not depend on ``v`` out of the loop.

    Returns the table and the two lists of ratios.
    """
    problems = [
        mlp_problem(),
        mlp_problem(hidden=64, examples=4096, seed=1),
        Problem("chained-rosenbrock-1000", chained_rosenbrock, jnp.full(1000, 0.5)),
        logistic_problem(),
    ]
    rows, moving, fixed = [], [], []
    for problem in problems:
        grad_fn = jax.grad(problem.fn)
        value_and_grad = jax.value_and_grad(problem.fn)
        x0 = problem.x0

        @jax.jit
        def evaluations(x, value_and_grad=value_and_grad):
            def body(_, carry):
                x, total = carry
                value, grad = value_and_grad(x)
                return x + 1e-30 * grad, total + value

            return lax.fori_loop(0, calls, body, (x, jnp.zeros([], x.dtype)))

        @jax.jit
        def products_moving(x, grad_fn=grad_fn):
            def body(_, carry):
                x, v = carry
                hv = jax.jvp(grad_fn, (x,), (v,))[1]
                return x + 1e-30 * hv, v + 1e-30 * hv

            return lax.fori_loop(0, calls, body, (x, jnp.ones_like(x)))

        @jax.jit
        def products_fixed(x, grad_fn=grad_fn):
            def body(_, v):
                return v + 1e-30 * jax.jvp(grad_fn, (x,), (v,))[1]

            return lax.fori_loop(0, calls, body, jnp.ones_like(x))

        fns = {"vg": evaluations, "moving": products_moving, "fixed": products_fixed}
        jax.block_until_ready([fn(x0) for fn in fns.values()])
        times = {key: [] for key in fns}
        for _ in range(repeats):  # interleaved
            for key, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(x0))
                times[key].append((time.perf_counter() - start) / calls)
        vg, mv, fx = (min(times[k]) for k in ("vg", "moving", "fixed"))
        moving.append(mv / vg)
        fixed.append(fx / vg)
        rows.append(
            [
                problem.name,
                f"{1e6 * vg:.1f}",
                f"{1e6 * mv:.1f}",
                f"{1e6 * fx:.1f}",
                f"{mv / vg:.2f}",
                f"{fx / vg:.2f}",
            ]
        )
    header = [
        "problem",
        "value+grad (µs)",
        "HVP, new point (µs)",
        "HVP, fixed point (µs)",
        "ratio, new point",
        "ratio, fixed point",
    ]
    return markdown_table(header, rows), moving, fixed


def newton_main(args: argparse.Namespace, caps: Caps) -> None:
    problems = make_problems()
    columns = {
        "twophase newton_cg": run_newton_cg,
        "scipy Newton-CG": run_scipy_newton_cg,
        "optax L-BFGS(10)": run_lbfgs_timed,
    }
    results = {
        name: {c: run(problems[name], caps) for c, run in columns.items()} for name in args.problems
    }
    print(
        "Newton-CG: evaluations + HVPs (outer iterations) to ||g||_2 <= "
        f"{GTOL:g}; seconds exclude compilation. L-BFGS makes no HVPs.\n"
    )
    print(newton_table(results))
    notes = [
        f"{p} / {c}: {r.notes}" for p, row in results.items() for c, r in row.items() if r.notes
    ]
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    if not args.skip_hvp_cost:
        table, moving, fixed = hvp_cost_table()
        print("\nHVP cost (forward-over-reverse) against one value+gradient evaluation:\n")
        print(table)
        print(
            f"\nmedian ratio: new point {float(np.median(moving)):.2f}, "
            f"fixed point {float(np.median(fixed)):.2f}"
        )


# --------------------------------------------------------------------------- main


def source_state() -> str:
    """Where ``twophase`` was imported from, with a hash of its sources (the code measured)."""
    root = pathlib.Path(twophase.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return f"{root} (sources sha256 {digest.hexdigest()[:12]})"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    names = list(make_problems())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="caps of 5000 (default 20000)")
    parser.add_argument("--problems", nargs="+", choices=names, default=names)
    parser.add_argument(
        "--sweep",
        choices=("full", "focused"),
        default=None,
        help="also sweep twophase variants: the full grid or the neighbourhood of the best",
    )
    parser.add_argument(
        "--starts", type=int, default=1, help="median over this many perturbed starts"
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes for the sweep")
    parser.add_argument("--max-evals", type=int, default=None)
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument(
        "--newton-cg",
        action="store_true",
        help="instead: twophase newton_cg against scipy Newton-CG and optax L-BFGS, and the "
        "HVP cost measurement",
    )
    parser.add_argument(
        "--skip-hvp-cost", action="store_true", help="with --newton-cg: no HVP timing"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    cap = 5000 if args.quick else 20000
    caps = Caps(args.max_evals or cap, args.max_iters or cap)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    print("```\npython benchmarks/cg_suite.py " + shlex.join(argv) + "\n```")
    print(
        f"\ntwophase from {source_state()},\njax {jax.__version__}, optax {optax.__version__}, "
        f"scipy {scipy.__version__}, "
        f"float64, stop at ||g||_2 <= {GTOL:g}, caps {caps.evaluations} evaluations / "
        f"{caps.iterations} iterations. Cells: evaluations (iterations).\n"
    )
    if args.newton_cg:
        newton_main(args, caps)
        return
    problems = make_problems()
    columns = solvers()
    results: dict[str, dict[str, Result]] = {}
    for name in args.problems:
        results[name] = {
            c: median_result([run(perturbed(problems[name], k), caps) for k in range(args.starts)])
            for c, run in columns.items()
        }
    print(default_table(results, list(columns)))
    notes = consistency_notes(results)
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    if args.sweep:
        scipy_results = {n: results[n]["scipy CG"] for n in args.problems}
        start = time.perf_counter()
        variants = sweep_variants() if args.sweep == "full" else focused_variants()
        table = run_sweep(variants, args.problems, caps, scipy_results, args.jobs, args.starts)
        print(f"\nSweep of twophase variants ({time.perf_counter() - start:.0f} s), ranked by the")
        print("geometric mean of evaluation ratios to scipy CG (no conv counts as inf):\n")
        print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
