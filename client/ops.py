"""One function per built-in operator, for use on builder values.

``ops.concat([a, b], axis=0)``, ``ops.where(mask, x, y)``, ``ops.mse(pred, target)``.
Arguments may mix Vars with Python numbers and numpy arrays (they become
``const`` nodes); at least one argument must be a Var, which names the graph.
Every function takes ``name=`` for a chosen node name. Attributes left as
None are not sent, so the operator's default applies.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .builder import GraphBuilder, Var, gather_indices
from .control import scan  # noqa: F401  (ops.scan: loops without unrolling)
from .dtypes import OPERATORS as _OPERATORS, normalize


def _builder(*args: Any) -> GraphBuilder:
    for a in args:
        if isinstance(a, Var):
            return a.builder
    raise TypeError("at least one argument must be a Var from a GraphBuilder")


def op(op: str, *inputs: Any, name: str | None = None, **attrs: Any) -> Var:
    """Any operator by name, built-in or from a plugin: ``ops.op("acme.swish", x, beta=2.0)``."""
    return _builder(*inputs).op(op, *inputs, name=name, **attrs)


# --- arithmetic, with numpy broadcasting ---------------------------------------------------

def add(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("add", a, b, name=name)


def sub(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("sub", a, b, name=name)


def mul(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("mul", a, b, name=name)


def div(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("div", a, b, name=name)


def neg(x: Var, *, name: str | None = None) -> Var:
    return op("neg", x, name=name)


def pow(a: Any, b: Any, *, name: str | None = None) -> Var:  # noqa: A001 (mirrors the operator name)
    return op("pow", a, b, name=name)


def maximum(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("maximum", a, b, name=name)


def minimum(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("minimum", a, b, name=name)


# --- elementwise math -------------------------------------------------------------------------

def exp(x: Var, *, name: str | None = None) -> Var:
    return op("exp", x, name=name)


def log(x: Var, *, name: str | None = None) -> Var:
    return op("log", x, name=name)


def sqrt(x: Var, *, name: str | None = None) -> Var:
    return op("sqrt", x, name=name)


def abs(x: Var, *, name: str | None = None) -> Var:  # noqa: A001
    return op("abs", x, name=name)


def sin(x: Var, *, name: str | None = None) -> Var:
    return op("sin", x, name=name)


def cos(x: Var, *, name: str | None = None) -> Var:
    return op("cos", x, name=name)


def tanh(x: Var, *, name: str | None = None) -> Var:
    return op("tanh", x, name=name)


def sigmoid(x: Var, *, name: str | None = None) -> Var:
    return op("sigmoid", x, name=name)


def relu(x: Var, *, name: str | None = None) -> Var:
    return op("relu", x, name=name)


def leaky_relu(x: Var, alpha: float | None = None, *, name: str | None = None) -> Var:
    return op("leaky_relu", x, name=name, alpha=alpha)


def softplus(x: Var, *, name: str | None = None) -> Var:
    return op("softplus", x, name=name)


def clip(x: Var, min: float | None = None, max: float | None = None, *, name: str | None = None) -> Var:  # noqa: A002
    return op("clip", x, name=name, min=min, max=max)


# --- elementwise: erf, gelu, log1p, expm1, sign (builtin.elementwise) ------------------------------

def erf(x: Var, *, name: str | None = None) -> Var:
    """The error function, elementwise."""
    return op("erf", x, name=name)


def gelu(x: Var, approximate: str | None = None, *, name: str | None = None) -> Var:
    """x * Phi(x), Phi the standard normal CDF; ``approximate="tanh"`` for the tanh approximation."""
    return op("gelu", x, name=name, approximate=approximate)


def log1p(x: Var, *, name: str | None = None) -> Var:
    """log(1 + x), accurate for small x."""
    return op("log1p", x, name=name)


def expm1(x: Var, *, name: str | None = None) -> Var:
    """e**x - 1, accurate for small x."""
    return op("expm1", x, name=name)


def sign(x: Var, *, name: str | None = None) -> Var:
    """-1, 0 or 1 by the sign of x, as a float; its gradient is 0."""
    return op("sign", x, name=name)


# --- comparisons and logic: bool masks, no gradient (builtin.compare) -------------------------------
# ``a < b``, ``a <= b``, ``a > b``, ``a >= b``, ``m & n``, ``m | n`` and ``~m`` on Vars build these too;
# ``==`` and ``!=`` do not (Vars compare by identity, to key ``result.grad``): use equal and not_equal.

def less(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("less", a, b, name=name)


def less_equal(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("less_equal", a, b, name=name)


def greater(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("greater", a, b, name=name)


def greater_equal(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("greater_equal", a, b, name=name)


def equal(a: Any, b: Any, *, name: str | None = None) -> Var:
    """a == b elementwise, a bool mask (``==`` on Vars stays identity)."""
    return op("equal", a, b, name=name)


def not_equal(a: Any, b: Any, *, name: str | None = None) -> Var:
    """a != b elementwise, a bool mask (``!=`` on Vars stays identity)."""
    return op("not_equal", a, b, name=name)


def logical_and(a: Any, b: Any, *, name: str | None = None) -> Var:
    """Elementwise and of bool masks (inputs of another dtype are refused by the server)."""
    return op("logical_and", a, b, name=name)


def logical_or(a: Any, b: Any, *, name: str | None = None) -> Var:
    """Elementwise or of bool masks (inputs of another dtype are refused by the server)."""
    return op("logical_or", a, b, name=name)


def logical_not(x: Any, *, name: str | None = None) -> Var:
    """Elementwise not of a bool mask (an input of another dtype is refused by the server)."""
    return op("logical_not", x, name=name)


# --- linear algebra ------------------------------------------------------------------------------

def matmul(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("matmul", a, b, name=name)


def transpose(x: Var, axes: Sequence[int] | None = None, *, name: str | None = None) -> Var:
    return op("transpose", x, name=name, axes=None if axes is None else list(axes))


# --- reductions ----------------------------------------------------------------------------------

def sum(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,  # noqa: A001
        name: str | None = None) -> Var:
    return x.sum(axis, keepdims, name=name)


def mean(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> Var:
    return x.mean(axis, keepdims, name=name)


def max(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,  # noqa: A001
        name: str | None = None) -> Var:
    return x.max(axis, keepdims, name=name)


def logsumexp(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,
              name: str | None = None) -> Var:
    return x.logsumexp(axis, keepdims, name=name)


# --- reductions: min, prod, var, std, argmax, argmin (builtin.reduce) ------------------------------

def min(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,  # noqa: A001
        name: str | None = None) -> Var:
    return x.min(axis, keepdims, name=name)


def prod(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> Var:
    return x.prod(axis, keepdims, name=name)


def var(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, ddof: int | None = None, *,
        name: str | None = None) -> Var:
    """Variance over ``axis`` (all by default), divided by count - ddof (ddof 0 by default), like np.var."""
    return x.var(axis, keepdims, ddof, name=name)


def std(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, ddof: int | None = None, *,
        name: str | None = None) -> Var:
    """Standard deviation, like np.std; its gradient is 0 where it is 0."""
    return x.std(axis, keepdims, ddof, name=name)


def argmax(x: Var, axis: int | None = None, keepdims: bool = False, *, name: str | None = None) -> Var:
    """Index of the first maximum along ``axis`` (0 by default, as ONNX ArgMax), int64, no gradient."""
    return x.argmax(axis, keepdims, name=name)


def argmin(x: Var, axis: int | None = None, keepdims: bool = False, *, name: str | None = None) -> Var:
    """Index of the first minimum along ``axis`` (0 by default, as ONNX ArgMin), int64, no gradient."""
    return x.argmin(axis, keepdims, name=name)


# --- indexing: gather, embedding, one_hot (builtin.index) ------------------------------------------

def gather(x: Any, indices: Any, axis: int | None = None, *, name: str | None = None) -> Var:
    """``np.take(x, indices, axis)`` (axis 0 by default): int32/int64 indices, negative ones from the end;
    repeated indices add up their gradients. ``indices`` may be a Var, a list of ints or an int array."""
    return op("gather", x, gather_indices(indices), name=name, axis=axis)


def embedding(table: Any, ids: Any, *, name: str | None = None) -> Var:
    """Rows of ``table`` picked by integer ``ids``: ``gather`` along axis 0, result shape ids.shape + table.shape[1:]."""
    return op("gather", table, gather_indices(ids), name=name)


def one_hot(ids: Any, depth: int, dtype: Any = None, *, name: str | None = None) -> Var:
    """One-hot rows of length ``depth`` on a new last axis (ONNX OneHot): negative ids count from the end,
    ids out of range give rows of zeros. ``dtype`` float64 by default (float32, int64, int32, bool)."""
    return op("one_hot", gather_indices(ids), name=name, depth=int(depth),
              dtype=None if dtype is None else normalize(dtype))


# --- shape ---------------------------------------------------------------------------------------

def reshape(x: Var, shape: Sequence[int], *, name: str | None = None) -> Var:
    return x.reshape(tuple(shape), name=name)


def broadcast_to(x: Var, shape: Sequence[int], *, name: str | None = None) -> Var:
    return x.broadcast_to(tuple(shape), name=name)


def concat(values: Sequence[Any], axis: int | None = None, *, name: str | None = None) -> Var:
    return op("concat", *values, name=name, axis=axis)


def stack(values: Sequence[Any], axis: int | None = None, *, name: str | None = None) -> Var:
    return op("stack", *values, name=name, axis=axis)


def slice(x: Var, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int] | None = None,  # noqa: A001
          steps: Sequence[int] | None = None, *, name: str | None = None) -> Var:
    return x.slice(starts, ends, axes, steps, name=name)


def squeeze(x: Var, axis: int | Sequence[int] | None = None, *, name: str | None = None) -> Var:
    return x.squeeze(axis, name=name)


def expand_dims(x: Var, axis: int | Sequence[int], *, name: str | None = None) -> Var:
    return x.expand_dims(axis, name=name)


# --- shape: pad, tile, cumsum, flip ----------------------------------------------------------------

def pad(x: Var, pads: Sequence[int], value: float | None = None, *, name: str | None = None) -> Var:
    """Constant padding; ``pads`` in ONNX order (all begins, then all ends), negative pads crop."""
    return x.pad(pads, value, name=name)


def tile(x: Var, repeats: int | Sequence[int], *, name: str | None = None) -> Var:
    return x.tile(repeats if isinstance(repeats, int) else tuple(repeats), name=name)


def cumsum(x: Var, axis: int, exclusive: bool | None = None, reverse: bool | None = None, *,
           name: str | None = None) -> Var:
    """Running sums along ``axis``, with ONNX CumSum's ``exclusive`` and ``reverse`` flags."""
    return x.cumsum(axis, exclusive, reverse, name=name)


