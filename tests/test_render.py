"""Circuit diagrams through a real server and the client: DOT text, SVG from Graphviz, CLI, docs figures.

The DOT is read back with a small parser of node and edge statements (below),
so the tests check each node's own label, not a substring somewhere in the file.
"""
from __future__ import annotations

import importlib.util
import math
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from chainrule.client import GraphBuilder
from chainrule.server import LocalClient
from chainrule.client.render import RenderError, render, to_dot
from chainrule.server.cli import main as cli_main
from test_client_local import staged

ROOT = Path(__file__).resolve().parent.parent
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


# --- a small DOT reader -----------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(->|[\[\]{};,=])|([A-Za-z0-9_.#]+))')


def _unquote(token: str) -> str:
    if not token.startswith('"'):
        return token
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) in "nlr" else m.group(1), token[1:-1])


def parse_dot(text: str) -> tuple[dict[str, str], dict[str, dict[str, str]], list[tuple[str, str, dict[str, str]]]]:
    """Graph attributes, node statements (name -> attributes) and edges (tail, head, attributes)."""
    tokens, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        assert m is not None, f"cannot read DOT at {text[pos:pos + 40]!r}"
        tokens.append(m.group(1) or m.group(2) or m.group(3))
        pos = m.end()
    assert tokens[:3] == ["digraph", "chainrule", "{"] and tokens[-1] == "}", tokens[:3]
    graph_attrs: dict[str, str] = {}
    nodes: dict[str, dict[str, str]] = {}
    edges: list[tuple[str, str, dict[str, str]]] = []
    statements, current = [], []
    for token in tokens[3:-1]:
        if token == ";":
            statements.append(current)
            current = []
        else:
            current.append(token)
    assert not current, "statement without ';'"
    for st in statements:
        attrs: dict[str, str] = {}
        if "[" in st:
            body = st[st.index("[") + 1: st.index("]")]
            for key, eq, value in _split(body):
                assert eq == "=", (key, eq, value)
                attrs[key] = _unquote(value)
            head = st[: st.index("[")]
        else:
            head = st
        if head in (["graph"], ["node"], ["edge"]):
            if head == ["graph"]:
                graph_attrs = attrs
        elif len(head) == 3 and head[1] == "->":
            edges.append((_unquote(head[0]), _unquote(head[2]), attrs))
        else:
            assert len(head) == 1, head
            nodes[_unquote(head[0])] = attrs
    return graph_attrs, nodes, edges


def _split(body: list[str]) -> list[list[str]]:
    parts, current = [], []
    for token in body:
        if token == ",":
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    return [p for p in parts if p]


def label_lines(attrs: dict[str, str]) -> list[str]:
    return attrs["label"].split("\n")


def line_value(lines: list[str], what: str) -> str:
    """The text after ``what `` on the node's line starting with it."""
    found = [line[len(what) + 1:] for line in lines if line.startswith(what + " ")]
    assert len(found) == 1, (what, lines)
    return found[0]


# --- the staged circuit, computed by hand ----------------------------------------------------------

def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def staged_by_hand(x: float = 3.0, y: float = -4.0) -> tuple[dict[str, float], dict[str, float], dict]:
    """Values, gradients and per-edge shares of f(x,y) = (x+σ(y))/(σ(x)+(x+y)²), backpropagated by hand."""
    sigy, sigx, xpy = sig(y), sig(x), x + y
    num, xpysqr = x + sigy, xpy ** 2
    den = sigx + xpysqr
    invden = 1 / den
    f = num * invden
    dnum, dinvden = invden, num
    dden = -1 / den ** 2 * dinvden
    dsigx = dxpysqr = dden
    dxpy = 2 * xpy * dxpysqr
    dsigy = dnum
    shares = {
        ("x", "num"): dnum, ("x", "sigx"): sigx * (1 - sigx) * dsigx, ("x", "xpy"): dxpy,
        ("y", "sigy"): sigy * (1 - sigy) * dsigy, ("y", "xpy"): dxpy,
    }
    dx = shares["x", "num"] + shares["x", "sigx"] + shares["x", "xpy"]
    dy = shares["y", "sigy"] + shares["y", "xpy"]
    values = dict(x=x, y=y, sigy=sigy, num=num, sigx=sigx, xpy=xpy, xpysqr=xpysqr, den=den, invden=invden, f=f)
    grads = dict(x=dx, y=dy, sigy=dsigy, num=dnum, sigx=dsigx, xpy=dxpy, xpysqr=dxpysqr, den=dden,
                 invden=dinvden, f=1.0)
    return values, grads, shares


