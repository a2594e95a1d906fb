"""The gradient checker and ``chainrule check`` check the symbolic rules (issue 18, item 3; docs/derivatives.md).

An operator with ``vjp_graph`` is checked to second order (its gradient graph against the numpy vjp's
gradient, then that graph derived again: a Hessian-vector product against finite differences of the vjp's
gradients), one with ``jvp_graph`` in forward mode (against finite differences of forward), on its sample
cases in float64. The reports are kinds "second order" and "jvp"; an operator without the rules is "first
order only", not a failure. ``OperatorSet`` drafts declare the rules with ``@op.vjp_graph`` /
``@op.jvp_graph``. Every built-in operator passes.
"""
from __future__ import annotations

import json
import time
import types
from dataclasses import replace

import numpy as np
import pytest

from chainrule.core.errors import InvalidOperatorError
from chainrule.plugins import OperatorSet, float_like_input
from chainrule.plugins.checking import CheckCache, check_op, check_registry
from chainrule.plugins.manager import load_plugins
from chainrule.plugins.testing import (
    SYMBOLIC_KINDS, Case, check_jvp, check_operator, check_second_order, check_symbolic, derivatives_text,
)
from chainrule.server.cli import main

BUILTINS = load_plugins(env={}, entry_points=False, only=["builtin"]).registry


def curvy_set() -> OperatorSet:
    """curvy.cube (k x^3, both rules) and curvy.plain (sinh, no symbolic rules)."""
    ops = OperatorSet()

    @ops.operator("curvy.cube", infer=float_like_input, k=1.0)
    def cube(x, *, k):
        """k x^3."""
        return k * x ** 3

    @cube.vjp
    def _(g, out, x, *, k):
        return (g * 3.0 * k * x * x,)

    @cube.vjp_graph
    def _(b, g, out, x, *, k):
        return (g * (x * x) * (3.0 * k),)

    @cube.jvp_graph
    def _(b, tangents, out, x, *, k):
        return tangents[0] * (x * x) * (3.0 * k)

    @cube.sample
    def _(rng):
        return [rng.standard_normal((2, 3))], {"k": float(rng.uniform(0.5, 2.0))}

    @ops.operator("curvy.plain", infer=float_like_input)
    def plain(x):
        """sinh(x), first order only."""
        return np.sinh(x)

    @plain.vjp
    def _(g, out, x):
        return (g * np.cosh(x),)

    return ops


def split_op():
    """sin and cos of x, two values: the several-output forms of both rules."""
    from chainrule.core import OpDef

    def vjp(gs, outs, x):
        d = np.zeros_like(x)
        if gs[0] is not None:
            d = d + gs[0] * outs[1]
        if gs[1] is not None:
            d = d - gs[1] * outs[0]
        return (d,)

    def vjp_graph(b, gs, outs, x):
        terms = [None if gs[0] is None else gs[0] * outs[1], None if gs[1] is None else -(gs[1] * outs[0])]
        return (b.add_tangents(*terms),)

    def jvp_graph(b, tangents, outs, x):
        (t,) = tangents
        return t * outs[1], -(t * outs[0])

    return OpDef("curvy.split", 1, lambda x: (np.sin(x), np.cos(x)), vjp, n_outputs=2, vjp_graph=vjp_graph,
                 jvp_graph=jvp_graph)


def loaded(*ops):
    extra = OperatorSet()
    for op in ops:
        extra.add(op)
    plugins = [("curvy", types.SimpleNamespace(register_operators=curvy_set().hookimpl()), "chainrule-curvy", "1.0")]
    if ops:
        plugins.append(("curvy2", types.SimpleNamespace(register_operators=extra.hookimpl()), "chainrule-curvy2", "1.0"))
    result = load_plugins(env={}, entry_points=False, only=["builtin", *(p[0] for p in plugins)], extra=plugins)
    result.raise_for_problems()
    return result


CURVY = loaded().registry


