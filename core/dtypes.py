"""The dtypes chainrule accepts, and which of them carry gradients."""
from __future__ import annotations

import numpy as np

from .errors import DTypeError

FLOAT64 = np.dtype(np.float64)
FLOAT32 = np.dtype(np.float32)
INT64 = np.dtype(np.int64)
INT32 = np.dtype(np.int32)
BOOL = np.dtype(np.bool_)

#: Every dtype a tensor may have, by its canonical name.
SUPPORTED: dict[str, np.dtype] = {
    "float64": FLOAT64,
    "float32": FLOAT32,
    "int64": INT64,
    "int32": INT32,
    "bool": BOOL,
}

#: Float dtypes are differentiable; integer and bool tensors have no gradient.
DIFFERENTIABLE = frozenset({FLOAT64, FLOAT32})

#: Names of groups of dtypes, as operators declare what each input accepts (OpDef.input_dtypes).
ALL_DTYPES = tuple(SUPPORTED)
FLOAT_DTYPES = ("float64", "float32")
INT_DTYPES = ("int64", "int32")
NUMBER_DTYPES = FLOAT_DTYPES + INT_DTYPES
BOOL_DTYPES = ("bool",)


def parse_dtype(value: object, *, field: str = "dtype") -> np.dtype:
    """Turn a name or numpy dtype into a supported dtype, or raise DTypeError."""
    try:
        dtype = np.dtype(value)  # type: ignore[call-overload]
    except TypeError:
        dtype = None
    if dtype is None or dtype not in DIFFERENTIABLE and dtype not in (INT64, INT32, BOOL):
        raise DTypeError(
            f"{field}: unsupported dtype {value!r}; expected one of {', '.join(SUPPORTED)}",
            field=field,
        )
    return dtype


def is_differentiable(dtype: np.dtype) -> bool:
    return dtype in DIFFERENTIABLE


def float_result(dtype: np.dtype) -> np.dtype:
    """The dtype a float-valued function (exp, sigmoid...) gives for an input dtype."""
    return dtype if dtype in DIFFERENTIABLE else FLOAT64
