"""pad, tile, cumsum and flip (builtin.shape): gradients, numpy / ONNX semantics, dtypes, refusals, the client.

pad is ONNX Pad in constant mode with negative pads (crops, applied after the
positive pads as ONNX's reference does); tile is np.tile with one count per
axis; cumsum is ONNX CumSum (exclusive, reverse; the input's dtype kept, bool
refused); flip is np.flip.
"""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.client import GraphBuilder, InvalidArgument, Var, ops
from chainrule.client import dtypes as client_dtypes
from chainrule.core import OpError, Registry, TensorSpec, check_attrs
from chainrule.core.errors import BadAttributeError
from chainrule.plugins.builtin import shape
from chainrule.plugins.manager import load_plugins
from chainrule.plugins.testing import assert_vjp, check_operator

NEW = ("pad", "tile", "cumsum", "flip")
OPS = {op.name: op for op in shape.OPERATORS}
DTYPES = ("float64", "float32", "int64", "int32", "bool")


def normal(shape, seed=0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape))


def run(name, x, **attrs):
    op = OPS[name]
    return op.forward(x, **check_attrs(op, attrs))


def spec_of(name, x, **attrs):
    op = OPS[name]
    return op.infer(TensorSpec.of(x), **check_attrs(op, attrs))


# --- hand-picked cases: every attribute's non-default values, size-1 axes, 0-d -------------------

CASES = [
    ("pad", (3,), {"pads": (1, 2)}),
    ("pad", (2, 3), {"pads": (0, 2, 1, 0), "value": 1.5}),
    ("pad", (2, 1, 3), {"pads": (1, 0, -1, 0, 2, -2), "value": -1.0}),
    ("pad", (4, 3), {"pads": (-1, 0, -2, 3)}),
    ("pad", (2,), {"pads": (-3, 2)}),           # the crop reaches into the end padding: all padding
    ("pad", (3, 2), {"pads": (-3, 0, 0, 0)}),   # an axis cropped to size 0
    ("pad", (1, 1), {"pads": (2, 0, 0, 3)}),
    ("pad", (), {"pads": ()}),
    ("tile", (3,), {"repeats": (2,)}),
    ("tile", (2, 1, 3), {"repeats": (1, 3, 2)}),
    ("tile", (2, 3), {"repeats": (2, 1)}),
    ("tile", (1, 1), {"repeats": (3, 2)}),
    ("tile", (2, 2), {"repeats": (0, 2)}),
    ("tile", (), {"repeats": ()}),
    *[("cumsum", shape_, {"axis": axis, **flags})
      for shape_, axis in [((5,), 0), ((2, 3, 4), -1), ((2, 3, 4), 1), ((3, 4), -2), ((1, 4), 0), ((3, 1), -1)]
      for flags in ({}, {"exclusive": True}, {"reverse": True}, {"exclusive": True, "reverse": True})],
    ("flip", (2, 3), {}),
    ("flip", (2, 3, 4), {"axes": (0, -1)}),
    ("flip", (2, 3, 4), {"axes": (-2,)}),
    ("flip", (1, 4), {"axes": (0,)}),
    ("flip", (3, 4), {"axes": ()}),
    ("flip", (5,), {"axes": (-1,)}),
    ("flip", (), {}),
]


def case_id(case):
    name, shape_, attrs = case
    return f"{name}{list(shape_)}{attrs}"


@pytest.mark.parametrize("name, shape_, attrs", CASES, ids=map(case_id, CASES))
def test_vjp_matches_finite_differences_in_float64(name, shape_, attrs):
    assert_vjp(OPS[name], [normal(shape_)], attrs)


