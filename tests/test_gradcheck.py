"""The gradient checker plugin authors use: it must catch wrong rules and pass right ones."""
from __future__ import annotations

import re

import numpy as np
import pytest

from chainrule.core import Attr, OpDef, TensorSpec
from chainrule.plugins import OperatorSet, broadcast_inputs, same_as_input
from chainrule.plugins.builtin import select
from chainrule.plugins.testing import (
    DEFAULT_SHAPES, SAMPLES_PER_OPERATOR, GradCheckReport, GradientCheckError, assert_vjp, check_operator,
    check_vjp, gradient_exemption, sample_inputs,
)

RNG = np.random.default_rng(42)
X = RNG.standard_normal((2, 3))
Y = RNG.standard_normal((2, 3))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def swish(sign: float = 1.0, name: str = "acme.swish") -> OpDef:
    """x * sigmoid(beta x); ``sign=-1`` flips the gradient."""
    return OpDef(
        name, 1,
        lambda x, *, beta: x * _sigmoid(beta * x),
        lambda g, out, x, *, beta: (sign * g * (_sigmoid(beta * x) + beta * out * (1 - _sigmoid(beta * x))),),
        same_as_input, attrs={"beta": Attr("float", 1.0)}, doc="Swish.",
    )


def mul(wrong_at: tuple[int, ...] | None = None) -> OpDef:
    """x * y, with the gradient for y off by one at one position if asked."""
    def vjp(g, out, x, y):
        dy = g * x
        if wrong_at is not None:
            dy = dy.copy()
            dy[wrong_at] += 1.0
        return g * y, dy

    return OpDef("acme.mul", 2, np.multiply, vjp, broadcast_inputs, doc="x * y.")


# --- right and wrong rules -----------------------------------------------------------------------

def test_a_right_vjp_passes():
    report = assert_vjp(swish(), [X], {"beta": 1.5})
    assert report.passed and isinstance(report, GradCheckReport)
    (only,) = report.inputs
    assert only.checked and only.max_abs_error < 1e-8 and only.position is not None


def test_a_sign_flipped_vjp_is_caught_naming_the_input_and_position():
    report = check_vjp(swish(sign=-1.0), [X])
    assert not report.passed
    worst = report.inputs[0]
    assert worst.analytic == pytest.approx(-worst.numeric, rel=1e-6)
    with pytest.raises(GradientCheckError) as info:
        assert_vjp(swish(sign=-1.0), [X])
    message = str(info.value)
    pattern = (r"^acme\.swish: input 0 at \((\d), (\d)\): vjp gives (-?[\d.e+-]+), "
               r"finite differences give (-?[\d.e+-]+) \(abs error [\d.e+-]+\)$")
    match = re.match(pattern, message)
    assert match, message
    assert (int(match[1]), int(match[2])) == worst.position
    assert float(match[3]) == pytest.approx(-float(match[4]), rel=1e-4)
    assert isinstance(info.value, AssertionError) and info.value.report is not None


def test_a_wrong_element_of_a_second_input_is_pinpointed():
    with pytest.raises(GradientCheckError, match=r"acme\.mul: input 1 at \(1, 2\): "):
        assert_vjp(mul(wrong_at=(1, 2)), [X, Y])
    report = check_vjp(mul(wrong_at=(1, 2)), [X, Y])
    first, second = report.inputs
    assert first.passed and not second.passed
    assert second.max_abs_error == pytest.approx(1.0, rel=1e-6)


def test_describe_has_a_line_per_input():
    text = str(check_vjp(mul(wrong_at=(0, 0)), [X, Y]))
    lines = text.splitlines()
    assert lines[0].startswith("acme.mul (sample case): FAILED")
    assert lines[1].strip().startswith("input 0 float64[2, 3]: ok")
    assert lines[2].strip().startswith("input 1 float64[2, 3]: FAILED") and "(0, 0)" in lines[2]
    assert check_vjp(mul(), [X, Y]).describe() == str(check_vjp(mul(), [X, Y]))


# --- any output shape, broadcasting ---------------------------------------------------------------