def flip(x: Var, axes: int | Sequence[int] | None = None, *, name: str | None = None) -> Var:
    return x.flip(axes, name=name)


# --- neural-network losses -----------------------------------------------------------------------

def softmax(x: Var, axis: int | None = None, *, name: str | None = None) -> Var:
    return x.softmax(axis, name=name)


def log_softmax(x: Var, axis: int | None = None, *, name: str | None = None) -> Var:
    return x.log_softmax(axis, name=name)


def cross_entropy(logits: Any, labels: Any, *, name: str | None = None) -> Var:
    """Mean cross-entropy of ``logits`` against integer class ``labels``."""
    return op("cross_entropy", logits, labels, name=name)


def mse(pred: Any, target: Any, *, name: str | None = None) -> Var:
    return op("mse", pred, target, name=name)


# --- layer_norm, einsum, convolution and pooling (builtin.nn, builtin.linalg, builtin.conv) -------

def _int_list(values: int | Sequence[int] | None) -> list[int] | None:
    return None if values is None else [values] if isinstance(values, int) else [int(v) for v in values]


def layer_norm(x: Any, scale: Any, bias: Any, axis: int | None = None, epsilon: float | None = None, *,
               name: str | None = None) -> Var:
    """ONNX LayerNormalization over axes ``axis``..last (default the last): scale and bias broadcast over them."""
    return op("layer_norm", x, scale, bias, name=name, axis=axis, epsilon=epsilon)


