"""chainrule.plugins: hook specifications, the plugin manager, the built-in
operator families and the helpers plugin authors use."""
from .authoring import (
    OperatorDraft, OperatorSet, attr_from_default, broadcast_inputs, float_like_input, same_as_input,
    scalar_of_input, table_hookimpl,
)
from .hookspecs import hookimpl, hookspec
from .jax_bridge import from_jax  # imports JAX only when an operator from JAX first runs
from .manager import load_plugins  # (also hands the gradient checker its loader of the built-ins)
from .testing import Sample

__all__ = [
    "OperatorDraft", "OperatorSet", "Sample", "attr_from_default", "broadcast_inputs", "float_like_input",
    "from_jax", "hookimpl", "hookspec", "load_plugins", "same_as_input", "scalar_of_input", "table_hookimpl",
]
