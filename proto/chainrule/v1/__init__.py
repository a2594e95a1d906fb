"""Generated stubs of the chainrule.v1 wire contract (see chainrule.proto)."""