@pytest.mark.parametrize("name, shape_, attrs", CASES, ids=map(case_id, CASES))
def test_float32_stays_float32(name, shape_, attrs):
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    x64 = normal(shape_)
    x32 = x64.astype(np.float32)
    out32 = np.asarray(op.forward(x32, **attrs))
    assert out32.dtype == np.float32
    assert spec_of(name, x32, **attrs).dtype == np.float32
    g = normal(out32.shape, seed=1)
    (dx32,) = op.vjp(g.astype(np.float32), out32, x32, **attrs)
    (dx64,) = op.vjp(g, np.asarray(op.forward(x64, **attrs)), x64, **attrs)
    assert np.asarray(dx32).dtype == np.float32 and np.shape(dx32) == shape_
    np.testing.assert_allclose(dx32, dx64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, shape_, attrs", CASES, ids=map(case_id, CASES))
def test_rules_accept_numpy_scalars_and_strided_inputs(name, shape_, attrs):
    """The engine may pass 0-d values as numpy scalars, and any value may be a strided view."""
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    x = normal(shape_)
    other = x[()] if x.ndim == 0 else np.repeat(x, 2, axis=-1)[..., ::2]
    out = np.asarray(op.forward(x, **attrs))
    np.testing.assert_array_equal(op.forward(other, **attrs), out)
    g = normal(out.shape, seed=2)
    (expected,) = op.vjp(g, out, x, **attrs)
    (got,) = op.vjp(g[()] if g.ndim == 0 else np.asfortranarray(g), out, other, **attrs)
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)  # tile's sums may take another order


@pytest.mark.parametrize("name", NEW)
def test_samples_pass_the_gradient_check(name):
    for seed in range(8):
        reports = check_operator(OPS[name], np.random.default_rng(seed))
        assert reports
        for report in reports:
            assert report.passed, str(report)


def _sampled(name, seeds=40):
    op = OPS[name]
    rng = np.random.default_rng(0)
    return [op.sample(rng) for _ in range(seeds)]


def test_samples_cover_every_attributes_non_default_values():
    pads = [(np.shape(xs[0]), a) for xs, a in _sampled("pad")]
    assert any(len(s) == 0 for s, _ in pads)                                       # 0-d
    assert any(any(n < 0 for n in a["pads"]) for _, a in pads)                     # crops
    assert any(a["pads"][: len(s)] != a["pads"][len(s):] for s, a in pads)         # asymmetric
    assert any(a.get("value", 0.0) != 0.0 for _, a in pads)
    assert any(1 in s for s, _ in pads)                                            # size-1 axis
    tiles = [(np.shape(xs[0]), a) for xs, a in _sampled("tile")]
    assert any(len(s) == 0 for s, _ in tiles) and any(1 in s for s, _ in tiles)
    assert any(0 in a["repeats"] for _, a in tiles) and any(r > 1 for _, a in tiles for r in a["repeats"])
    sums = [(np.shape(xs[0]), a) for xs, a in _sampled("cumsum")]
    assert any(a["axis"] < 0 for _, a in sums) and any(a["axis"] > 0 for _, a in sums)
    assert {(a.get("exclusive", False), a.get("reverse", False)) for _, a in sums} == {
        (False, False), (True, False), (False, True), (True, True)}
    assert any(s[a["axis"]] == 1 for s, a in sums)                                 # summing a size-1 axis
    flips = [(np.shape(xs[0]), a) for xs, a in _sampled("flip")]
    assert any("axes" not in a for _, a in flips) and any(a.get("axes") == () for _, a in flips)
    assert any(any(k < 0 for k in a.get("axes", ())) for _, a in flips)
    assert any(len(s) == 0 for s, _ in flips) and any(1 in s for s, _ in flips)


def test_the_operators_register_with_a_doc_and_an_infer_rule():
    registry = Registry(shape.OPERATORS)
    loaded = load_plugins(env={}, entry_points=False, only=["builtin.shape"]).registry
    for name in NEW:
        op = registry[name]
        assert op.infer is not None and op.sample is not None and op.gradcheck
        assert op.doc and "\n" not in op.doc and op.doc.endswith(".")
        assert loaded[name].plugin == "builtin.shape"
    assert OPS["cumsum"].attrs["axis"].required
    assert OPS["flip"].attrs["axes"].default is None
    assert OPS["pad"].attrs["value"].default == 0.0


# --- against numpy --------------------------------------------------------------------------------

def onnx_pad(x, pads, value=0.0):
    """ONNX's reference algorithm: np.pad with the positive pads, then slice the negative ones off."""
    n = x.ndim
    grown = np.pad(x, [(max(b, 0), max(e, 0)) for b, e in zip(pads[:n], pads[n:])], constant_values=value)
    return grown[tuple(slice(-min(b, 0), m + min(e, 0)) for m, b, e in zip(grown.shape, pads[:n], pads[n:]))]