def test_hand_computation_matches_the_lecture_notes():
    values, grads, _ = staged_by_hand()
    assert math.isclose(values["f"], 1.5456448841066441, rel_tol=1e-14)
    assert math.isclose(grads["x"], 2.0595697955721652, rel_tol=1e-14)
    assert math.isclose(grads["y"], 1.5922327514838093, rel_tol=1e-14)


def test_dot_of_the_staged_circuit_shows_every_value_and_gradient(client):
    result = client.evaluate(staged(), x=3.0, y=-4.0, values="all")
    graph_attrs, nodes, edges = parse_dot(result.to_dot())
    values, grads, _ = staged_by_hand()
    assert graph_attrs["rankdir"] == "LR"
    for name in values:
        lines = label_lines(nodes[name])
        assert line_value(lines, "value") == f"{values[name]:.4g}", name
        assert line_value(lines, "grad") == f"{grads[name]:.4g}", name
    # roles are visually distinct; which inputs are parameters is the caller's to say
    assert nodes["x"]["class"] == nodes["y"]["class"] == "parameter"
    _, chosen, _ = parse_dot(result.to_dot(parameters=["x"]))
    assert chosen["x"]["class"] == "parameter" and chosen["y"]["class"] == "input"
    assert chosen["y"]["fillcolor"] != chosen["x"]["fillcolor"]
    assert {nodes[n]["class"] for n in ("sigy", "num", "den", "invden", "f")} == {"operator"}
    constants = [n for n, a in nodes.items() if a["class"] == "constant"]
    assert len(constants) == 2 and all(label_lines(nodes[c])[0].endswith("(const)") for c in constants)
    fills = {nodes[n]["fillcolor"] for n in ("x", "sigy", constants[0])}
    assert len(fills) == 3
    assert label_lines(nodes["sigy"])[0] == "sigy (sigmoid)"
    # the differentiated output is marked, and only it
    marked = [n for n, a in nodes.items() if a.get("peripheries") == "2"]
    assert marked == ["f"] and "differentiated output" in label_lines(nodes["f"])
    # edges follow data flow, one per (consumer, argument)
    assert ("x", "num") in {(t, h) for t, h, _ in edges}
    assert sum(1 for t, h, _ in edges if h == "invden") == 2
    assert not any("fillcolor" in a and a["fillcolor"] == "#feb2b2" for a in nodes.values())


def test_tensor_nodes_show_shape_dtype_statistics_and_norm(client):
    g = GraphBuilder()
    w, x = g.input("w", (3,)), g.input("x", (3,))
    f = (w * x).sum(name="f")
    result = client.evaluate(f, w=np.array([1.0, -2.0, 2.0]), x=np.array([0.5, 0.25, -1.0]), values="all")
    _, nodes, _ = parse_dot(result.to_dot())
    lines = label_lines(nodes["w"])
    assert lines[1] == "value float64[3] norm 3"
    assert lines[2] == "min -2 max 2 mean 0.3333"
    assert line_value(lines, "grad") == "float64[3] norm 1.146"   # |x| = sqrt(0.25 + 0.0625 + 1)
    assert line_value(label_lines(nodes["f"]), "value") == "-2"


