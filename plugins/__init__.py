"""chainrule.plugins: hook specifications, the plugin manager, the built-in
operator families and the helpers plugin authors use."""
from .authoring import (
    OperatorDraft, OperatorSet, attr_from_default, broadcast_inputs, float_like_input, same_as_input,
    scalar_of_input, table_hookimpl,
)
from .hookspecs import hookimpl, hookspec

__all__ = [
    "OperatorDraft", "OperatorSet", "attr_from_default", "broadcast_inputs", "float_like_input", "hookimpl",
    "hookspec", "same_as_input", "scalar_of_input", "table_hookimpl",
]
