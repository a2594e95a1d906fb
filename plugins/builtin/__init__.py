"""The built-in operator families, each a plugin with one table of operators."""