def test_non_scalar_outputs_are_checked_through_a_random_cotangent():
    outer = OpDef("acme.outer", 2, np.multiply.outer,
                  lambda g, out, a, b: (g @ b, a @ g),
                  lambda a, b: TensorSpec(a.shape + b.shape, a.dtype), doc="Outer product.")
    report = assert_vjp(outer, [RNG.standard_normal(3), RNG.standard_normal(4)])
    assert report.output_shape == (3, 4)
    transposed_wrong = OpDef("acme.outer", 2, np.multiply.outer,
                             lambda g, out, a, b: (g @ b, g[0] * a.sum()), doc="Outer product, broken.")
    assert not check_vjp(transposed_wrong, [RNG.standard_normal(3), RNG.standard_normal(4)]).passed


def test_broadcast_shaped_gradients_are_summed_back_like_the_engine_does():
    add = OpDef("acme.add", 2, np.add, lambda g, out, x, y: (g, g), broadcast_inputs, doc="x + y.")
    report = assert_vjp(add, [X, RNG.standard_normal(3)])
    assert [c.shape for c in report.inputs] == [(2, 3), (3,)]


def test_a_gradient_that_cannot_fit_its_input_is_a_failure_not_a_crash():
    bad = OpDef("acme.bad", 1, np.exp, lambda g, out, x: (np.ones(5),), same_as_input, doc="Bad.")
    report = check_vjp(bad, [X])
    assert not report.passed and "bad gradient" in report.inputs[0].problem
    with pytest.raises(GradientCheckError, match="acme.bad: input 0: vjp gave a bad gradient"):
        assert_vjp(bad, [X])


def test_scalar_inputs_and_outputs():
    square = OpDef("acme.square", 1, np.square, lambda g, out, x: (2 * g * x,), same_as_input, doc="x².")
    report = assert_vjp(square, [np.array(1.5)])
    v = float(np.random.default_rng(0).standard_normal(()))  # the cotangent the checker draws (seed 0)
    assert report.inputs[0].position == () and report.inputs[0].analytic == pytest.approx(3.0 * v)


# --- None gradients, integer inputs, contract problems ------------------------------------------------

def test_none_for_a_float_input_is_compared_as_zeros():
    forgot = OpDef("acme.forgot", 2, np.multiply, lambda g, out, x, y: (g * y, None), broadcast_inputs, doc="x * y.")
    with pytest.raises(GradientCheckError, match="input 1 at .*vjp gives 0,"):
        assert_vjp(forgot, [X, Y])
    ignores_y = OpDef("acme.first", 2, lambda x, y: x * 1.0, lambda g, out, x, y: (g, None), doc="x.")
    assert assert_vjp(ignores_y, [X, Y]).inputs[1].checked


def test_integer_inputs_are_skipped():
    take = OpDef("acme.take", 2, lambda x, i: x[i], _take_vjp, doc="x[i].")
    report = assert_vjp(take, [RNG.standard_normal(5), np.array([4, 0, 4])])
    assert report.inputs[0].checked and not report.inputs[1].checked and report.inputs[1].passed
    assert "skipped" in report.inputs[1].describe()


def _take_vjp(g, out, x, i):
    dx = np.zeros_like(x)
    np.add.at(dx, i, g)
    return dx, None


def test_wrong_number_of_gradients_is_reported():
    short = OpDef("acme.short", 2, np.add, lambda g, out, x, y: (g,), broadcast_inputs, doc="x + y.")
    with pytest.raises(GradientCheckError, match="vjp returned 1 gradients for 2 inputs"):
        assert_vjp(short, [X, Y])


def test_a_vjp_writing_into_its_arguments_is_reported():
    def vjp(g, out, x):
        g *= 2.0  # the engine shares g between consumers: this corrupts other gradients
        return (g * np.exp(x) / 2.0,)

    sloppy = OpDef("acme.sloppy", 1, np.exp, vjp, same_as_input, doc="e**x.")
    report = check_vjp(sloppy, [X])
    assert not report.passed and "wrote into its argument g" in report.problem


def test_a_forward_writing_into_its_input_is_reported():
    def forward(x):
        np.exp(x, out=x)
        return x.copy()

    report = check_vjp(OpDef("acme.inplace", 1, forward, lambda g, out, x: (g * out,), doc="e**x."), [X])
    assert "forward wrote into its argument input 0" in report.problem
    assert not report.passed


