"""Shared test configuration: float64 available, deterministic hypothesis profile, one
compilation cache for the run's processes."""

import os
import shutil
import tempfile

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

_CACHE_VARIABLES = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
_own_cache: list[str] = []


def pytest_configure(config):
    """A JAX compilation cache shared by this run's processes (the xdist workers and
    the processes the tests start inherit it through the environment), unless the
    user set one. Many tests compile the same programs again after each module's
    programs are dropped (below): on two test files the cache took 154 s to 123 s.
    Removed at the end of the run."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return  # a worker (it inherited the controller's), or the user's own cache
    path = tempfile.mkdtemp(prefix="twophase-jax-cache-")
    _own_cache.append(path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    for name, value in _CACHE_VARIABLES.items():
        os.environ.setdefault(name, value)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes",
        int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
    )


def pytest_unconfigure(config):
    for path in _own_cache:
        shutil.rmtree(path, ignore_errors=True)


settings.register_profile(
    "twophase",
    deadline=None,
    max_examples=25,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("twophase")


# Parametrized tests whose first K variants (in collection order) run in the fast suite and
# the rest in the slow one (`-m slow`): each variant compiles its own programs, and the
# first ones already exercise the code path. Keeps `-m "not slow"` near 10 minutes on 2 cores.
_FAST_VARIANTS = {
    "tests/test_donation.py::test_donated_step_from_a_fresh_init": 4,
    "tests/experiments/test_pinn.py::test_loss_terms_are_nonnegative_and_sum_to_the_total": 3,
    "tests/experiments/test_pinn.py::test_loss_is_not_trivially_zero_at_init_and_zero_at_the_solution": 2,  # noqa: E501
    "tests/experiments/test_models.py::test_builds_and_outputs_finite_logits": 4,
    "tests/second_phase/test_faults.py::test_float32_scaled_least_squares_converges_to_the_closed_form": 2,  # noqa: E501
    "tests/second_phase/test_levenberg_marquardt.py::test_linearize_matches_jacfwd": 3,
    "tests/second_phase/test_levenberg_marquardt.py::test_matches_scipy_lm": 2,
    "tests/second_phase/test_newton_cg.py::test_agrees_with_scipy_newton_cg": 2,
    "tests/test_eager_and_chains.py::test_eager_update_compiles_once": 3,
    "tests/second_phase/test_cg.py::test_agrees_with_scipy_cg": 2,
    "tests/test_objectives.py::test_full_batch_matches_direct_mean_and_gradient": 8,
}


def pytest_collection_modifyitems(config, items):
    """Marks slow the variants beyond the first ``_FAST_VARIANTS[test]`` of a test."""
    seen: dict[str, int] = {}
    for item in items:
        base = item.nodeid.split("[", 1)[0]
        keep = _FAST_VARIANTS.get(base)
        if keep is None or "[" not in item.nodeid:
            continue
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > keep:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def count_traces():
    """Returns a decorator counting how often a function is traced."""
    counter = {"n": 0}

    def wrap(fn):
        def traced(*args, **kwargs):
            counter["n"] += 1
            return fn(*args, **kwargs)

        return traced

    wrap.counter = counter
    return wrap


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. A long-lived xdist
    worker otherwise accumulates thousands of executables, each holding memory
    mappings of its JIT-compiled code, until the kernel's per-process mapping
    limit (vm.max_map_count, 65530 by default) makes LLVM abort mid-compile."""
    yield
    jax.clear_caches()
