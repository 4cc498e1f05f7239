"""A demanding user's situations, each taken from a public bug report against
optax, jaxopt, optimistix, scipy.optimize, flax, orbax, DeepXDE or PyTorch's
optimizers (issue 28, second pass). Each test asserts what an optax user would
expect, against an independent oracle (``optax.adam``, a closed-form minimum,
an uninterrupted run) where one exists.
"""

import os
import subprocess
import sys
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase as tp

# Each situation runs a whole small training loop; together about 5 CPU-minutes.
pytestmark = pytest.mark.slow


A = jnp.diag(jnp.array([1.0, 3.0, 10.0]))
B = jnp.array([1.0, -2.0, 0.5])
XSTAR = jnp.linalg.solve(A, B)  # closed-form minimiser of quad
P0 = {"w": jnp.array([5.0, -4.0, 3.0])}


def quad(p):
    x = p["w"]
    return 0.5 * x @ A @ x - B @ x


def run(opt, params, n, loss=quad):
    """n jitted steps of the README's loop (value=mini-batch loss, value_fn=objective)."""
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        v, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p, value=v, value_fn=loss)
        return optax.apply_updates(p, u), s

    for _ in range(n):
        params, state = step(params, state)
    return params, state


PRESETS = {
    "adam_cg": tp.adam_cg,
    "adam_lbfgs": tp.adam_lbfgs,
    "adam_newton_cg": tp.adam_newton_cg,
}


def every_second_phase(switch: int) -> list:
    """The bare second phases and the presets (switching after ``switch`` Adam
    steps; the default policy told an epoch of ``switch`` steps), as pytest params."""
    return [
        pytest.param(tp.nonlinear_cg, id="nonlinear_cg"),
        pytest.param(tp.newton_cg, id="newton_cg"),
        pytest.param(lambda: tp.adam_cg(0.1, policy=tp.switch_at(switch)), id="adam_cg"),
        pytest.param(lambda: tp.adam_lbfgs(0.1, policy=tp.switch_at(switch)), id="adam_lbfgs"),
        pytest.param(
            lambda: tp.adam_newton_cg(0.1, policy=tp.switch_at(switch)), id="adam_newton_cg"
        ),
        pytest.param(lambda: tp.adam_cg(0.1, steps_per_epoch=switch), id="default"),
    ]


def _maxdiff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


# 1. optax#415 / optax#424: a schedule (or an array) as the learning rate.
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(
    "lr",
    [optax.linear_schedule(1e-1, 1e-3, 10), jnp.asarray(0.05), np.float32(0.05), 1],
    ids=["schedule", "jnp-array", "np-float32", "python-int"],
)
def test_learning_rate_kinds_match_optax_adam_in_phase_0(preset, lr):
    ref, _ = run(optax.adam(lr), P0, 8)
    got, _ = run(PRESETS[preset](lr, policy=tp.switch_at(100)), P0, 8)
    assert _maxdiff(ref["w"], got["w"]) < 1e-6


def test_inject_hyperparams_with_a_schedule_matches_optax():
    sched = optax.linear_schedule(1e-1, 1e-3, 10)
    ref, _ = run(optax.inject_hyperparams(optax.adam)(learning_rate=sched), P0, 8)
    opt = optax.inject_hyperparams(tp.adam_cg, static_args=("policy",))(
        learning_rate=sched, policy=tp.switch_at(100)
    )
    got, _ = run(opt, P0, 8)
    assert _maxdiff(ref["w"], got["w"]) < 1e-6


# 2. optimistix#144 / optimistix#106: jax.vmap over seeds of a whole training step.
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_vmap_over_seeds_across_the_switch_equals_a_loop(preset):
    opt = PRESETS[preset](0.1, policy=tp.switch_at(3))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    starts = jax.vmap(lambda k: jax.random.normal(k, (3,)))(keys)

    def step(p, s):
        v, g = jax.value_and_grad(quad)(p)
        u, s = opt.update(g, s, p, value=v, value_fn=quad)
        return optax.apply_updates(p, u), s

    params = {"w": starts}
    state = jax.vmap(opt.init)(params)
    vstep = jax.jit(jax.vmap(step))
    # 12 CG iterations after the switch: a Wolfe search is inexact, so a 3-D
    # quadratic takes more than 3 (up to 10 for these seeds).
    for _ in range(15):
        params, state = vstep(params, state)
    loop = jnp.stack([run(opt, {"w": starts[i]}, 15)[0]["w"] for i in range(3)])
    assert _maxdiff(loop, params["w"]) < 1e-5
    assert _maxdiff(params["w"], jnp.broadcast_to(XSTAR, (3, 3))) < 1e-3