def einsum(equation: str, *xs: Any, name: str | None = None) -> Var:
    """``np.einsum`` subscripts: ``ops.einsum("ij,jk->ik", a, b)``, implicit ``"ij,jk"``, ``...``, ``"ii->"``."""
    return op("einsum", *xs, name=name, equation=equation)


def conv(x: Any, w: Any, strides: Sequence[int] | None = None, pads: Sequence[int] | None = None,
         dilations: Sequence[int] | None = None, group: int | None = None, *, name: str | None = None) -> Var:
    """ONNX Conv without bias, x [N, C, (H,) W], w [M, C/group, (KH,) KW]; pads are all begins, then all ends."""
    return op("conv", x, w, name=name, strides=_int_list(strides), pads=_int_list(pads),
              dilations=_int_list(dilations), group=group)


def max_pool(x: Any, kernel_shape: Sequence[int], strides: Sequence[int] | None = None,
             pads: Sequence[int] | None = None, *, name: str | None = None) -> Var:
    """ONNX MaxPool on NCW/NCHW (padding never wins; on ties the first maximum gets the gradient)."""
    return op("max_pool", x, name=name, kernel_shape=_int_list(kernel_shape), strides=_int_list(strides),
              pads=_int_list(pads))


def avg_pool(x: Any, kernel_shape: Sequence[int], strides: Sequence[int] | None = None,
             pads: Sequence[int] | None = None, count_include_pad: bool | None = None, *,
             name: str | None = None) -> Var:
    """ONNX AveragePool on NCW/NCHW; padding is left out of each window's count unless ``count_include_pad``."""
    return op("avg_pool", x, name=name, kernel_shape=_int_list(kernel_shape), strides=_int_list(strides),
              pads=_int_list(pads), count_include_pad=count_include_pad)


