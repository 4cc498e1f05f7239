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