@pytest.mark.parametrize("shape_, pads, value", [
    ((3,), (1, 2), 0.0), ((2, 3), (0, 2, 1, 0), 1.5), ((2, 3, 4), (1, 0, 2, 3, 1, 0), -2.0), ((), (), 5.0),
])
def test_pad_is_np_pad(shape_, pads, value):
    x = normal(shape_)
    n = x.ndim
    expected = np.pad(x, list(zip(pads[:n], pads[n:])), constant_values=value) if n else x  # np.pad takes no 0-d
    np.testing.assert_array_equal(run("pad", x, pads=pads, value=value), expected)
    assert spec_of("pad", x, pads=pads, value=value) == TensorSpec.of(expected)


@pytest.mark.parametrize("shape_, pads", [
    ((4, 3), (-1, 0, -2, 3)), ((2, 1, 3), (1, 0, -1, 0, 2, -2)), ((2,), (-3, 2)), ((3,), (2, -4)),
    ((3, 2), (-3, 0, 0, 0)), ((5,), (-2, -3)),
])
def test_negative_pads_crop_as_onnx_does(shape_, pads):
    x = normal(shape_)
    expected = onnx_pad(x, pads, 7.0)
    np.testing.assert_array_equal(run("pad", x, pads=pads, value=7.0), expected)
    assert spec_of("pad", x, pads=pads, value=7.0).shape == expected.shape


def test_pad_crop_by_hand():
    x = np.arange(5.0)
    np.testing.assert_array_equal(run("pad", x, pads=(-1, -2)), [1.0, 2.0])
    np.testing.assert_array_equal(run("pad", x, pads=(-2, 1), value=9), [2.0, 3.0, 4.0, 9.0])
    np.testing.assert_array_equal(run("pad", np.array([1.0, 2.0]), pads=(-3, 2), value=9), [9.0])


def test_pad_gradient_is_the_kept_window():
    x = np.arange(6.0).reshape(2, 3)
    out = run("pad", x, pads=(1, -1, 0, 1))                  # rows: one pad in front; cols: one cropped, one padded
    assert out.shape == (3, 3)
    g = np.arange(9.0).reshape(3, 3)
    (dx,) = OPS["pad"].vjp(g, out, x, pads=(1, -1, 0, 1), value=0.0)
    np.testing.assert_array_equal(dx, [[0.0, 3.0, 4.0], [0.0, 6.0, 7.0]])


@pytest.mark.parametrize("shape_, repeats", [((3,), (2,)), ((2, 3), (2, 1)), ((2, 1, 3), (1, 3, 2)), ((), ()),
                                             ((2, 2), (0, 3))])
def test_tile_is_np_tile(shape_, repeats):
    x = normal(shape_)
    np.testing.assert_array_equal(run("tile", x, repeats=repeats), np.tile(x, repeats))
    assert spec_of("tile", x, repeats=repeats) == TensorSpec.of(np.tile(x, repeats))


def test_tile_gradient_sums_the_tiles():
    x = np.arange(6.0).reshape(2, 3)
    out = run("tile", x, repeats=(3, 2))
    g = normal(out.shape, seed=4)
    (dx,) = OPS["tile"].vjp(g, out, x, repeats=(3, 2))
    expected = sum(g[2 * i:2 * i + 2, 3 * j:3 * j + 3] for i in range(3) for j in range(2))
    np.testing.assert_allclose(dx, expected, rtol=1e-14)


def cumsum_by_hand(x, axis, exclusive=False, reverse=False):
    """ONNX CumSum spelt out: y[j] = sum of x[i] for i <= j (i < j exclusive), i >= j (i > j) reversed."""
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    out = np.zeros_like(x)
    for j in range(n):
        if reverse:
            picked = range(j + 1, n) if exclusive else range(j, n)
        else:
            picked = range(j) if exclusive else range(j + 1)
        out[..., j] = np.sum(x[..., list(picked)], axis=-1)
    return np.moveaxis(out, -1, axis)


