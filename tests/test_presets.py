"""Presets: small signatures, removed arguments name their new spelling; the
package imports without cycles and without private names across modules."""

import ast
import importlib
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import twophase as tp

REMOVED = [
    (tp.adam_cg, "window", 100, "steps_per_epoch="),
    (tp.adam_cg, "detector", tp.switch_at(1), "policy="),
    (tp.adam_cg, "fallback", 2, "max_failures"),
    (tp.adam_cg, "min_steps", 3, "safe_resort\\(min_steps"),
    (tp.adam_cg, "ratio", 0.9, "grad_norm_peak"),
    (tp.adam_cg, "b1", 0.9, "gated_adam"),
    (tp.adam_cg, "eps", 1e-8, "gated_adam"),
    (tp.adam_cg, "beta", "fletcher_reeves", "second=twophase.nonlinear_cg"),
    (tp.adam_cg, "linesearch", "golden", "second=twophase.nonlinear_cg"),
    (tp.adam_lbfgs, "memory_size", 5, "second=optax.lbfgs"),
    (tp.adam_newton_cg, "damping", 1e-2, "second=twophase.newton_cg"),
    (tp.adam_newton_cg, "sketch_size", 8, "second=twophase.newton_cg"),
]


@pytest.mark.parametrize(("make", "name", "value", "spelling"), REMOVED)
def test_removed_argument_names_its_new_spelling(make, name, value, spelling):
    with pytest.raises(TypeError, match=f"`{name}`.*{spelling}"):
        make(**{name: value})


def test_unknown_argument_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        tp.adam_cg(nope=1)


def test_newton_cg_nystrom_precondition_names_second():
    with pytest.raises(ValueError, match="preconditioner='nystrom'"):
        tp.adam_newton_cg(precondition="nystrom")


def test_policy_with_default_policy_arguments_is_an_error():
    with pytest.raises(ValueError, match="`budget`"):
        tp.adam_cg(policy=tp.switch_at(3), budget=10)
    with pytest.raises(ValueError, match="`steps_per_epoch`"):
        tp.adam_cg(policy=tp.switch_at(3), steps_per_epoch=10)


@pytest.mark.parametrize("make", [tp.adam_cg, tp.adam_lbfgs, tp.adam_newton_cg, tp.adam_then])
def test_presets_take_at_most_six_arguments(make):
    import inspect

    named = [
        p
        for p in inspect.signature(make).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert len(named) <= 6


def test_second_phase_options_go_in_as_the_second_phase():
    """adam_cg(second=nonlinear_cg(beta=...)) equals two_phase(gated_adam, that CG)."""

    def f(p):
        return jnp.sum((p - jnp.arange(3.0)) ** 2 * jnp.asarray([1.0, 3.0, 9.0]))

    second = tp.nonlinear_cg("fletcher_reeves", "golden")
    a = tp.adam_cg(0.1, second=second, policy=tp.switch_at(2))
    b = tp.two_phase(optax.adam(0.1), tp.nonlinear_cg("fletcher_reeves", "golden"), tp.switch_at(2))
    xa = xb = jnp.zeros(3)
    sa, sb = a.init(xa), b.init(xb)
    for _ in range(5):
        ua, sa = a.update(jax.grad(f)(xa), sa, xa, value=f(xa), value_fn=f)
        ub, sb = b.update(jax.grad(f)(xb), sb, xb, value=f(xb), value_fn=f)
        xa, xb = xa + ua, xb + ub
        assert jnp.allclose(xa, xb, rtol=1e-6, atol=1e-7)
    assert int(tp.info(sa).cg_iterations) == 3


def test_a_new_second_phase_is_a_one_line_preset():
    def adam_gd(learning_rate=1e-3, **kwargs):
        return tp.adam_then(tp.evaluating(optax.sgd(0.1)), learning_rate, **kwargs)

    opt = adam_gd(0.1, policy=tp.switch_at(1))
    x = jnp.ones(3)
    s = opt.init(x)
    for _ in range(4):
        u, s = opt.update(2 * x, s, x, value=jnp.sum(x**2), value_fn=lambda p: jnp.sum(p**2))
        x = x + u
    assert int(tp.info(s).phase) == 1 and float(jnp.sum(x**2)) < 3.0


PACKAGE = pathlib.Path(tp.__file__).parent
CORE = sorted(
    p for p in PACKAGE.rglob("*.py") if "experiments" not in p.parts and p.name != "__main__.py"
)


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("module", ["twophase.switch", "twophase.presets", "twophase.first_phase"])
def test_each_module_imports_alone(module):
    code = f"import {module}"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_no_private_names_imported_across_modules():
    offenders = []
    for path in CORE:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twophase"):
                offenders += [
                    f"{path.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    owned = {"switch.py", "presets.py", "first_phase.py", "_control.py", "_numerics.py"}
    assert not [o for o in offenders if o.split(":")[0] in owned], offenders


def test_switch_and_presets_do_not_import_each_other_and_switch_knows_no_adam():
    switch = (PACKAGE / "switch.py").read_text()
    assert "presets" not in switch and "__getattr__" not in switch
    names = set()
    for node in ast.walk(ast.parse(switch)):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.alias)):
            names.add(getattr(node, "name", ""))
    assert not [n for n in names if "adam" in n.lower()]
    importlib.import_module("twophase.switch")
