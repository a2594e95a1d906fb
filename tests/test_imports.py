"""The import rules are checked, not hoped.

The contracts live in pyproject.toml ([tool.importlinter]) and `make test` runs
`lint-imports` before pytest; the last test here runs it too, so a plain pytest
run guards them as well. The client's promise (it carries no server) is also
checked the way a user meets it: in a fresh interpreter.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Run in a fresh interpreter: what `import chainrule.client` loads, and what
#: `from chainrule.client import LocalClient` says.
CLIENT_PROBE = """
import json, sys
import chainrule.client
loaded = sorted(sys.modules)
try:
    from chainrule.client import LocalClient
except ImportError as e:
    error = [type(e).__name__, str(e)]
else:
    error = None
print(json.dumps({"loaded": loaded, "local_client_error": error,
                  "loaded_after": sorted(sys.modules)}))
"""


def _server_side(modules: list[str]) -> list[str]:
    def banned(name: str) -> bool:
        return (name == "pluggy" or name.startswith("pluggy.")
                or name == "chainrule.plugins" or name.startswith("chainrule.plugins.")
                or name == "chainrule.server" or name.startswith("chainrule.server."))
    return [m for m in modules if banned(m)]


def _probe() -> dict:
    out = subprocess.run([sys.executable, "-c", CLIENT_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_client_loads_no_server_nor_plugins():
    probe = _probe()
    assert "chainrule.client" in probe["loaded"]
    offenders = _server_side(probe["loaded"])
    assert not offenders, f"`import chainrule.client` loaded server-side modules: {', '.join(offenders)}"


def test_local_client_from_the_client_says_where_it_lives():
    probe = _probe()
    assert probe["local_client_error"] is not None, "`from chainrule.client import LocalClient` did not fail"
    kind, message = probe["local_client_error"]
    assert kind == "ImportError", f"{kind}: {message}"
    assert "chainrule.server" in message, message
    offenders = _server_side(probe["loaded_after"])
    assert not offenders, f"asking the client for LocalClient loaded: {', '.join(offenders)}"


def test_import_contracts_are_kept():
    """`lint-imports` (the console script's own entry point, so no PATH is needed) exits 0."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    out = subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"lint-imports failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}"


def test_the_client_does_not_load_the_symbolic_derivatives_and_a_grad_node_without_them_is_named():
    """chainrule.core.symbolic (10 ms) loads on first use; compiled without it, a grad node is a clear error."""
    import subprocess
    import sys

    code = (
        "import sys, chainrule.client\n"
        "assert 'chainrule.core.symbolic' not in sys.modules, 'the client loaded the symbolic derivatives'\n"
        "from chainrule.core import GraphIR, Registry, compile_graph\n"
        "from chainrule.core.errors import GraphError\n"
        "g = GraphIR.build([('x', 'float64', ())], [('d', 'grad', ('x', 'x'))], 'x')\n"
        "try:\n"
        "    compile_graph(g, Registry())\n"
        "except GraphError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "grad and jvp nodes need chainrule.core.symbolic" in done.stdout