# 3. optimistix#47, pytorch#5953, jaxopt#492: starting exactly at a minimum
#    (zero gradient) and running many second-phase steps: no 0/0, no motion.
@pytest.mark.parametrize("make", every_second_phase(switch=1))
def test_exact_minimum_many_second_phase_steps_stay_put(make):
    def sq(p):
        return jnp.sum(p["w"] ** 2)

    p, state = run(make(), {"w": jnp.zeros(3)}, 30, loss=sq)
    assert bool(jnp.all(p["w"] == 0.0))
    assert int(tp.info(state).nonfinite_events or 0) == 0


# 4. optax#1201: clip_by_global_norm chained before the optimizer.
def test_clip_before_adam_cg_equals_clip_before_adam_then_reaches_minimum():
    clip = optax.clip_by_global_norm(1.0)
    ref, _ = run(optax.chain(clip, optax.adam(0.1)), P0, 6)
    got, _ = run(optax.chain(clip, tp.adam_cg(0.1, policy=tp.switch_at(100))), P0, 6)
    assert _maxdiff(ref["w"], got["w"]) < 1e-6
    got, state = run(optax.chain(clip, tp.adam_cg(0.1, policy=tp.switch_at(3))), P0, 20)
    assert tp.info(state).phase == 1
    assert _maxdiff(got["w"], XSTAR) < 1e-4


# 5. optax#1746 (apply_if_finite's count): apply_if_finite around our optimizer.
def test_apply_if_finite_around_adam_cg_matches_optax_with_a_nan_step():
    def nan_run(opt):
        state, p = opt.init(P0), P0

        @jax.jit
        def step(p, s, bad):
            v, g = jax.value_and_grad(quad)(p)
            g = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), g)
            u, s = opt.update(g, s, p, value=v, value_fn=quad)
            return optax.apply_updates(p, u), s

        for i in range(6):
            p, state = step(p, state, i == 2)
        return p

    ref = nan_run(optax.apply_if_finite(optax.adam(0.1), 3))
    got = nan_run(optax.apply_if_finite(tp.adam_cg(0.1, policy=tp.switch_at(100)), 3))
    assert _maxdiff(ref["w"], got["w"]) < 1e-6
    got, _ = run(optax.apply_if_finite(tp.adam_cg(0.1, policy=tp.switch_at(3)), 3), P0, 20)
    assert _maxdiff(got["w"], XSTAR) < 1e-4


# 6. optax#1201 (vroulet: "not coded to be backpropagated"): jax.grad through
#    update to meta-learn the learning rate, in phase 0.
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_meta_gradient_of_learning_rate_equals_optax_adam(preset):
    def outer(lr, make):
        opt = make(lr)
        p, s = P0, opt.init(P0)
        for _ in range(3):
            v, g = jax.value_and_grad(quad)(p)
            u, s = opt.update(g, s, p, value=v, value_fn=quad)
            p = optax.apply_updates(p, u)
        return quad(p)

    ref = jax.grad(outer)(0.1, optax.adam)
    got = jax.grad(outer)(0.1, lambda lr: PRESETS[preset](lr, policy=tp.switch_at(100)))
    assert abs(float(ref - got)) <= 1e-5 * abs(float(ref))