def test_an_operator_with_correct_rules_passes_second_order_and_jvp():
    verdict = check_op(CURVY["curvy.cube"], registry=CURVY)
    assert verdict.passed and verdict.derivatives == "second order, jvp", verdict.message
    kinds = [c.kind for c in verdict.cases]
    assert kinds == ["sample"] * 3 + ["second order"] * 3 + ["jvp"] * 3 + ["float32"]
    assert all(c.status == "passed" and c.max_abs_error < 1e-6 for c in verdict.cases if c.kind in SYMBOLIC_KINDS)
    assert all(c.inputs == "float64[2, 3]" and dict(c.attrs)["k"] for c in verdict.cases if c.kind in SYMBOLIC_KINDS)
    # the same through check_operator (reports), without a registry: the built-in operators are added
    reports = check_operator(CURVY["curvy.cube"])
    assert all(r.passed for r in reports), "\n".join(map(str, reports))
    second = next(r for r in reports if r.kind == "second order")
    assert "H v through vjp_graph" in str(second) and "finite differences of the vjp" in str(second)
    jvp = next(r for r in reports if r.kind == "jvp")
    assert "output float64[2, 3]: ok" in str(jvp) and "inputs float64[2, 3]" in str(jvp)


def test_several_outputs_are_checked_through_both_rules():
    op = split_op()
    reports = check_symbolic(op)
    assert [r.kind for r in reports] == ["second order"] * 3 + ["jvp"] * 3
    assert all(r.passed for r in reports), "\n".join(map(str, reports))
    assert [c.label for c in reports[-1].inputs] == ["output 0", "output 1"]
    wrong = replace(op, jvp_graph=lambda b, tangents, outs, x: (tangents[0] * outs[1], tangents[0] * outs[0]))
    failed = [r for r in check_symbolic(wrong) if not r.passed]
    assert failed and all(r.kind == "jvp" for r in failed)
    assert failed[0].failure_message().startswith("curvy.split: jvp: output 1 at ")


def test_a_vjp_graph_missing_a_factor_fails_second_order_naming_the_operator():
    forgot = replace(CURVY["curvy.cube"], vjp_graph=lambda b, g, out, x, *, k: (g * (x * x) * k,))   # no 3
    verdict = check_op(forgot, registry=CURVY)
    assert not verdict.passed and verdict.status == "FAILED"
    assert verdict.message.startswith("plugin 'curvy' (distribution chainrule-curvy 1.0): operator curvy.cube: "
                                      "second order: input 0 at ("), verdict.message
    assert "vjp_graph's gradient gives" in verdict.message and "the vjp gives" in verdict.message
    assert verdict.message.endswith("; inputs float64[2, 3], attrs k=1.40995")
    # first order and jvp still pass: only the second-order cases fail
    assert {c.kind for c in verdict.cases if c.status == "FAILED"} == {"second order"}


def test_a_vjp_graph_right_to_first_order_only_fails_the_hessian_vector_product():
    """g * stop_gradient(3 k x^2) gives the right gradient, but its own derivative is zero: only H v sees it."""
    frozen = replace(CURVY["curvy.cube"], vjp_graph=lambda b, g, out, x, *, k: (g * b.op("stop_gradient", x * x * (3.0 * k)),))
    report = check_second_order(frozen, Case([np.array([0.5, -1.0, 2.0])], {"k": 1.0}), CURVY)
    assert not report.passed
    assert report.failure_message().startswith("curvy.cube: second order: input 0 at ")
    assert "H v through vjp_graph gives" in report.failure_message()
    assert "finite differences of the vjp give" in report.failure_message()


def test_a_wrong_jvp_graph_fails_jvp():
    flipped = replace(CURVY["curvy.cube"], jvp_graph=lambda b, tangents, out, x, *, k: -(tangents[0] * (x * x) * (3.0 * k)))
    verdict = check_op(flipped, registry=CURVY)
    assert not verdict.passed
    assert {c.kind for c in verdict.cases if c.status == "FAILED"} == {"jvp"}
    assert "operator curvy.cube: jvp: output at (" in verdict.message
    assert "jvp_graph gives" in verdict.message and "finite differences of forward give" in verdict.message
    report = check_jvp(flipped, Case([np.array([1.0, 2.0])], {"k": 1.0}))
    assert not report.passed and report.inputs[0].analytic == pytest.approx(-report.inputs[0].numeric, rel=1e-6)


