"""conv forward + backward: chainrule's builtin conv against a hand-written numpy im2col and PyTorch.

The case: batch 32, 3 -> 16 channels, 32x32, 3x3 kernel, stride 1, pad 1 (a first
conv layer), in float64 (chainrule's default) and float32. Each contender computes
the output and the gradients of x and w for one upstream gradient g:

* ``chainrule``: ``conv``'s forward rule, then its vjp asked for both gradients
  (what the engine does for a layer whose input also needs a gradient); and the
  vjp asked for dw only (``needs=(False, True)``: a first layer fed with data);
* ``numpy im2col``: a hand-written im2col + matmul forward and matmul / col2im
  backward in one function, reusing the forward's columns (it keeps them between
  the passes, which the operator deliberately does not);
* ``torch``: ``torch.nn.functional.conv2d`` forward and autograd backward, if
  PyTorch is importable (with its default thread count).

Timings are the best of ``--repeat`` rounds of ``--number`` calls each, the rounds of
the contenders interleaved (the machine may be shared: the best round is the least
disturbed, and a burst of load hits every contender alike). The minor page faults per
call are shown too: on a machine that returns freed memory to the kernel eagerly,
mapping fresh pages can cost more than the arithmetic, and it depends on each
contender's allocations (the operator reuses one bounded workspace). Not a test: run it by hand::

    python benchmarks/conv_bench.py [--repeat 15] [--number 5]
"""
from __future__ import annotations

import argparse
import timeit

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from chainrule.core import check_attrs
from chainrule.plugins.builtin.conv import OPERATORS

CONV = next(op for op in OPERATORS if op.name == "conv")
SHAPE_X, SHAPE_W, PAD = (32, 3, 32, 32), (16, 3, 3, 3), 1
ATTRS = check_attrs(CONV, {"strides": (1, 1), "pads": (PAD,) * 4, "dilations": (1, 1), "group": 1})


def ours(x, w, g):
    out = CONV.forward(x, w, **ATTRS)
    dx, dw = CONV.vjp(g, out, x, w, needs=(True, True), **ATTRS)
    return out, dx, dw


def ours_dw_only(x, w, g):
    out = CONV.forward(x, w, **ATTRS)
    _, dw = CONV.vjp(g, out, x, w, needs=(False, True), **ATTRS)
    return out, None, dw


def numpy_im2col(x, w, g, pad=PAD):
    """The textbook version: pad, im2col with sliding_window_view, matmul; backward reuses the columns."""
    n, c, h, wd = x.shape
    m, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    cols = sliding_window_view(xp, (kh, kw), axis=(2, 3)).transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)
    wm = w.reshape(m, -1)
    out = np.matmul(wm, cols).reshape(n, m, oh, ow)
    g2 = g.reshape(n, m, oh * ow)
    dw = np.matmul(g2, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
    dcols = np.matmul(wm.T, g2).reshape(n, c, kh, kw, oh, ow)
    dxp = np.zeros_like(xp)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + oh, j:j + ow] += dcols[:, :, i, j]
    return out, dxp[:, :, pad:pad + h, pad:pad + wd], dw


def torch_conv(torch):
    def run(xt, wt, gt):
        xt.grad = wt.grad = None
        out = torch.nn.functional.conv2d(xt, wt, padding=PAD)
        out.backward(gt)
        return out, xt.grad, wt.grad
    return run


def page_faults_per_call(fn, args, calls: int = 5) -> float | None:
    """Minor page faults per call (fresh memory the kernel had to map), where the platform says."""
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn(*args)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def best_of(contenders: list[tuple[str, object, tuple]], repeat: int, number: int) -> list[tuple[str, float]]:
    """Best time per call of each contender; the rounds are interleaved (A B C, A B C, ...) so
    that a burst of load from other work on the machine hits every contender alike."""
    for _, fn, args in contenders:
        fn(*args)  # warm up
    times: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    for _ in range(repeat):
        for label, fn, args in contenders:
            times[label].append(timeit.timeit(lambda: fn(*args), number=number) / number)
    return [(label, min(times[label])) for label, _, _ in contenders]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--number", type=int, default=5)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    print(f"conv forward+backward, x {list(SHAPE_X)}, w {list(SHAPE_W)}, stride 1, pad {PAD}; "
          f"best of {args.repeat} rounds x {args.number} calls")
    if torch is not None:
        print(f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    for dtype in (np.float64, np.float32):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(SHAPE_X).astype(dtype)
        w = rng.standard_normal(SHAPE_W).astype(dtype)
        g = rng.standard_normal((SHAPE_X[0], SHAPE_W[0], 32, 32)).astype(dtype)
        mine, reference = ours(x, w, g), numpy_im2col(x, w, g)
        tol = 1e-10 if dtype == np.float64 else 1e-3
        for a, b in zip(mine, reference):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        contenders = [("chainrule conv", ours, (x, w, g)),
                      ("chainrule conv, dw only", ours_dw_only, (x, w, g)),
                      ("numpy im2col by hand", numpy_im2col, (x, w, g))]
        if torch is not None:
            xt = torch.tensor(x, requires_grad=True)
            wt = torch.tensor(w, requires_grad=True)
            gt = torch.tensor(g)
            out, dx, dw = torch_conv(torch)(xt, wt, gt)
            for a, b in zip(mine, (out, dx, dw)):
                np.testing.assert_allclose(a, b.detach().numpy(), rtol=tol, atol=tol)
            contenders.append(("torch conv2d + autograd", torch_conv(torch), (xt, wt, gt)))
        rows = best_of(contenders, args.repeat, args.number)
        faults = {label: page_faults_per_call(fn, fargs) for label, fn, fargs in contenders}
        base = rows[0][1]
        print(f"\n{np.dtype(dtype).name}:")
        for label, seconds in rows:
            ratio = "" if label.startswith("chainrule conv") else f"chainrule / this = {base / seconds:.2f}x"
            fault = "" if faults[label] is None else f"{faults[label]:7.0f} page faults/call"
            print(f"  {label:<26} {seconds * 1e3:8.2f} ms  {fault}   {ratio}")


if __name__ == "__main__":
    main()
