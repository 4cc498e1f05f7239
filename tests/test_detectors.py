"""Tests for twophase.detectors on synthetic gradient-norm sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st

import twophase as tp


def synthetic_value_fn(p):
    """Full-batch objective of a synthetic path: ``params = [loss, G]`` with ``G`` the
    full-batch gradient; returns ``loss`` with gradient ``G`` (and 0 for the loss)."""
    return jax.lax.stop_gradient(p[0] - 0.5 * jnp.sum(p[1:] ** 2)) + 0.5 * jnp.sum(p[1:] ** 2)


def feed(detector, norms, losses=None, noise=0.0, seed=0, dim=16):
    """Feeds mini-batch gradients whose full-batch mean has norm ``norms[t]``
    (plus isotropic noise of total norm ``noise``), at synthetic parameters whose
    full-batch gradient has norm ``norms[t]`` and whose full-batch loss is
    ``losses[t]`` (see ``synthetic_value_fn``); returns fire flags and the final
    state."""
    rng = np.random.default_rng(seed)
    direction = np.ones(dim) / np.sqrt(dim)
    losses = np.zeros(len(norms)) if losses is None else losses
    state = detector.init(jnp.zeros(dim + 1))
    update = jax.jit(
        lambda s, g, v, t, p: detector.update(
            s,
            grad=g,
            grad_norm=jnp.linalg.norm(g),
            value=v,
            step=t,
            params=p,
            value_fn=synthetic_value_fn,
        )
    )
    fires = []
    for t, n in enumerate(norms):
        g = np.concatenate([[0.0], n * direction + noise * rng.standard_normal(dim) / np.sqrt(dim)])
        params = np.concatenate([[losses[t]], n * direction])
        state, fire = update(
            state,
            jnp.asarray(g, jnp.float32),
            jnp.asarray(losses[t], jnp.float32),
            jnp.asarray(t, jnp.int32),
            jnp.asarray(params, jnp.float32),
        )
        fires.append(bool(fire))
    return np.array(fires), state


def rise_then_fall(peak_at, total, window):
    t = np.arange(total * window) / window
    return np.where(t < peak_at, 0.2 + t / peak_at, 1.2 * np.exp(-(t - peak_at) / 3.0))


def test_estimators_on_independent_draws_at_one_point():
    # The RMS of mini-batch norms sits at the noise floor; the window estimate is
    # unbiased for independent draws; the exact norm is exact.
    norms = np.full(200, 0.05)
    _, exact = feed(tp.grad_norm_peak(window=200), norms, noise=1.0, seed=1)
    _, window = feed(tp.grad_norm_peak(window=200, estimator="window"), norms, noise=1.0, seed=1)
    _, rms = feed(tp.grad_norm_peak(window=200, estimator="minibatch"), norms, noise=1.0, seed=1)
    assert float(exact.grad_norm_stat) == pytest.approx(0.05, rel=1e-5)
    assert int(exact.value_and_grad_evals) == 1
    assert abs(float(window.grad_norm_stat) - 0.05) < 0.03
    assert float(rms.grad_norm_stat) > 0.9
    assert int(window.value_and_grad_evals) == int(rms.value_and_grad_evals) == 0


def test_window_estimate_collapses_along_an_sgd_path():
    # Why "exact" is the default: along SGD's own path on a quadratic with noisy
    # gradients, the window sum is the net displacement over the window, so the
    # estimate falls far below the true gradient norm once SGD hovers at its noise
    # level, while the exact norm does not.
    rng = np.random.default_rng(0)
    dim, lr, window = 16, 0.1, 50
    det_window = tp.grad_norm_peak(window=window, estimator="window")
    det_exact = tp.grad_norm_peak(window=window)
    value_fn = lambda p: 0.5 * jnp.sum(p**2)  # gradient = p
    s_w, s_e = det_window.init(jnp.zeros(dim)), det_exact.init(jnp.zeros(dim))

    @jax.jit  # 500 steps of two detectors: compiled once instead of op by op
    def both(s_w, s_e, g, t, theta):
        kwargs = dict(
            grad=g,
            grad_norm=jnp.linalg.norm(g),
            value=None,
            step=t,
            params=theta,
            value_fn=value_fn,
        )
        return det_window.update(s_w, **kwargs)[0], det_exact.update(s_e, **kwargs)[0]

    theta = np.ones(dim)
    for t in range(10 * window):
        g = theta + rng.standard_normal(dim)
        s_w, s_e = both(s_w, s_e, jnp.asarray(g), jnp.asarray(t), jnp.asarray(theta))
        theta = theta - lr * g
    true_norm = float(np.linalg.norm(theta))
    assert float(s_e.grad_norm_stat) == pytest.approx(true_norm, rel=0.5)
    assert float(s_w.grad_norm_stat) < 0.5 * float(s_e.grad_norm_stat)


def test_grad_norm_peak_fires_within_one_window_after_the_drop():
    window = 10
    norms = rise_then_fall(peak_at=8, total=30, window=window)
    fires, _ = feed(tp.grad_norm_peak(ratio=0.9, window=window), norms, noise=0.05)
    first = int(np.argmax(fires))
    assert fires.any()
    # The exact full-batch norm at window ends below 0.9 x its running peak: the
    # detector fires at the end of the first such window, and not before.
    at_ends = norms.reshape(-1, window)[:, -1]
    running_max = np.maximum.accumulate(at_ends)
    drop_window = int(np.argmax(at_ends <= 0.9 * running_max))
    assert first == (drop_window + 1) * window - 1


def test_grad_norm_peak_never_fires_on_a_rising_sequence():
    norms = np.linspace(0.1, 3.0, 400)
    fires, _ = feed(tp.grad_norm_peak(window=10), norms, noise=0.05)
    assert not fires.any()


def test_min_steps_is_honoured():
    window = 10
    norms = rise_then_fall(peak_at=3, total=30, window=window)
    fires, _ = feed(tp.grad_norm_peak(window=window, min_steps=200), norms)
    assert fires.any() and int(np.argmax(fires)) + 1 >= 200


def test_exact_grad_norm_peak_uses_value_fn_once_per_window():
    det = tp.grad_norm_peak(window=5)
    params = jnp.array([3.0, 4.0])
    value_fn = lambda p: 0.5 * jnp.sum(p**2)  # gradient = params, norm 5
    state = det.init(params)
    for t in range(12):
        state, _ = det.update(
            state,
            grad=jnp.zeros(2),
            grad_norm=jnp.zeros([]),
            value=None,
            step=jnp.asarray(t),
            params=params,
            value_fn=value_fn,
        )
    assert int(state.value_and_grad_evals) == 2
    assert float(state.grad_norm_stat) == pytest.approx(5.0)


def test_norm_loss_slope_fires_on_sustained_joint_decrease_only():
    window = 10
    epochs = 20
    t = np.arange(epochs * window) / window
    losses = np.exp(-t / 5)
    convex = 0.5 * np.exp(-t / 5)  # norm falls with the loss
    fires, _ = feed(tp.norm_loss_slope(window=window), convex, losses, noise=0.02)
    assert fires.any()
    # history (4) + patience (5) - 1 windows at least, and not much later.
    assert 8 * window - 1 <= int(np.argmax(fires)) <= 9 * window

    # Start-up transient (3 windows of falling norm), then a plateau that
    # fluctuates by +-30% from window to window while the loss keeps falling.
    rng = np.random.default_rng(0)
    wobble = np.repeat(0.55 * (1 + 0.3 * rng.uniform(-1, 1, epochs)), window)
    plateau = np.where(t < 3, 1.0 - 0.15 * t, wobble)
    fires, _ = feed(tp.norm_loss_slope(window=window), plateau, losses, noise=0.02)
    assert not fires.any()

    # Non-convex region: the norm grows while the loss falls. Never fires.
    fires, _ = feed(tp.norm_loss_slope(window=window), 0.1 + t, losses, noise=0.02)
    assert not fires.any()


def test_norm_loss_slope_needs_value_unless_exact():
    assert not tp.norm_loss_slope().needs_value
    det = tp.norm_loss_slope(window=2, estimator="minibatch")
    assert det.needs_value
    with pytest.raises(TypeError, match="value"):
        det.update(
            det.init(jnp.zeros(2)),
            grad=jnp.zeros(2),
            grad_norm=jnp.zeros([]),
            value=None,
            step=jnp.asarray(0),
        )


def _plateau_oracle(losses, window, history, patience, z_score, min_steps=0):
    """``loss_plateau`` re-implemented with Python lists and scipy.stats.linregress:
    ``(first firing step or None, stored window means, last fit)``."""
    means, buffer, width, streak, fit, first = [], [], window, 0, None, None
    for step, value in enumerate(np.asarray(losses, np.float64)):
        buffer.append(value)
        if len(buffer) == width:
            means.append(float(np.mean(buffer)))
            buffer = []
            flat = False
            if len(means) >= history:
                fit = scipy.stats.linregress(np.arange(history), means[-history:])
                flat = fit.slope >= -z_score * fit.stderr
            streak = streak + 1 if flat else 0
            if len(means) == 2 * history:
                means = list(np.reshape(means, (history, 2)).mean(axis=1))
                width *= 2
        if first is None and streak >= patience and step + 1 >= min_steps:
            first = step
    return first, means, fit


def _first(fires):
    return int(np.argmax(fires)) if fires.any() else None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_plateau_matches_a_scipy_oracle(seed):
    """Falls for 15 first windows, then a noisy plateau: the firing step, the stored
    (merged) window means and the last fit equal a list-based re-implementation
    with scipy's least-squares fit."""
    window, history, patience = 3, 6, 3
    rng = np.random.default_rng(seed)
    t = np.arange(300) / window
    losses = 0.1 + np.exp(-np.minimum(t, 15) / 4) + 0.01 * rng.standard_normal(t.size)
    detector = tp.loss_plateau(window, patience, history=history, z_score=1.0)
    fires, state = feed(detector, np.ones(t.size), losses)
    expected, means, fit = _plateau_oracle(losses, window, history, patience, z_score=1.0)
    assert expected is not None and expected >= 15 * window
    assert _first(fires) == expected
    stored = int(state.stored)
    np.testing.assert_allclose(np.asarray(state.means)[:stored], means, rtol=1e-5)
    assert int(state.window_steps) > window  # windows were merged at least once
    np.testing.assert_allclose(float(state.slope), fit.slope, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(float(state.slope_stderr), fit.stderr, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
@given(
    seed=st.integers(0, 10_000),
    window=st.integers(1, 4),
    history=st.integers(3, 6),
    patience=st.integers(1, 3),
    min_steps=st.integers(0, 60),
    drift=st.floats(-0.02, 0.0),
)
def test_property_loss_plateau_agrees_with_the_oracle(
    seed, window, history, patience, min_steps, drift
):
    """Random walks with a downward drift: the detector fires exactly where the
    list-based scipy re-implementation does, never before ``min_steps`` nor before
    ``history + patience - 1`` windows."""
    rng = np.random.default_rng(seed)
    losses = 1.0 + np.cumsum(drift + 0.01 * rng.standard_normal(120))
    detector = tp.loss_plateau(window, patience, history=history, min_steps=min_steps)
    fires, _ = feed(detector, np.ones(losses.size), losses, dim=2)
    expected, _, _ = _plateau_oracle(losses, window, history, patience, 1.0, min_steps)
    assert _first(fires) == expected
    if expected is not None:
        assert expected + 1 >= min_steps
        assert expected + 1 >= (history + patience - 1) * window


def test_loss_plateau_never_fires_on_a_power_law():
    """Scale-free: a loss falling like 1/t (5% noise) is never flat over half the run."""
    window = 4
    t = np.arange(window * 500) / window + 1
    rng = np.random.default_rng(0)
    slow = 1.0 / t * (1 + 0.05 * rng.standard_normal(t.size))
    fires, state = feed(tp.loss_plateau(window), np.ones(t.size), slow)
    assert not fires.any()
    assert int(state.window_steps) >= 8 * window  # the fit spans a long time scale by now


def test_loss_plateau_fires_on_an_exactly_constant_loss_and_honours_min_steps():
    window, history, patience = 3, 5, 2
    losses = np.full(window * 20, 0.25)
    fires, _ = feed(tp.loss_plateau(window, patience, history=history), np.ones(60), losses)
    assert _first(fires) == (history + patience - 1) * window - 1
    fires, _ = feed(
        tp.loss_plateau(window, patience, history=history, min_steps=40), np.ones(60), losses
    )
    assert _first(fires) == 39


def test_loss_plateau_is_free_and_needs_value():
    detector = tp.loss_plateau(2)
    assert detector.needs_value
    state = detector.init({"w": jnp.zeros((300, 300)), "b": jnp.zeros(300)})
    assert max(np.size(leaf) for leaf in jax.tree.leaves(state)) == 20  # 2 * history means
    kwargs = dict(grad=jnp.ones(3), grad_norm=jnp.ones([]), step=jnp.asarray(0), params=None)
    with pytest.raises(TypeError, match="value"):
        detector.update(detector.init(jnp.zeros(3)), value=None, **kwargs)
    # No full-batch evaluation: it runs without value_fn.
    detector.update(detector.init(jnp.zeros(3)), value=jnp.ones([]), value_fn=None, **kwargs)


def test_switch_at_and_combinators():
    fires, _ = feed(tp.switch_at(7), np.ones(12))
    assert int(np.argmax(fires)) == 6  # fires on the 7th step: step 7 is the first CG step
    fires, _ = feed(tp.any_of(tp.switch_at(30), tp.switch_at(5)), np.ones(12))
    assert int(np.argmax(fires)) == 4
    fires, _ = feed(tp.all_of(tp.switch_at(3), tp.switch_at(9)), np.ones(12))
    assert int(np.argmax(fires)) == 8
    assert tp.any_of(tp.switch_at(1), tp.norm_loss_slope(estimator="window")).needs_value


@pytest.mark.slow  # a property test: ~7 s
@given(
    peak=st.integers(3, 12),
    noise=st.floats(0.0, 0.2),
    min_steps=st.integers(0, 150),
    seed=st.integers(0, 1000),
)
def test_property_fires_after_peak_and_not_before_min_steps(peak, noise, min_steps, seed):
    window = 8
    norms = rise_then_fall(peak_at=peak, total=peak + 12, window=window)
    fires, _ = feed(
        tp.grad_norm_peak(window=window, min_steps=min_steps), norms, noise=noise, seed=seed
    )
    assert fires.any()
    first = int(np.argmax(fires))
    assert first + 1 >= min_steps
    assert first >= peak * window  # never before the peak


@pytest.mark.parametrize(
    "make,kwargs,name",
    [
        (tp.grad_norm_peak, dict(ratio=0.0), "ratio"),
        (tp.grad_norm_peak, dict(ratio=1.5), "ratio"),
        (tp.grad_norm_peak, dict(window=0), "window"),
        (tp.grad_norm_peak, dict(min_steps=-1), "min_steps"),
        (tp.norm_loss_slope, dict(window=0), "window"),
        (tp.norm_loss_slope, dict(patience=0), "patience"),
        (tp.norm_loss_slope, dict(history=2), "history"),
        (tp.norm_loss_slope, dict(z_score=0.0), "z_score"),
        (tp.norm_loss_slope, dict(estimator="mean"), "estimator"),
        (tp.grad_norm_peak, dict(estimator=None), "estimator"),
        (tp.loss_plateau, dict(window=0), "window"),
        (tp.loss_plateau, dict(patience=0), "patience"),
        (tp.loss_plateau, dict(history=2), "history"),
        (tp.loss_plateau, dict(z_score=-1.0), "z_score"),
        (tp.loss_plateau, dict(z_score=float("inf")), "z_score"),
        (tp.loss_plateau, dict(min_steps=-3), "min_steps"),
        (tp.switch_at, dict(step=0), "step"),
    ],
)
def test_bad_arguments(make, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make(**kwargs)


def test_numpy_scalar_arguments_are_accepted():
    for detector in (
        tp.loss_plateau(window=np.int64(4), z_score=np.float32(1.0)),
        tp.norm_loss_slope(window=np.int32(3), z_score=np.float64(2.0)),
        tp.grad_norm_peak(ratio=np.float32(0.9), window=np.int64(2)),
        tp.switch_at(np.int32(3)),
    ):
        assert isinstance(detector, tp.Detector)


def test_combinators_reject_non_detectors():
    with pytest.raises(ValueError, match="any_of"):
        tp.any_of()
    with pytest.raises(ValueError, match="all_of"):
        tp.all_of("peak")