def test_an_operator_without_rules_is_first_order_only_not_a_failure():
    verdict = check_op(CURVY["curvy.plain"], registry=CURVY)
    assert verdict.passed and verdict.derivatives == "first order only" == derivatives_text(CURVY["curvy.plain"])
    assert [c.kind for c in verdict.cases] == ["default"] * 3 + ["float32"]
    assert check_symbolic(CURVY["curvy.plain"]) == []
    only_vjp = replace(CURVY["curvy.cube"], jvp_graph=None)
    assert derivatives_text(only_vjp) == "second order"
    assert {r.kind for r in check_symbolic(only_vjp)} == {"second order"}


def test_a_rule_that_needs_an_operator_without_rules_fails_with_missing_rule():
    """A vjp_graph built from a plugin helper that has no vjp_graph of its own: its second derivative is MISSING_RULE."""
    from chainrule.core import OpDef

    helper = OpDef("curvy2.square3", 1, lambda x: 3.0 * x * x, lambda g, out, x: (6.0 * g * x,))
    uses = replace(CURVY["curvy.cube"], name="curvy2.cube",
                   vjp_graph=lambda b, g, out, x, *, k: (g * b.op("curvy2.square3", x) * k,))
    registry = loaded(helper, uses).registry
    verdict = check_op(registry["curvy2.cube"], registry=registry)
    assert not verdict.passed
    assert "operator curvy2.cube: second order: deriving the gradient graph again (the second derivative): " \
           "MissingRuleError: node" in verdict.message
    assert "operator 'curvy2.square3' has no vjp_graph rule" in verdict.message
    # a rule naming an operator the registry does not have says so
    unknown = replace(uses, vjp_graph=lambda b, g, out, x, *, k: (g * b.op("curvy2.nothing", x),))
    report = check_symbolic(unknown, registry=registry)[0]
    assert not report.passed and "needs operator 'curvy2.nothing', which this server does not load" in report.problem


# --- declaring the rules ---------------------------------------------------------------------------

def test_the_decorators_set_the_opdef_fields():
    op = CURVY["curvy.cube"]
    assert callable(op.vjp_graph) and callable(op.jvp_graph)
    assert CURVY["curvy.plain"].vjp_graph is None and CURVY["curvy.plain"].jvp_graph is None


def test_a_rule_without_the_builder_is_refused_as_it_is_declared():
    ops = OperatorSet()

    @ops.operator("t.scale", k=2.0)
    def scale(x, *, k):
        return k * x

    with pytest.raises(InvalidOperatorError) as caught:
        @scale.vjp_graph
        def _(g, out, x, *, k):       # a numpy vjp's signature
            return (g * k,)
    assert caught.value.message == (
        "operator 't.scale': the vjp_graph rule takes 3 positional parameters (g, out, x); a vjp_graph rule takes "
        "(b, g, out, x) and the attributes as keywords: the builder b first, unlike a vjp")
    with pytest.raises(InvalidOperatorError, match=r"jvp_graph rule takes \(b, tangents, out, x\)"):
        scale.jvp_graph(lambda tangents, out, x, *, k: tangents[0] * k)
    with pytest.raises(InvalidOperatorError, match="was given a int, not a function"):
        scale.vjp_graph(3)
    # *inputs and a variadic operator are fine
    scale.vjp_graph(lambda b, g, out, *xs, k: tuple(g * k for _ in xs))

    @ops.operator("t.total")
    def total(*xs):
        return sum(xs)

    total.jvp_graph(lambda b, tangents, out, *xs: b.add_tangents(*tangents))


