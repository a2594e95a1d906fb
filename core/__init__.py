"""chainrule.core: graph IR, operator contract, registry, compiler and engine.

No gRPC and no pluggy here: the core is plain Python and numpy.
"""
from .broadcast import broadcast_shapes, unbroadcast
from .compile import Plan, compile_graph
from .dtypes import SUPPORTED as SUPPORTED_DTYPES, is_differentiable, parse_dtype
from .engine import UNREACHED_OMIT, UNREACHED_ZEROS, ContributionRecord, Evaluation, StopToken, evaluate
from .errors import *  # noqa: F401,F403  (the typed errors are part of the API)
from .errors import ChainruleError, GraphError, OpError
from .graph import GraphIR, InputDecl, Node
from .limits import Limits
from .operator import ATTR_KINDS, VARIADIC, Attr, OpDef, check_attrs, coerce_attr, validate_opdef
from .registry import Registry
from .tensor_spec import TensorSpec

__all__ = [
    "ATTR_KINDS", "Attr", "ChainruleError", "ContributionRecord", "DerivedNames", "Evaluation", "GraphIR",
    "GraphError", "InputDecl", "Limits", "Node", "OpDef", "OpError", "Plan", "Registry", "StopToken",
    "SUPPORTED_DTYPES", "SymbolicBuilder", "TensorSpec", "UNREACHED_OMIT", "UNREACHED_ZEROS", "VARIADIC",
    "broadcast_shapes", "check_attrs", "coerce_attr", "compile_graph", "derive_forward", "derive_reverse",
    "evaluate", "is_differentiable", "parse_dtype", "unbroadcast", "validate_opdef",
]

#: Loaded on first use (PEP 562): the symbolic derivatives take 10 ms to import, and
#: ``import chainrule.client`` reaches this package through the wire codecs. chainrule.plugins'
#: built-in families import chainrule.core.symbolic, which installs the grad/jvp expansion.
_SYMBOLIC = ("DerivedNames", "SymbolicBuilder", "derive_forward", "derive_reverse")


def __getattr__(name: str):
    if name in _SYMBOLIC:
        from . import symbolic

        return getattr(symbolic, name)
    raise AttributeError(f"module 'chainrule.core' has no attribute {name!r}")