def test_nonfinite_nodes_are_highlighted_and_the_origin_named(client):
    g = GraphBuilder()
    x = g.input("x")
    loss = ((x - 5).named("d").log(name="l") + x * x).named("loss")
    _, nodes, _ = parse_dot(client.evaluate(loss, x=1.0, values="all").to_dot())
    red = {n for n, a in nodes.items() if a["fillcolor"] == "#feb2b2"}
    assert red == {"l", "loss"}
    assert "first non-finite value" in label_lines(nodes["l"])
    assert line_value(label_lines(nodes["l"]), "value") == "nan"


# --- contributions on the edges --------------------------------------------------------------------

def test_contributions_of_x_times_x_plus_x(client):
    g = GraphBuilder()
    x = g.input("x")
    f = (x * x).named("xx") + x
    result = client.evaluate(f, x=3.0, contributions=True, values="all")
    shares = sorted((c.consumer, c.input_index, float(c.gradient)) for c in result.contributions if c.node == "x")
    assert shares == [(f.name, 1, 1.0), ("xx", 0, 3.0), ("xx", 1, 3.0)]
    assert sum(s for _, _, s in shares) == float(result.grad[x]) == 7.0
    _, _, edges = parse_dot(result.to_dot())
    labels = sorted((h, a.get("headlabel"), a["label"]) for t, h, a in edges if t == "x")
    assert labels == [(f.name, "1", "+= 1"), ("xx", "0", "+= 3"), ("xx", "1", "+= 3")]


def test_contributions_in_the_staged_circuit_are_the_hand_computed_edges(client):
    result = client.evaluate(staged(), x=3.0, y=-4.0, contributions=True, values="all")
    _, grads, shares = staged_by_hand()
    got = {(c.node, c.consumer): float(c.gradient) for c in result.contributions}
    assert set(got) == set(shares)   # only x and y fan out
    for edge, share in shares.items():
        assert math.isclose(got[edge], share, rel_tol=1e-12, abs_tol=1e-15), edge
    for name in ("x", "y"):
        total = sum(v for (n, _), v in got.items() if n == name)
        assert math.isclose(total, float(result.grad[name]), rel_tol=1e-14)
        assert math.isclose(total, grads[name], rel_tol=1e-12)
    _, _, edges = parse_dot(result.to_dot())
    drawn = {(t, h): a["label"] for t, h, a in edges if "label" in a}
    assert drawn == {edge: f"+= {share:.4g}" for edge, share in shares.items()}


# --- SVG and PNG through Graphviz -------------------------------------------------------------------

@needs_dot
def test_svg_from_dot_parses_and_shows_every_value_and_gradient(client, tmp_path):
    result = client.evaluate(staged(), x=3.0, y=-4.0, values="all")
    path = result.render(tmp_path / "staged.svg")
    root = ET.parse(path).getroot()
    ns = {"svg": "http://www.w3.org/2000/svg"}
    shown = {}
    for group in root.iter("{http://www.w3.org/2000/svg}g"):
        if "node" in group.get("class", "").split():
            title = group.find("svg:title", ns).text
            shown[title] = ([t.text for t in group.findall("svg:text", ns)], group.get("class").split()[1])
    values, grads, _ = staged_by_hand()
    for name in values:
        texts, _role = shown[name]
        assert f"value {values[name]:.4g}" in texts and f"grad {grads[name]:.4g}" in texts, (name, texts)
    assert shown["x"][1] == "parameter" and shown["f"][1] == "operator"


