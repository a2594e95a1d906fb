"""Checks every operator rule must pass, shared by the operator test files (one copy of each)."""
from __future__ import annotations

from typing import Any

import numpy as np

from chainrule.core import OpDef


def assert_accepts_numpy_scalars(op: OpDef, arrays: list[np.ndarray], attrs: dict[str, Any]) -> None:
    """The engine keeps 0-d results as numpy scalars (np.float64) and may pass g as one: the rules
    must give the same answers for them as for 0-d arrays."""
    scalars = [x[()] if x.ndim == 0 else x for x in arrays]
    with np.errstate(all="ignore"):
        out, saved = op.apply(*arrays, **attrs)
        out = np.asarray(out)
        scalar_out, scalar_saved = op.apply(*scalars, **attrs)
        np.testing.assert_array_equal(scalar_out, out)
        g = np.random.default_rng(3).standard_normal(out.shape)
        expected = op.apply_vjp(g, out, *arrays, saved=saved, **attrs)
        got = op.apply_vjp(g[()] if g.ndim == 0 else g, out[()] if out.ndim == 0 else out, *scalars,
                           saved=scalar_saved, **attrs)
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-15)


def assert_layout_independent(op: OpDef, arrays: list[np.ndarray], attrs: dict[str, Any]) -> None:
    """Fortran-ordered and strided inputs (transposes, slices of other values) give the same results."""
    strided = [np.repeat(x, 2, axis=-1)[..., ::2] if x.ndim else x for x in arrays]
    fortran = [np.asfortranarray(x) if x.ndim else x for x in arrays]  # (asfortranarray makes 0-d 1-d)
    with np.errstate(all="ignore"):
        out, saved = op.apply(*arrays, **attrs)
        out = np.asarray(out)
        g = np.random.default_rng(5).standard_normal(out.shape)
        expected = op.apply_vjp(g, out, *arrays, saved=saved, **attrs)
        for xs in (strided, fortran):
            out_other, saved_other = op.apply(*xs, **attrs)
            out_other = np.asarray(out_other)
            np.testing.assert_allclose(out_other, out, rtol=1e-14)
            got = op.apply_vjp(np.asfortranarray(g) if g.ndim else g, out_other, *xs, saved=saved_other, **attrs)
            for a, b in zip(got, expected):
                if b is not None:
                    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