# 7. KellerJordan/Muon#54, chainer#1913 (parameters without gradient: None
#    leaves); jax#16805 (python-float inputs). optax.adam accepts None leaves and
#    Python-float leaves; so must every preset, in both phases.
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_none_leaf_is_ignored_in_both_phases(preset):
    params = {"w": P0["w"], "b": None}
    got, _ = run(PRESETS[preset](0.1, policy=tp.switch_at(3)), params, 12, loss=quad)
    assert got["b"] is None
    assert _maxdiff(got["w"], XSTAR) < 1e-3


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("scalar", [0.5, np.float32(0.5), jnp.asarray(0.5)], ids=["py", "np", "0d"])
def test_python_float_and_0d_leaves_work_like_optax_adam(preset, scalar):
    def loss(p):
        return quad({"w": p["w"]}) + (p["s"] - 2.0) ** 2

    params = {"w": P0["w"], "s": scalar}
    ref, _ = run(optax.adam(0.1), params, 2, loss=loss)
    got, _ = run(PRESETS[preset](0.1, policy=tp.switch_at(100)), params, 2, loss=loss)
    assert _maxdiff(ref["s"], got["s"]) < 1e-6
    got, _ = run(PRESETS[preset](0.1, policy=tp.switch_at(3)), params, 12, loss=loss)
    assert abs(float(got["s"]) - 2.0) < 1e-3