def test_cumsum_follows_the_onnx_examples():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(run("cumsum", x, axis=0), [1, 3, 6, 10, 15])
    np.testing.assert_array_equal(run("cumsum", x, axis=0, exclusive=True), [0, 1, 3, 6, 10])
    np.testing.assert_array_equal(run("cumsum", x, axis=0, reverse=True), [15, 14, 12, 9, 5])
    np.testing.assert_array_equal(run("cumsum", x, axis=0, exclusive=True, reverse=True), [14, 12, 9, 5, 0])
    m = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(run("cumsum", m, axis=0), [[1, 2, 3], [5, 7, 9]])
    np.testing.assert_array_equal(run("cumsum", m, axis=-1), [[1, 3, 6], [4, 9, 15]])


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape_, axis", [((5,), 0), ((2, 3, 4), 1), ((2, 3, 4), -1), ((3, 4), -2), ((1, 3), 0),
                                          ((2, 0), 1)])
def test_cumsum_against_numpy(shape_, axis, exclusive, reverse):
    x = normal(shape_)
    got = run("cumsum", x, axis=axis, exclusive=exclusive, reverse=reverse)
    np.testing.assert_allclose(got, cumsum_by_hand(x, axis, exclusive, reverse), rtol=1e-13, atol=1e-13)
    if not (exclusive or reverse):
        np.testing.assert_array_equal(got, np.cumsum(x, axis=axis))
    if reverse and not exclusive:
        np.testing.assert_array_equal(got, np.flip(np.cumsum(np.flip(x, axis), axis=axis), axis))


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_gradient_is_the_reversed_cumsum(exclusive, reverse):
    x = normal((3, 4))
    out = run("cumsum", x, axis=1, exclusive=exclusive, reverse=reverse)
    g = normal((3, 4), seed=5)
    (dx,) = OPS["cumsum"].vjp(g, out, x, axis=1, exclusive=exclusive, reverse=reverse)
    np.testing.assert_allclose(dx, cumsum_by_hand(g, 1, exclusive, not reverse), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape_, axes", [((2, 3), None), ((2, 3, 4), (0, -1)), ((2, 3, 4), (1,)), ((3,), ()),
                                          ((), None), ((1, 4), (0,))])
def test_flip_is_np_flip(shape_, axes):
    x = normal(shape_)
    given = {} if axes is None else {"axes": axes}  # (an attribute given as None is refused: left out, all axes)
    np.testing.assert_array_equal(run("flip", x, **given), np.flip(x, axes))


# --- dtypes ---------------------------------------------------------------------------------------

def ints(shape_, dtype):
    return (np.arange(int(np.prod(shape_))).reshape(shape_) % 5 - 2).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape_, attrs", CASES, ids=map(case_id, CASES))
def test_infer_gives_exactly_what_forward_returns(name, shape_, attrs, dtype):
    x = ints(shape_, dtype) if dtype != "bool" else ints(shape_, "int64") > 0
    if dtype.startswith("float"):
        x = normal(shape_).astype(dtype)
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    try:
        spec = op.infer(TensorSpec.of(x), **attrs)
    except OpError as exc:
        assert exc.reason == "DTYPE_MISMATCH", exc
        value = attrs.get("value")
        refused = {("cumsum", "bool")} | {("pad", d) for d in ("int64", "int32") if value == 1.5} | {
            ("pad", "bool") for _ in [0] if value not in (None, 0.0, 1.0)}
        assert (name, dtype) in refused, exc
        return
    out = np.asarray(op.forward(x, **attrs))
    assert TensorSpec.of(out) == TensorSpec(tuple(spec.shape), np.dtype(spec.dtype))
    assert out.dtype == x.dtype                                  # every one keeps its input's dtype


def test_integer_values():
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    out = run("cumsum", x, axis=1, exclusive=True)
    assert out.dtype == np.int32                                 # ONNX CumSum: numpy alone would give int64
    np.testing.assert_array_equal(out, [[0, 1, 3], [0, 4, 9]])
    padded = run("pad", x, pads=(0, 1, 0, 1), value=-7)
    assert padded.dtype == np.int32 and padded.tolist() == [[-7, 1, 2, 3, -7], [-7, 4, 5, 6, -7]]
    assert run("tile", x > 3, repeats=(1, 2)).tolist() == [[False] * 6, [True, True, True] * 2]
    assert run("pad", x > 3, pads=(1, 0, 0, 0), value=1).tolist() == [[True] * 3, [False] * 3, [True] * 3]
    assert run("flip", x, axes=(1,)).tolist() == [[3, 2, 1], [6, 5, 4]]