@needs_dot
def test_png_is_written(client, tmp_path):
    path = client.evaluate(staged(), x=3.0, y=-4.0, values="all").render(tmp_path / "staged.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_graphviz_says_how_to_install_it(tmp_path, monkeypatch):
    result = LocalClient().evaluate(staged(), x=3.0, y=-4.0, values="all")
    monkeypatch.setenv("PATH", str(tmp_path))   # a PATH without dot
    with pytest.raises(RenderError, match="apt-get install graphviz"):
        result.render(tmp_path / "staged.svg")
    assert not (tmp_path / "staged.svg").exists()
    text = result.render(tmp_path / "staged.dot").read_text()   # DOT text needs no Graphviz
    assert text == result.to_dot()


def test_render_errors_are_clear(tmp_path):
    result = LocalClient().evaluate(staged(), x=3.0, y=-4.0, values="all")
    with pytest.raises(RenderError, match="suffix"):
        render(result, tmp_path / "staged")
    bare = type(result)(result.response)   # a Result built without its graph
    with pytest.raises(ValueError, match="pass it"):
        bare.to_dot()
    assert to_dot(bare, staged().graph) == result.to_dot()


@needs_dot
def test_unknown_format_reports_dots_message(tmp_path):
    result = LocalClient().evaluate(staged(), x=3.0, y=-4.0, values="all")
    with pytest.raises(RenderError, match="nosuchformat"):
        result.render(tmp_path / "staged.nosuchformat")


# --- the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["server", "local"])
def test_chainrule_render_command(address, tmp_path, capsys, where):
    graph_file = tmp_path / "staged.json"
    staged().graph.save(graph_file)
    out = tmp_path / "staged.dot"
    flag = ["--server", address] if where == "server" else ["--local"]
    assert cli_main(["render", str(graph_file), "-i", "x=3", "-i", "y=-4", "-o", str(out), *flag]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "all values and gradients are finite" in printed
    _, nodes, edges = parse_dot(out.read_text())
    values, grads, shares = staged_by_hand()
    assert line_value(label_lines(nodes["den"]), "grad") == f"{grads['den']:.4g}"
    assert {(t, h) for t, h, a in edges if "label" in a} == set(shares)   # contributions on by default


def test_chainrule_render_without_contributions_and_bad_server(tmp_path, capsys):
    graph_file = tmp_path / "staged.json"
    staged().graph.save(graph_file)
    out = tmp_path / "staged.dot"
    assert cli_main(["render", str(graph_file), "-i", "x=3", "-i", "y=-4", "-o", str(out), "--local",
                     "--no-contributions", "--param", "y"]) == 0
    _, nodes, edges = parse_dot(out.read_text())
    assert not any("label" in a for _, _, a in edges)
    assert nodes["y"]["class"] == "parameter" and nodes["x"]["class"] == "input"
    capsys.readouterr()
    assert cli_main(["render", str(graph_file), "-i", "x=3", "-o", str(out), "--local"]) == 1
    assert "input 'y'" in capsys.readouterr().err


# --- the docs figures stay true -----------------------------------------------------------------------

def test_docs_figures_are_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("make_debugging_figures", ROOT / "docs" / "make_debugging_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.make_figures(tmp_path, svg=False)
    doc = (ROOT / "docs" / "debugging.md").read_text(encoding="utf-8")
    for path in written:
        committed = ROOT / "docs" / "figures" / path.name
        assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"docs/figures/{path.name} is stale: run python docs/make_debugging_figures.py")
        if path.suffix == ".txt":   # the diagnostics quoted in the document are the real ones
            assert path.read_text(encoding="utf-8") in doc, path.name
        else:
            assert f"figures/{path.stem}.svg" in doc
            assert (ROOT / "docs" / "figures" / f"{path.stem}.svg").exists()


def test_a_few_hundred_nodes_with_shared_weights_render_quickly_and_readably(tmp_path):
    """A value used everywhere is drawn as a reference beside each consumer, not as 150 long edges."""
    from chainrule.client import GraphBuilder
    from chainrule.server import LocalClient

    g = GraphBuilder()
    v, w, x = g.input("v"), g.input("w"), g.input("x")
    for _ in range(100):
        v = (v * w).tanh() + x
    f = v.named("f")
    result = LocalClient().evaluate(f, v=0.1, w=0.9, x=0.05, contributions=True, values="all")
    text = result.to_dot()
    assert text.count(' -> ') >= 300 and '"w@' in text  # w's uses are references
    assert not any(line.startswith('  "w" ->') for line in text.splitlines())
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    from chainrule.client.render import render

    path = render(result, tmp_path / "big.svg", timeout=60)  # minutes before the references
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg") and len(root.findall(".//{http://www.w3.org/2000/svg}g")) > 300