def test_a_rule_that_does_not_take_a_declared_attribute_is_refused_at_load():
    ops = OperatorSet()

    @ops.operator("t.scale", k=2.0)
    def scale(x, *, k):
        return k * x

    @scale.vjp
    def _(g, out, x, *, k):
        return (g * k,)

    @scale.jvp_graph
    def _(b, tangents, out, x):        # no k
        return tangents[0]

    result = load_plugins(env={}, entry_points=False, only=["t"],
                          extra=[("t", types.SimpleNamespace(register_operators=ops.hookimpl()), "chainrule-t", "1.0")])
    (broken,) = result.broken
    assert "operator 't.scale': the jvp_graph rule does not accept the declared attribute 'k'" in broken.message


# --- chainrule check --------------------------------------------------------------------------------

def test_chainrule_check_shows_the_symbolic_case_lines_the_summary_and_json(monkeypatch, capsys):
    registry = loaded(replace(CURVY["curvy.cube"], name="curvy2.bad",
                              vjp_graph=lambda b, g, out, x, *, k: (g * (x * x) * k,))).registry
    monkeypatch.setattr("chainrule.server.cli.plugins.load_plugins",
                        lambda **_: types.SimpleNamespace(registry=registry, unmatched=[], broken=[], plugins=[],
                                                          problems=[]))
    code = main(["check", "--plugin", "curvy", "--plugin", "curvy2", "--cases"])
    out = capsys.readouterr().out
    assert code == 1
    header, *rows = out.split("\n\n")[0].splitlines()
    assert header.split()[-1] == "RESULT"   # the table is the vjp's (its errors too): the same columns as before
    table = {row.split()[0]: row for row in rows}
    assert table["curvy.cube"].endswith("passed") and table["curvy.plain"].endswith("passed")
    assert table["curvy2.bad"].endswith("FAILED")
    lines = out.splitlines()
    assert any(line.startswith("  second order: float64[2, 3]; k=") and line.endswith("passed (max abs error "
               + line.split("max abs error ")[-1]) for line in lines)
    assert any(line.startswith("  jvp: float64[2, 3]; k=") for line in lines)
    assert any(line.startswith("  second order: float64[2, 3]; k=") and ": FAILED: input 0 at (" in line
               and "vjp_graph's gradient gives" in line for line in lines)
    assert "  first order only: no vjp_graph or jvp_graph (second derivatives and JVPs through it are MISSING_RULE)" \
        in lines
    assert "FAILED plugin 'curvy2' (distribution chainrule-curvy2 1.0): operator curvy2.bad: second order: input 0" in out
    assert out.rstrip().endswith("3 operators: 2 passed, 1 failed, 0 exempt (gradcheck=False); symbolic rules checked "
                                 "for 2 (second order, jvp); first order only (no symbolic rules): curvy.plain")

    code = main(["check", "--plugin", "curvy", "--json"])
    rows = {row["op"]: row for row in json.loads(capsys.readouterr().out)}
    assert code == 0 and rows["curvy.cube"]["derivatives"] == "second order, jvp"
    assert rows["curvy.plain"]["derivatives"] == "first order only"
    assert [c["kind"] for c in rows["curvy.cube"]["cases"]].count("second order") == 3
    assert all(c["result"] == "passed" for c in rows["curvy.cube"]["cases"])


def test_verdicts_with_symbolic_cases_are_cached_and_the_format_is_bumped(tmp_path):
    assert CheckCache.FORMAT == 3
    cache = CheckCache(tmp_path / "checks.json")
    verdicts = check_registry(CURVY, plugins=["curvy"])
    for verdict in verdicts:
        cache.put(verdict)
    cache.save()
    again = CheckCache(tmp_path / "checks.json")
    for verdict in verdicts:
        assert again.get(CURVY[verdict.op]) == verdict
    # a cache of the previous format is dropped whole: its verdicts never checked the symbolic rules
    data = json.loads((tmp_path / "checks.json").read_text())
    (tmp_path / "checks.json").write_text(json.dumps({**data, "format": 2}))
    assert CheckCache(tmp_path / "checks.json").get(CURVY["curvy.cube"]) is None