# --- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape_, dtype, attrs, message, reason, field", [
    ("pad", (2, 3), "float64", {"pads": (1, 1)}, r"pads has 2 entries; a tensor of rank 2 needs 4",
     "BAD_ATTRIBUTE", "attrs.pads"),
    ("pad", (), "float64", {"pads": (0, 0)}, "pads has 2 entries; a tensor of rank 0 needs 0",
     "BAD_ATTRIBUTE", "attrs.pads"),
    ("pad", (2, 3), "float64", {"pads": (0, -2, 0, -2)}, "pads -2 and -2 crop axis 1 of size 3 to -1 elements",
     "BAD_ATTRIBUTE", "attrs.pads"),
    ("pad", (3,), "int32", {"pads": (1, 0), "value": 0.5}, "value 0.5 does not fit a int32 tensor",
     "DTYPE_MISMATCH", "attrs.value"),
    ("pad", (3,), "int32", {"pads": (1, 0), "value": 1e10}, "does not fit a int32", "DTYPE_MISMATCH", "attrs.value"),
    ("pad", (3,), "bool", {"pads": (1, 0), "value": 2.0}, "does not fit a bool", "DTYPE_MISMATCH", "attrs.value"),
    ("tile", (2, 3), "float64", {"repeats": (2,)}, "repeats has 1 entries for a tensor of rank 2",
     "BAD_ATTRIBUTE", "attrs.repeats"),
    ("tile", (2, 3), "float64", {"repeats": (2, -1)}, r"repeats \[2, -1\]: a repeat count is >= 0",
     "BAD_ATTRIBUTE", "attrs.repeats"),
    ("cumsum", (2, 3), "float64", {"axis": 2}, "axis 2 is out of range for a tensor of rank 2",
     "BAD_ATTRIBUTE", "attrs.axis"),
    ("cumsum", (2, 3), "float64", {"axis": -3}, "axis -3 is out of range for a tensor of rank 2",
     "BAD_ATTRIBUTE", "attrs.axis"),
    ("cumsum", (), "float64", {"axis": 0}, "axis 0 is out of range for a tensor of rank 0",
     "BAD_ATTRIBUTE", "attrs.axis"),
    ("cumsum", (3,), "bool", {"axis": 0}, "cumsum of a bool tensor", "DTYPE_MISMATCH", None),
    ("flip", (2, 3), "float64", {"axes": (2,)}, "axis 2 is out of range for a tensor of rank 2",
     "BAD_ATTRIBUTE", "attrs.axes"),
    ("flip", (2, 3), "float64", {"axes": (1, -1)}, "axis -1 is given twice", "BAD_ATTRIBUTE", "attrs.axes"),
    ("flip", (), "float64", {"axes": (0,)}, "out of range for a tensor of rank 0", "BAD_ATTRIBUTE", "attrs.axes"),
])
def test_infer_refuses_bad_attributes(name, shape_, dtype, attrs, message, reason, field):
    op = OPS[name]
    with pytest.raises(OpError, match=message) as info:
        op.infer(TensorSpec(shape_, np.dtype(dtype)), **check_attrs(op, attrs))
    assert info.value.reason == reason
    assert info.value.field == field


def test_forward_refuses_what_infer_refuses():
    with pytest.raises(OpError, match="pads has 1 entries"):
        run("pad", np.zeros(3), pads=(1,))
    with pytest.raises(OpError, match="axis 1 is out of range"):
        run("cumsum", np.zeros(3), axis=1)
    with pytest.raises(OpError, match="axis 1 is out of range"):
        run("flip", np.zeros(3), axes=(1,))


def test_the_schema_refuses_missing_and_mistyped_attributes():
    with pytest.raises(BadAttributeError, match="missing required attribute 'axis'") as info:
        check_attrs(OPS["cumsum"], {})
    assert info.value.field == "attrs.axis"
    with pytest.raises(BadAttributeError, match="missing required attribute 'pads'"):
        check_attrs(OPS["pad"], {})
    with pytest.raises(BadAttributeError, match="missing required attribute 'repeats'"):
        check_attrs(OPS["tile"], {})
    with pytest.raises(BadAttributeError, match="attribute 'exclusive': expected a bool"):
        check_attrs(OPS["cumsum"], {"axis": 0, "exclusive": 1})


