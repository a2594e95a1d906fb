"""Integer overflow is refused (OUT_OF_RANGE, naming the node), not wrapped as numpy does."""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.client import GraphBuilder, InvalidArgument
from chainrule.core import OpError
from chainrule.plugins.builtin import arith, reduce, shape
from chainrule.server import LocalClient

OPS = {op.name: op for op in arith.OPERATORS + reduce.OPERATORS + shape.OPERATORS}
I64 = np.iinfo(np.int64)
I32 = np.iinfo(np.int32)


def refused(name, *xs, **attrs):
    with pytest.raises(OpError, match=f"{name} overflows") as info:
        OPS[name].forward(*xs, **attrs)
    assert info.value.reason == "OUT_OF_RANGE"


def a(*v, dtype=np.int64):
    return np.array(v, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_elementwise_overflow_is_refused(dtype):
    info = np.iinfo(dtype)
    refused("add", a(1, info.max, dtype=dtype), a(1, 1, dtype=dtype))
    refused("add", a(info.min, dtype=dtype), a(-1, dtype=dtype))
    refused("sub", a(info.min, dtype=dtype), a(1, dtype=dtype))
    refused("sub", a(info.max, dtype=dtype), a(-1, dtype=dtype))
    refused("neg", a(0, info.min, dtype=dtype))
    refused("mul", a(info.max // 2 + 1, dtype=dtype), a(2, dtype=dtype))
    refused("mul", a(info.min, dtype=dtype), a(-1, dtype=dtype))
    refused("pow", a(2, dtype=dtype), a(info.bits - 1, dtype=dtype))
    refused("pow", a(3, dtype=dtype), a(10 ** 6, dtype=dtype))


def test_results_at_the_edges_of_the_range_are_kept():
    assert OPS["add"].forward(a(I64.max - 1), a(1))[0] == I64.max
    assert OPS["sub"].forward(a(I64.min + 1), a(1))[0] == I64.min
    assert OPS["mul"].forward(a(2 ** 31), a(-(2 ** 32)))[0] == I64.min      # exactly min: fits
    assert OPS["mul"].forward(a(3037000499), a(3037000499))[0] == 3037000499 ** 2
    assert OPS["pow"].forward(np.array(-2), np.array(63)) == I64.min
    assert OPS["pow"].forward(np.array(3), np.array(39)) == 3 ** 39
    assert OPS["pow"].forward(np.array(-1), np.array(10 ** 12 + 1)) == -1
    assert OPS["neg"].forward(a(I64.max))[0] == -I64.max
    assert OPS["sum"].forward(a(I64.max, I64.max, -I64.max)) == I64.max    # wraps twice, fits
    assert OPS["prod"].forward(a(2 ** 40, 2 ** 40, 0)) == 0
    assert OPS["prod"].forward(a(*[3] * 39)) == 3 ** 39


def test_reductions_refuse_overflow_per_group():
    refused("sum", a(I64.max, I64.max))
    refused("sum", np.array([[I64.max, 1], [1, 1]]), axis=[1])
    refused("sum", np.array([[I64.max, 1], [1, 1]]), axis=[0], keepdims=True)
    refused("prod", a(*[3] * 40))
    refused("prod", np.array([[2 ** 40, 2], [2 ** 40, 2 ** 30]]), axis=[1])
    # int32 sums widen to int64, as numpy's: no overflow there
    assert OPS["sum"].forward(a(I32.max, 1, dtype=np.int32)) == 2 ** 31


def test_running_sums_refuse_overflow_but_keep_what_fits():
    refused("cumsum", a(I64.max, 1, -5), axis=0)  # the second partial sum leaves the range
    refused("cumsum", a(1, 1, I32.max, dtype=np.int32), axis=0, reverse=True)
    refused("cumsum", np.array([[1, I64.max], [I64.max, 1]]), axis=1)
    kept = OPS["cumsum"].forward(a(I64.max, -I64.max, I64.max), axis=0)  # every partial sum fits
    assert kept.tolist() == [I64.max, 0, I64.max]
    assert OPS["cumsum"].forward(a(I32.max, I32.min, dtype=np.int32), axis=0, exclusive=True).tolist() == [0, I32.max]


def test_floats_are_not_checked():
    big = np.array([1e308, 1e308])
    with np.errstate(over="ignore"):
        assert np.isinf(OPS["add"].forward(big, big)).all()
        assert np.isinf(OPS["mul"].forward(big, big)).all()
        assert np.isinf(OPS["sum"].forward(big))
        assert np.isinf(OPS["pow"].forward(np.array(10.0), np.array(400.0)))


def test_overflow_through_the_service_names_the_node():
    g = GraphBuilder()
    x = g.input("x", (2,), "int64")
    total = x.sum(name="total")
    with LocalClient() as c:
        with pytest.raises(InvalidArgument) as info:
            c.evaluate(total, x=np.array([I64.max, I64.max]))
        assert info.value.reason == "OUT_OF_RANGE"
        assert "total" in info.value.message and "overflows int64" in info.value.message
        assert c.evaluate(total, grads="none", x=np.array([I64.max, -1])).value == I64.max - 1


def test_empty_and_zero_d_integer_values():
    e = np.zeros((0,), np.int64)
    for name in ("add", "sub", "mul", "pow"):
        assert OPS[name].forward(e, e).shape == (0,)
    assert OPS["neg"].forward(e).shape == (0,)
    assert OPS["sum"].forward(e) == 0 and OPS["prod"].forward(e) == 1
    assert OPS["add"].forward(np.array(2), np.array(3)) == 5
    with np.errstate(over="ignore"):
        refused("add", np.array(I64.max), np.array(1))
        refused("sub", np.int64(I64.min), np.int64(1))