# --- selection -----------------------------------------------------------------------------------

def where(cond: Any, x: Any, y: Any, *, name: str | None = None) -> Var:
    return op("where", cond, x, y, name=name)


def stop_gradient(x: Var, *, name: str | None = None) -> Var:
    return op("stop_gradient", x, name=name)


# --- derivative helpers of builtin.shape, builtin.index and builtin.conv (docs/derivatives.md) -------

def reshape_like(x: Any, like: Any, *, name: str | None = None) -> Var:
    """x reshaped to like's shape (like's values are not read)."""
    return op("reshape_like", x, like, name=name)


def unslice(g: Any, like: Any, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int] | None = None,
            steps: Sequence[int] | None = None, *, name: str | None = None) -> Var:
    """Zeros of like's shape with g where ``slice(like, starts, ends, axes, steps)`` reads."""
    return op("unslice", g, like, name=name, starts=_int_list(starts), ends=_int_list(ends), axes=_int_list(axes),
              steps=_int_list(steps))


def untile(g: Any, like: Any, repeats: int | Sequence[int], *, name: str | None = None) -> Var:
    """g, a tiling of like's shape by ``repeats``, summed over its tiles."""
    return op("untile", g, like, name=name, repeats=_int_list(repeats))


def concat_part(g: Any, likes: Sequence[Any], part: int, axis: int | None = None, *, name: str | None = None) -> Var:
    """The part of g, a concatenation along ``axis`` of values shaped like ``likes``, that ``likes[part]`` fills."""
    return op("concat_part", g, *likes, name=name, part=int(part), axis=axis)


def scatter_add(x: Any, indices: Any, updates: Any, axis: int | None = None, *, name: str | None = None) -> Var:
    """x with ``updates`` added at ``indices`` along ``axis`` (repeated indices add up): gather's adjoint."""
    return op("scatter_add", x, gather_indices(indices), updates, name=name, axis=axis)


def one_hot_like(ids: Any, like: Any, *, name: str | None = None) -> Var:
    """one_hot(ids) with depth like's last axis, in like's dtype."""
    return op("one_hot_like", gather_indices(ids), like, name=name)


def conv_grad_x(g: Any, w: Any, like: Any, strides: Sequence[int] | None = None, pads: Sequence[int] | None = None,
                dilations: Sequence[int] | None = None, group: int | None = None, *, name: str | None = None) -> Var:
    """conv's gradient for x (like: x) with cotangent g: the transposed convolution."""
    return op("conv_grad_x", g, w, like, name=name, strides=_int_list(strides), pads=_int_list(pads),
              dilations=_int_list(dilations), group=group)


