"""Tests for twophase._checks: one rule for every argument check.

``check_*`` pass a traced value (checked when the transformation was built) and
check a concrete one; ``as_*`` return the Python number and reject a tracer.
"""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twophase import _checks as C


def _under_jit(fn, value):
    """Calls ``fn(traced value)`` inside jit; returns what it returned (or raises)."""
    out = []

    @jax.jit
    def run(x):
        out.append(fn(x))
        return x

    run(jnp.asarray(value))
    return out[0]


def test_concrete_unwraps_numpy_and_0d_arrays_and_hides_tracers():
    assert C.concrete(np.float32(0.5)) == 0.5 and type(C.concrete(np.float32(0.5))) is float
    assert C.concrete(np.int64(3)) == 3 and type(C.concrete(np.int64(3))) is int
    assert C.concrete(jnp.asarray(2)) == 2
    assert C.concrete("text") == "text"
    assert _under_jit(C.concrete, 1.0) is None


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (lambda v: C.check_int("n", v, 1), [1, np.int64(7), jnp.asarray(3)], [0, 1.5, True, "1"]),
        (
            lambda v: C.check_positive("x", v),
            [1e-9, 2, np.float32(3.0)],
            [0, -1.0, math.inf, math.nan, True, None],
        ),
        (lambda v: C.check_fraction("f", v), [0.5, np.float64(0.99)], [0, 1, 1.5, math.nan]),
        (
            lambda v: C.check_fraction("f", v, closed=True),
            [1, 0.1],
            [0, 1.0001, False],
        ),
        (lambda v: C.check_budget(v), [None, 10, 0.5], [0, -3, math.inf, True, "10"]),
        (lambda v: C.check_max_evaluations(v), [1, np.int32(30)], [0, 2.5, True]),
    ],
)
def test_check_functions_accept_good_reject_bad_and_let_tracers_pass(check, good, bad):
    for value in good:
        assert check(value) is None
    for value in bad:
        with pytest.raises(ValueError, match="`"):
            check(value)
    # The same rule everywhere: a traced value was checked when it was built.
    assert _under_jit(check, 0.5 if good and isinstance(good[0], float) else 1) is None


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`window` must be an int >= 1, got 0\."):
        C.check_int("window", 0, 1)
    with pytest.raises(ValueError, match=r"`ratio` must be in \(0, 1\], got 2"):
        C.check_fraction("ratio", 2.0, closed=True)
    with pytest.raises(ValueError, match=r"`estimator` must be one of \['a', 'b'\]"):
        C.check_one_of("estimator", "c", ("a", "b"))
    C.check_one_of("estimator", "a", ("a", "b"))


def test_as_functions_return_python_numbers_and_reject_tracers():
    assert C.as_positive_finite("d", np.float32(0.25)) == 0.25
    assert type(C.as_positive_finite("d", np.float32(0.25))) is float
    assert C.as_open_unit("e", 0.5) == 0.5
    assert C.as_positive_int("n", np.int64(4)) == 4
    assert C.as_positive_int("n", None, allow_none=True) is None
    assert C.as_non_negative_int("step", 0) == 0
    assert C.as_positive_or_none("tol", None) is None
    assert C.as_positive_or_none("tol", 3) == 3.0
    assert C.as_positive_or_none("tol", fractions.Fraction(1, 4)) == 0.25
    for fn, bad in [
        (lambda v: C.as_positive_finite("d", v), [0, -1, math.inf, True]),
        (lambda v: C.as_open_unit("e", v), [0, 1, 2.0]),
        (lambda v: C.as_positive_int("n", v), [0, 1.0, True, None]),
        (lambda v: C.as_non_negative_int("step", v), [-1, 1.5, False]),
        (lambda v: C.as_positive_or_none("tol", v), [0, -2.0, math.nan, math.inf, True]),
    ]:
        for value in bad:
            with pytest.raises(ValueError, match="`"):
                fn(value)
        with pytest.raises(ValueError, match="`"):
            _under_jit(fn, 1)


def test_num_examples_names_the_argument():
    assert C.num_examples("data", (np.zeros((5, 2)), np.zeros(5))) == 5
    with pytest.raises(ValueError, match="`val_data` must contain at least one array leaf"):
        C.num_examples("val_data", {})
    with pytest.raises(ValueError, match="`data` leaves need a leading example axis"):
        C.num_examples("data", (np.zeros(()),))
    with pytest.raises(ValueError, match="`data` leaves must share the leading"):
        C.num_examples("data", (np.zeros((2, 1)), np.zeros((3,))))
    with pytest.raises(ValueError, match="`data` is empty"):
        C.num_examples("data", np.zeros((0, 4)))


def test_update_arguments_and_scalar_outputs():
    with pytest.raises(TypeError, match="needs the mini-batch loss"):
        C.require_value(None, "loss_plateau")
    C.require_value(jnp.zeros([]), "loss_plateau")
    with pytest.raises(TypeError, match=r"nonlinear_cg\.update requires the keyword argument"):
        C.require_update_args("nonlinear_cg", {"w": jnp.zeros(2)}, {"w": jnp.zeros(2)}, None)
    with pytest.raises(TypeError, match=r"nonlinear_cg\.update requires `params`"):
        C.require_update_args("nonlinear_cg", {"w": jnp.zeros(2)}, None, lambda p: 0.0)
    C.require_update_args("nonlinear_cg", None, None, lambda p: 0.0)  # an empty tree
    C.check_scalar_output("loss_fn", jax.ShapeDtypeStruct((), jnp.float32), "a scalar")
    C.check_scalar_output("loss_fn", jax.ShapeDtypeStruct((1,), jnp.bfloat16), "a scalar")
    with pytest.raises(TypeError, match=r"`loss_fn` must return a scalar, got \(3,\)"):
        C.check_scalar_output("loss_fn", jax.ShapeDtypeStruct((3,), jnp.float32), "a scalar")
    with pytest.raises(TypeError, match="real floating scalar, got dtype int32"):
        C.check_scalar_output("value_fn", jax.ShapeDtypeStruct((), jnp.int32), "a scalar")
    with pytest.raises(TypeError, match="got float"):
        C.check_scalar_output("value_fn", 1.0, "a scalar")


def test_is_number_in():
    assert C.is_number_in(0.0, 0.0, 1.0) and not C.is_number_in(1.0, 0.0, 1.0)
    assert C.is_number_in(1.0, 0.0, 1.0, include_high=True)
    assert not C.is_number_in(None, 0, 1) and not C.is_number_in(math.nan, 0, 1)
    assert not C.is_number_in(True, 0, 2)
    assert _under_jit(lambda v: C.is_number_in(v, 0, 1), 5.0)  # traced: checked when built