_X64_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, optax, twophase as tp
    A = jnp.diag(jnp.array([1.0, 3.0, 10.0])); B = jnp.array([1.0, -2.0, 0.5])
    xstar = jnp.linalg.solve(A, B)
    def loss64(p):  # float32 model, float64 loss (x64 on)
        x = p["w"].astype(jnp.float64)
        return 0.5 * x @ A @ x - B @ x
    sched = optax.linear_schedule(1e-1, 1e-3, 10)
    for make in (tp.adam_cg, tp.adam_lbfgs, tp.adam_newton_cg):
        opt = make(sched, policy=tp.switch_at(3))
        p = {"w": jnp.array([5.0, -4.0, 3.0], jnp.float32)}
        s0 = s = opt.init(p)
        @jax.jit
        def step(p, s):
            v, g = jax.value_and_grad(loss64)(p)
            u, s = opt.update(g, s, p, value=v, value_fn=loss64)
            return optax.apply_updates(p, u), s
        for _ in range(12):
            p, s = step(p, s)
        assert p["w"].dtype == jnp.float32, (make.__name__, p["w"].dtype)
        same = [a.dtype == b.dtype for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s))]
        assert all(same), make.__name__
        assert float(jnp.max(jnp.abs(p["w"] - xstar))) < 1e-3, (make.__name__, p["w"])
    print("OK")
    """
)


# 8. jax#6286 (line search under x64 with float32), flax#924 (Adam promotes to
#    float64 under x64): float32 params, float64 loss, a schedule, x64 on.
def test_x64_with_float32_params_keeps_dtypes_and_converges():
    out = subprocess.run(
        [sys.executable, "-c", _X64_SCRIPT],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


# 9. DeepXDE#215, #1085, #1953: loss weights changed mid-run (adaptive
#    weighting, or resampled collocation points). After the change every
#    optimizer should minimise the NEW objective, whose minimiser is known.
@pytest.mark.parametrize("make", every_second_phase(switch=2))
def test_changed_loss_weight_mid_run_is_minimised(make):
    opt = make()

    def weighted(p, weight):  # minimiser XSTAR / weight; positive everywhere
        x = p["w"]
        return weight * (0.5 * x @ A @ x) - B @ x + 5.0

    @jax.jit
    def step(p, s, weight):
        f = lambda q: weighted(q, weight)
        v, g = jax.value_and_grad(f)(p)
        u, s = opt.update(g, s, p, value=v, value_fn=f)
        return optax.apply_updates(p, u), s

    p, s = P0, opt.init(P0)
    for _ in range(15):
        p, s = step(p, s, 1.0)
    assert _maxdiff(p["w"], XSTAR) < 1e-3
    for _ in range(25):
        p, s = step(p, s, 4.0)
    assert _maxdiff(p["w"], XSTAR / 4.0) < 1e-3, p["w"]


def test_resampled_data_mid_run_is_minimised():
    """The same with the data changed (PINN collocation points resampled)."""
    opt = tp.adam_cg(0.1, policy=tp.switch_at(2))

    def loss(p, target):
        return jnp.mean((p["w"] - target) ** 2)

    @jax.jit
    def step(p, s, target):
        f = lambda q: loss(q, target)
        v, g = jax.value_and_grad(f)(p)
        u, s = opt.update(g, s, p, value=v, value_fn=f)
        return optax.apply_updates(p, u), s

    p, s = P0, opt.init(P0)
    t1, t2 = jnp.array([1.0, 2.0, 3.0]), jnp.array([-1.0, 0.0, 1.0])
    for _ in range(10):
        p, s = step(p, s, t1)
    for _ in range(10):
        p, s = step(p, s, t2)
    assert _maxdiff(p["w"], t2) < 1e-3, p["w"]


# 10. jax#16805 (2nd-order autodiff through remat): jax.checkpoint and
#     custom_vjp inside the loss, through every second phase (Newton-CG's HVPs).
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_remat_and_custom_vjp_in_the_loss(preset):
    @jax.custom_vjp
    def ident(x):
        return x

    ident.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1e6, 1e6),))

    @jax.checkpoint
    def loss(p):
        return quad({"w": ident(p["w"])})

    got, _ = run(PRESETS[preset](0.1, policy=tp.switch_at(3)), P0, 12, loss=loss)
    assert _maxdiff(got["w"], XSTAR) < 1e-3


# 11. optax#1036 (resuming restores the step count), orbax: a mid-phase-1 state
#     saved with the user's own orbax StandardCheckpointer, restored, continued.
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_orbax_standard_checkpointer_resume_in_phase_1_is_exact(preset):
    ocp = pytest.importorskip("orbax.checkpoint")
    opt = PRESETS[preset](0.1, policy=tp.switch_at(3))
    uninterrupted, _ = run(opt, P0, 6)
    p, s = run(opt, P0, 4)
    path = os.path.join(tempfile.mkdtemp(), "ckpt")
    ck = ocp.StandardCheckpointer()
    ck.save(path, {"params": p, "opt": s})
    ck.wait_until_finished()
    fresh = PRESETS[preset](0.1, policy=tp.switch_at(3))
    restored = ck.restore(path, {"params": P0, "opt": fresh.init(P0)})
    p, s = restored["params"], restored["opt"]
    assert tp.info(s).phase == 1

    @jax.jit
    def step(p, s):
        v, g = jax.value_and_grad(quad)(p)
        u, s = fresh.update(g, s, p, value=v, value_fn=quad)
        return optax.apply_updates(p, u), s

    for _ in range(2):
        p, s = step(p, s)
    assert _maxdiff(p["w"], uninterrupted["w"]) == 0.0


# 12. optax#377 (bfloat16 model through a wrapper): bfloat16 params through
#     the second phase keep their dtype and state dtypes, and reach the minimum
#     to bfloat16 precision.
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_bfloat16_params_through_the_second_phase(preset):
    def loss(p):
        x = p["w"].astype(jnp.float32)
        return 0.5 * x @ A @ x - B @ x

    params = {"w": P0["w"].astype(jnp.bfloat16)}
    opt = PRESETS[preset](0.1, policy=tp.switch_at(3))
    # bfloat16 rounds every accepted point (8 bits), which costs CG its conjugacy:
    # it converges linearly here, in about 30 second-phase steps.
    got, state = run(opt, params, 40, loss=loss)
    assert got["w"].dtype == jnp.bfloat16
    init = opt.init(params)
    pairs = zip(jax.tree.leaves(init), jax.tree.leaves(state), strict=True)
    assert all(a.dtype == b.dtype for a, b in pairs)
    assert float(loss(got)) - float(quad({"w": XSTAR})) < 1e-4


# 13. optax#1567 / optax#320 (MultiSteps accumulation): MultiSteps around
#     adam_cg in the user's own loop equals MultiSteps around optax.adam.
def test_multisteps_in_own_loop_matches_optax_in_phase_0():
    ref, _ = run(optax.MultiSteps(optax.adam(0.1), 2), P0, 8)
    got, _ = run(optax.MultiSteps(tp.adam_cg(0.1, policy=tp.switch_at(100)), 2), P0, 8)
    assert _maxdiff(ref["w"], got["w"]) < 1e-6


# 14. flax#4471 (TrainState does not forward value/value_fn): plain
#     apply_gradients fails clearly; twophase.flax.linen_apply_gradients reaches
#     the least-squares solution.
def test_linen_trainstate():
    nn = pytest.importorskip("flax.linen")
    from flax.training import train_state

    import twophase.flax as tpf

    x = jax.random.normal(jax.random.PRNGKey(1), (64, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.3

    class Lin(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x)[:, 0]

    model = Lin()

    def loss(p):
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    state = train_state.TrainState.create(
        apply_fn=model.apply,
        params=model.init(jax.random.PRNGKey(0), x)["params"],
        tx=tp.adam_cg(0.1, policy=tp.switch_at(3)),
    )
    with pytest.raises(TypeError, match="value_fn"):
        state.apply_gradients(grads=jax.grad(loss)(state.params))

    @jax.jit
    def step(s):
        v, g = jax.value_and_grad(loss)(s.params)
        return tpf.linen_apply_gradients(s, g, value=v, value_fn=loss)

    for _ in range(20):
        state = step(state)
    design = jnp.c_[x, jnp.ones(64)]
    best = jnp.mean((design @ jnp.linalg.lstsq(design, y)[0] - y) ** 2)
    assert float(loss(state.params)) <= float(best) + 1e-6


# 15. flax#3983 (nnx.Optimizer wrt): a model with BatchNorm statistics and a
#     Dropout RNG (non-trainable state) through the switch with nnx_value_fn.
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_nnx_optimizer_with_batchnorm_and_dropout(preset):
    from flax import nnx

    import twophase.flax as tpf

    x = jax.random.normal(jax.random.PRNGKey(1), (64, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.3

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 16, rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            self.do = nnx.Dropout(0.1, rngs=rngs)
            self.l2 = nnx.Linear(16, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.do(nnx.relu(self.bn(self.l1(x)))))[:, 0]

    def loss_fn(model, batch):
        bx, by = batch
        return jnp.mean((model(bx) - by) ** 2)

    model = Net(nnx.Rngs(0))
    model.eval()
    start = float(loss_fn(model, (x, y)))
    optimizer = nnx.Optimizer(model, PRESETS[preset](1e-2, policy=tp.switch_at(3)), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch, data):
        model.train()
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        model.eval()
        value_fn = tpf.nnx_value_fn(model, loss_fn, data)
        optimizer.update(model, grads, value=loss, value_fn=value_fn)
        return loss

    for _ in range(10):
        train_step(model, optimizer, (x, y), (x, y))
    model.eval()
    end = float(loss_fn(model, (x, y)))
    assert tp.info(optimizer).phase == 1 and tp.info(optimizer).value_and_grad_evals > 0
    assert np.isfinite(end) and end < 0.5 * start


_SHARD_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax, twophase as tp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("x",))
    d = jnp.linspace(1.0, 20.0, 64); b = jnp.sin(jnp.arange(64, dtype=jnp.float32))
    def loss(p):
        m = p["m"]
        quadratic = 0.5 * jnp.sum(d * p["w"] ** 2) - jnp.sum(b * p["w"])
        return quadratic + 0.5 * jnp.sum((m @ m.T - jnp.eye(8)) ** 2)
    p0 = {"w": jnp.zeros(64), "m": jax.random.normal(jax.random.PRNGKey(0), (8, 8)) * 0.3}
    def go(opt, shard):
        p = p0
        if shard:
            p = {"w": jax.device_put(p0["w"], NamedSharding(mesh, P("x"))),
                 "m": jax.device_put(p0["m"], NamedSharding(mesh, P("x", None)))}
        s = opt.init(p)
        @jax.jit
        def step(p, s):
            v, g = jax.value_and_grad(loss)(p)
            u, s = opt.update(g, s, p, value=v, value_fn=loss)
            return optax.apply_updates(p, u), s
        for _ in range(10):
            p, s = step(p, s)
        return p
    for make in (tp.adam_cg, tp.adam_lbfgs, tp.adam_newton_cg):
        single = go(make(0.05, policy=tp.switch_at(3)), False)
        sharded = go(make(0.05, policy=tp.switch_at(3)), True)
        diff = max(float(jnp.max(jnp.abs(single[k] - sharded[k]))) for k in single)
        assert diff < 1e-5, (make.__name__, diff)
        assert sharded["w"].sharding.spec == P("x"), sharded["w"].sharding
    print("OK")
    """
)


# 16. jaxopt#590 / optimistix#106: parameters SHARDED (not replicated) over 8
#     simulated CPU devices, across the switch, equal the single-device run.
@pytest.mark.slow
def test_sharded_params_on_8_cpu_devices_match_single_device():
    out = subprocess.run(
        [sys.executable, "-c", _SHARD_SCRIPT],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