def conv_grad_w(x: Any, g: Any, like: Any, strides: Sequence[int] | None = None, pads: Sequence[int] | None = None,
                dilations: Sequence[int] | None = None, group: int | None = None, *, name: str | None = None) -> Var:
    """conv's gradient for w (like: w) with cotangent g."""
    return op("conv_grad_w", x, g, like, name=name, strides=_int_list(strides), pads=_int_list(pads),
              dilations=_int_list(dilations), group=group)


def max_pool_grad(g: Any, x: Any, kernel_shape: Sequence[int], strides: Sequence[int] | None = None,
                  pads: Sequence[int] | None = None, *, name: str | None = None) -> Var:
    """max_pool's gradient: g routed to each window's first maximum of x."""
    return op("max_pool_grad", g, x, name=name, kernel_shape=_int_list(kernel_shape), strides=_int_list(strides),
              pads=_int_list(pads))


def max_pool_pick(h: Any, x: Any, kernel_shape: Sequence[int], strides: Sequence[int] | None = None,
                  pads: Sequence[int] | None = None, *, name: str | None = None) -> Var:
    """Per window of x, h's value at the window's first maximum."""
    return op("max_pool_pick", h, x, name=name, kernel_shape=_int_list(kernel_shape), strides=_int_list(strides),
              pads=_int_list(pads))


def avg_pool_grad(g: Any, like: Any, kernel_shape: Sequence[int], strides: Sequence[int] | None = None,
                  pads: Sequence[int] | None = None, count_include_pad: bool | None = None, *,
                  name: str | None = None) -> Var:
    """avg_pool's gradient: g spread evenly over the windows of like's shape."""
    return op("avg_pool_grad", g, like, name=name, kernel_shape=_int_list(kernel_shape), strides=_int_list(strides),
              pads=_int_list(pads), count_include_pad=count_include_pad)


# --- helpers of derivatives built as graphs (builtin.derivative, docs/derivatives.md) ----------------------

def sum_to(g: Any, like: Any, *, name: str | None = None) -> Var:
    """g summed over its broadcast axes down to like's shape (like's float dtype): the unbroadcast of a gradient."""
    return op("sum_to", g, like, name=name)


def broadcast_like(x: Any, like: Any, *, name: str | None = None) -> Var:
    """x broadcast to like's shape (like's float dtype)."""
    return op("broadcast_like", x, like, name=name)


def unreduce(g: Any, like: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,
             name: str | None = None) -> Var:
    """g, a reduction of like over ``axis``, broadcast back to like's shape."""
    return op("unreduce", g, like, name=name, axis=_int_list(axis), keepdims=True if keepdims else None)


def zeros_like(x: Var, *, name: str | None = None) -> Var:
    return op("zeros_like", x, name=name)


def ones_like(x: Var, *, name: str | None = None) -> Var:
    return op("ones_like", x, name=name)


def scalar_like(x: Var, value: float = 0.0, *, name: str | None = None) -> Var:
    """The 0-d ``value`` in x's float dtype."""
    return op("scalar_like", x, name=name, value=float(value))


def group_size(x: Var, axis: int | Sequence[int] | None = None, ddof: int | None = None, *,
               name: str | None = None) -> Var:
    """The number of elements per group of a reduction of x over ``axis``, minus ``ddof``, as a 0-d float."""
    return op("group_size", x, name=name, axis=_int_list(axis), ddof=ddof)


def step(x: Any, y: Any, tie: float | None = None, *, name: str | None = None) -> Var:
    """1.0 where x > y, ``tie`` (0 by default) where x == y, else 0; no gradient."""
    return op("step", x, y, name=name, tie=tie)


def extremum_weights(x: Any, out: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,
                     name: str | None = None) -> Var:
    """Where x equals its group's max or min ``out``: 1 / the number of ties; else 0."""
    return op("extremum_weights", x, out, name=name, axis=_int_list(axis), keepdims=True if keepdims else None)


