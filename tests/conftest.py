"""Shared test configuration: float64 available, deterministic hypothesis profile."""

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

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