def test_selective_vjp_operators_are_asked_for_the_float_inputs():
    seen = []

    def vjp(g, out, x, i, *, needs):
        seen.append(needs)
        return (np.where(np.arange(len(x)) == i, g, 0.0) if needs[0] else None), None

    pick = OpDef("acme.pick", 2, lambda x, i: x[i], vjp, selective_vjp=True, doc="x[i].")
    assert_vjp(pick, [RNG.standard_normal(4), np.array(2)])
    assert seen == [(True, False)]


def test_infer_disagreeing_with_forward_is_reported():
    liar = OpDef("acme.liar", 1, np.exp, lambda g, out, x: (g * out,),
                 lambda x: TensorSpec(x.shape, np.dtype("float32")), doc="e**x.")
    report = check_vjp(liar, [X])
    assert not report.passed and "infer promised float32[2, 3] but forward returned float64[2, 3]" in report.problem


def test_float32_inputs_are_checked_in_float64_and_left_untouched():
    x32 = X.astype(np.float32)
    before = x32.copy()
    report = assert_vjp(swish(), [x32])
    assert report.inputs[0].dtype == "float64"
    np.testing.assert_array_equal(x32, before)


def test_attrs_are_checked_and_defaulted():
    assert assert_vjp(swish(), [X]).attrs == {"beta": 1.0}
    with pytest.raises(Exception, match="unknown attribute 'gamma'"):
        check_vjp(swish(), [X], {"gamma": 2.0})


def test_tolerances_can_be_loosened():
    off = OpDef("acme.off", 1, np.exp, lambda g, out, x: (g * out * 1.001,), same_as_input, doc="e**x, 0.1% off.")
    assert not check_vjp(off, [X]).passed
    assert assert_vjp(off, [X], rtol=1e-2, atol=1e-2).passed


# --- samples and whole-operator checks -------------------------------------------------------------

def test_sample_inputs_defaults_to_random_float64_inputs():
    cases = sample_inputs(mul(), np.random.default_rng(0))
    assert [[x.shape for x in inputs] for inputs, _ in cases] == [[s, s] for s in DEFAULT_SHAPES]
    assert all(x.dtype == np.float64 for inputs, _ in cases for x in inputs)


def test_sample_inputs_uses_the_operators_own_sample_rule():
    ops = OperatorSet()

    @ops.operator("acme.log1p")
    def log1p(x):
        "log(1 + x) for x > -1."
        return np.log1p(x)

    @log1p.vjp
    def _(g, out, x):
        return (g / (1 + x),)

    @log1p.sample
    def _(rng):
        return [rng.uniform(-0.5, 2.0, (3,))], {}

    (op,) = [draft.build() for draft in ops.drafts]
    cases = sample_inputs(op, np.random.default_rng(0))
    assert len(cases) == SAMPLES_PER_OPERATOR and all(inputs[0].min() > -1 for inputs, _ in cases)
    assert all(report.passed for report in check_operator(op))


def test_an_operator_with_a_required_attribute_needs_a_sample_rule():
    scale = OpDef("acme.scale", 1, lambda x, *, k: x * k, lambda g, out, x, *, k: (g * k,),
                  attrs={"k": Attr("float")}, doc="k x.")
    with pytest.raises(ValueError, match="attribute 'k' is required"):
        sample_inputs(scale, np.random.default_rng(0))


def test_check_operator_finds_a_wrong_rule_and_exempts_stop_gradient():
    reports = check_operator(swish(sign=-1.0))
    plain = [r for r in reports if not r.varied and r.kind != "float32"]  # besides: beta varied, a float32 case
    assert len(plain) == len(DEFAULT_SHAPES) and len(reports) == len(plain) + 2
    assert not any(r.passed for r in reports if r.kind != "float32")  # (the float32 case checks dtypes only)
    stop = next(op for op in select.OPERATORS if op.name == "stop_gradient")
    assert gradient_exemption(stop) and check_operator(stop) == []
    assert gradient_exemption(swish()) is None