# --- the client -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_the_builder_keeps_the_input_dtype(dtype):
    g = GraphBuilder()
    x = g.input("x", (2, 3), dtype)
    made = [ops.pad(x, [0, 1, 1, 0], value=0), ops.tile(x, [2, 1]), ops.cumsum(x, -1, exclusive=True),
            ops.flip(x), ops.flip(x, 0), x.pad([1, 1, 1, 1]), x.tile(1, 2), x.tile((2, 2)), x.cumsum(0),
            x.flip([0, -1])]
    for var, name in zip(made, ["pad", "tile", "cumsum", "flip", "flip", "pad", "tile", "tile", "cumsum", "flip"]):
        assert isinstance(var, Var) and var.op == name and var.dtype == dtype
    for name in NEW:
        assert client_dtypes.OPERATORS[name].arity == 1
        assert name in ops.__all__


def test_the_builder_sends_the_attributes_given():
    g = GraphBuilder()
    x = g.input("x", (2, 3))
    assert set(ops.cumsum(x, 1).attrs) == {"axis"}
    assert set(ops.cumsum(x, 1, exclusive=True, reverse=False).attrs) == {"axis", "exclusive", "reverse"}
    assert set(ops.flip(x).attrs) == set() and set(ops.pad(x, [0] * 4).attrs) == {"pads"}
    assert ops.pad(x, [0] * 4, value=2).attrs["value"].f == 2.0
    assert list(ops.tile(x, 3).attrs["repeats"].ints.values) == [3]


def test_end_to_end_through_a_local_server():
    from chainrule.server import LocalClient

    pads, repeats = (1, -1, 0, 2), (1, 2)
    xv = normal((3, 4))
    wv = normal((4, 10), seed=9)

    def reference(x):
        p = onnx_pad(x, pads, 0.5)                                              # (4, 5)
        t = np.tile(p, repeats)                                                 # (4, 10)
        c = cumsum_by_hand(t, -1, exclusive=True, reverse=True)
        return float(np.sum(wv * np.flip(c, 0)))

    g = GraphBuilder()
    x = g.input("x", (3, 4))
    w = g.input("w", (4, 10))
    f = (ops.cumsum(ops.tile(ops.pad(x, pads, value=0.5), repeats), -1, exclusive=True, reverse=True).flip(0)
         * w).sum(name="f")
    scalar = g.input("s")
    s = (scalar.pad([]).tile([]).flip() * 3.0).named("s3")
    with LocalClient() as client:
        result = client.evaluate(f, x=xv, w=wv)
        result_s = client.evaluate(s, s=2.0)
        with pytest.raises(InvalidArgument) as info:
            client.evaluate(ops.pad(x, [1, 1], name="bad").sum(name="loss"), x=xv)
    assert result.value == pytest.approx(reference(xv), rel=1e-12)
    # f is linear in x: its gradient is the finite difference at any step
    expected = np.zeros_like(xv)
    for i in np.ndindex(xv.shape):
        e = np.zeros_like(xv)
        e[i] = 1.0
        expected[i] = (reference(xv + e) - reference(xv - e)) / 2
    np.testing.assert_allclose(result.grad[x], expected, rtol=1e-9, atol=1e-9)
    assert float(result_s.value) == 6.0 and float(result_s.grad[scalar]) == 3.0
    error = info.value
    assert (error.reason, error.node, error.op) == ("BAD_ATTRIBUTE", "bad", "pad")
    assert "pads has 2 entries" in error.message and "pads" in (error.field or "")


def test_pad_takes_infinite_padding_values():
    from chainrule.server import LocalClient
    from chainrule.client import GraphBuilder

    g = GraphBuilder()
    x = g.input("x", (3,))
    r = LocalClient().evaluate(x.pad([1, 1], value=-np.inf).named("p"), x=[1.0, 2.0, 3.0], seed=np.ones(5),
                               values=["p"])
    np.testing.assert_array_equal(r.values["p"], [-np.inf, 1.0, 2.0, 3.0, -np.inf])