def prod_except(x: Var, axis: int | Sequence[int] | None = None, *, name: str | None = None) -> Var:
    """Per element, the product of the other elements of its group (over ``axis``), without division."""
    return op("prod_except", x, name=name, axis=_int_list(axis))


def xmul(a: Any, b: Any, *, name: str | None = None) -> Var:
    """a * b, and 0 where a == 0 whatever b."""
    return op("xmul", a, b, name=name)


# --- derivatives inside a graph (the server expands them when it compiles; docs/derivatives.md) -------------
# Not operators (they are not in __all__, which lists one function per operator): GraphBuilder.grad and
# these helpers build ``grad`` and ``jvp`` nodes.

#: ops.hessian refuses inputs of more elements than this (a Hessian of n elements costs n HVPs).
HESSIAN_LIMIT = 256


def grad(f: Var, wrt: Sequence[Var] | Var, seed: Any = None, *, name: str | None = None) -> list[Var]:
    """``f.builder.grad(f, wrt, seed)``: symbolic gradients of f, one Var per wrt value."""
    return f.builder.grad(f, wrt, seed, name=name)


def jvp(f: Var, wrt: Sequence[Var] | Var, tangents: Sequence[Any] | Any, *, name: str | None = None) -> Var:
    """The Jacobian-vector product of f along ``tangents`` (one per wrt value, of its shape), in one
    forward pass: a ``jvp`` node."""
    values = [wrt] if isinstance(wrt, Var) else list(wrt)
    given = [tangents] if isinstance(wrt, Var) else list(tangents)
    if not values or len(given) != len(values):
        raise ValueError(f"jvp takes one tangent per wrt value: {len(values)} values, {len(given)} tangents")
    return f.builder.op("jvp", f, *values, *given, name=name)


def hvp(f: Var, wrt: Sequence[Var] | Var, vectors: Sequence[Any] | Any, *, name: str | None = None) -> list[Var]:
    """Hessian-vector products of a scalar f: the gradient of sum_i sum(grad_i * v_i), one Var per wrt value."""
    values = [wrt] if isinstance(wrt, Var) else list(wrt)
    given = [vectors] if isinstance(wrt, Var) else list(vectors)
    if not values or len(given) != len(values):
        raise ValueError(f"hvp takes one vector per wrt value: {len(values)} values, {len(given)} vectors")
    grads = f.builder.grad(f, values)
    total = None
    for g, v in zip(grads, given):
        term = sum(g * v)  # ops.sum
        total = term if total is None else total + term
    return f.builder.grad(total, values, name=name)


def hessian(f: Var, x: Var, *, shape: Sequence[int] | None = None, limit: int = HESSIAN_LIMIT,
            name: str | None = None) -> Var:
    """The Hessian of a scalar f with respect to x, of shape x.shape + x.shape, built from one HVP per element
    of x (one-hot vectors). ``shape`` gives x's shape when x is not a declared input. ValueError when x has
    more than ``limit`` elements (256): use hvp instead."""
    given = shape if shape is not None else x.shape
    if given is None or any(int(n) < 0 for n in given):
        raise ValueError(f"hessian needs the static shape of {x.name} (a node's, or one with a free size); "
                         f"pass shape=(...)")
    dims = tuple(int(n) for n in given)
    size = 1
    for n in dims:
        size *= n
    if size > limit:
        raise ValueError(f"hessian of {x.name}: x has {size} elements (shape {list(dims)}), so its Hessian has "
                         f"{size * size} and costs {size} Hessian-vector products; the limit is {limit} elements "
                         f"(limit=): use ops.hvp for products with vectors")
    builder = f.builder
    (gx,) = builder.grad(f, [x])
    rows = []
    for k in range(size):
        e = np.zeros(size, dtype=x.dtype or "float64")
        e[k] = 1
        (row,) = builder.grad(sum(gx * e.reshape(dims)), [x])
        rows.append(row)
    flat = stack(rows, axis=0)
    return reshape(flat, list(dims) + list(dims), name=name)


#: One function per built-in operator of the table in chainrule.client.dtypes (const is
#: ``GraphBuilder.const``), plus ``op``; tests/test_client_operator_table.py checks each makes its operator.
__all__ = ["op", *sorted(name for name in _OPERATORS if name != "const")]