# --- every built-in operator ------------------------------------------------------------------------

#: Built-in operators whose symbolic rules the checker finds wrong on their own sample cases; each a bug in
#: a built-in family (not in the checker), to fix there and then remove from this list (strict xfail).
KNOWN_BROKEN: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(op.name, marks=pytest.mark.xfail(reason=KNOWN_BROKEN[op.name], strict=True))
    if op.name in KNOWN_BROKEN else op.name for op in BUILTINS])
def test_every_builtin_operator_passes_the_symbolic_checks(name):
    op = BUILTINS[name]
    reports = check_symbolic(op, registry=BUILTINS)
    failed = [r for r in reports if not r.passed]
    assert not failed, "\n".join(r.failure_message() for r in failed)
    if op.gradcheck and op.vjp_graph is not None and any(r.kind == "second order" for r in reports):
        assert all(c.checked for r in reports for c in r.inputs if c.dtype.startswith("float"))


def test_the_symbolic_checks_of_every_builtin_operator_take_well_under_twenty_seconds():
    started = time.perf_counter()
    kinds = {kind: 0 for kind in SYMBOLIC_KINDS}
    for op in BUILTINS:
        for report in check_symbolic(op, registry=BUILTINS):
            kinds[report.kind] += 1
    elapsed = time.perf_counter() - started
    assert elapsed < 20, f"{elapsed:.1f} s"
    assert kinds["second order"] > 150 and kinds["jvp"] > 150, kinds
    # every built-in operator has both rules (the issue asks it of every one)
    assert [op.name for op in BUILTINS if derivatives_text(op) != "second order, jvp"] == []


def test_rules_using_their_plugins_other_operators_are_checked_against_the_loaded_registry():
    """check_registry, check_and_refuse (chainrule serve) and check_op(registry=) compile the derived graphs
    against the loaded operators plus the built-in ones; without them a plugin helper is unknown."""
    import logging

    from chainrule.core import OpDef
    from chainrule.plugins.checking import check_and_refuse

    helper = OpDef("curvy2.square3", 1, lambda x: 3.0 * x * x, lambda g, out, x: (6.0 * g * x,),
                   vjp_graph=lambda b, g, out, x: (g * x * 6.0,), jvp_graph=lambda b, tangents, out, x: tangents[0] * x * 6.0)
    uses = replace(CURVY["curvy.cube"], name="curvy2.cube",
                   vjp_graph=lambda b, g, out, x, *, k: (g * b.op("curvy2.square3", x) * k,),
                   jvp_graph=lambda b, tangents, out, x, *, k: tangents[0] * b.op("curvy2.square3", x) * k)
    both = loaded(helper, uses)
    assert {c.op: c.passed for c in check_registry(both.registry, plugins=["curvy2"])} == \
        {"curvy2.cube": True, "curvy2.square3": True}
    kept, verdicts = check_and_refuse(both, logging.getLogger("test"), builtins=False)
    assert all(v.passed for v in verdicts) and "curvy2.cube" in kept.registry
    alone = check_op(both.registry["curvy2.cube"])
    assert not alone.passed and "needs operator 'curvy2.square3', which this server does not load" in alone.message
    # a wrong rule is refused at start-up, as a wrong vjp is
    wrong = loaded(replace(helper, vjp_graph=lambda b, g, out, x: (g * x * 3.0,)), uses)
    kept, verdicts = check_and_refuse(wrong, logging.getLogger("test"), builtins=False)
    assert {v.op for v in verdicts if not v.passed} == {"curvy2.square3", "curvy2.cube"}
    assert "curvy2.square3" not in kept.registry and "curvy2.square3" in kept.refused


def test_an_opdef_field_given_as_a_keyword_points_at_the_decorator():
    with pytest.raises(InvalidOperatorError, match=r"'vjp_graph' is an OpDef field, not an attribute name \(declare "
                                                   r"the symbolic gradient rule with the @<operator>.vjp_graph decorator\)"):
        OperatorSet().operator("t.f", vjp_graph=None)
