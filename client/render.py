"""Circuit diagrams of one evaluation: every node with its value and its gradient.

Backpropagation is taught with circuit diagrams, each gate with its forward
value and the gradient that flowed back to it; :func:`to_dot` draws that from
a real run as Graphviz DOT text (no dependency), :func:`render` turns it into
SVG, PNG or PDF with Graphviz's ``dot`` program.

How to read a diagram: data flows left to right. Parameters (graph inputs
that got a gradient) are blue rounded boxes, other inputs grey rounded boxes,
constants small dashed boxes, operators yellow boxes. The differentiated
output has a double border. A red node holds a NaN or an infinity; an orange
border marks a node a diagnostic flag names. Scalars show as numbers to 4
significant digits; tensors as dtype[shape], norm, and min/max/mean. When
the evaluation asked for ``contributions=True``, an edge out of a value that
fans out is labelled ``+= g``: its share of that value's gradient. A value
used by more than eight nodes appears as a small blue reference beside each
of them.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from chainrule.core.diagnostics import number, stats
from chainrule.v1 import chainrule_pb2 as pb

if TYPE_CHECKING:
    from .graph import Graph
    from .result import Flag, Result

#: Node styles by role (Graphviz attributes).
STYLES: dict[str, dict[str, str]] = {
    "parameter": {"shape": "box", "style": "rounded,filled", "fillcolor": "#d6e6ff", "color": "#2b6cb0"},
    "input": {"shape": "box", "style": "rounded,filled", "fillcolor": "#e2e8f0", "color": "#4a5568"},
    "constant": {"shape": "box", "style": "dashed,filled", "fillcolor": "#f7fafc", "color": "#a0aec0",
                 "fontcolor": "#4a5568", "fontsize": "8"},
    "operator": {"shape": "box", "style": "filled", "fillcolor": "#fefcbf", "color": "#975a16"},
    # one value of a node with several (scan's final carries and stacked outputs)
    "value": {"shape": "box", "style": "rounded,filled", "fillcolor": "#fffff0", "color": "#975a16"},
}
#: A graph attribute's nodes (scan's body), drawn in a box beside the node that runs them.
BODY_STYLE = {"shape": "box", "style": "filled", "fillcolor": "#faf5ff", "color": "#6b46c1", "fontsize": "8"}
NONFINITE_STYLE = {"fillcolor": "#feb2b2", "color": "#c53030", "penwidth": "3"}
FLAGGED_STYLE = {"color": "#dd6b20", "penwidth": "3"}
OUTPUT_STYLE = {"peripheries": "2", "penwidth": "2"}
CONTRIBUTION_STYLE = {"fontcolor": "#c53030", "color": "#c53030"}
#: A value feeding more consumers than this is drawn once, with a small reference beside each
#: consumer instead of an edge from afar: long crossing edges make big diagrams unreadable and
#: make ``dot`` take minutes (a 150-node chain with one shared weight: 8.7 s, against 0.07 s).
PROXY_FANOUT = 8
PROXY_STYLE = {"shape": "plaintext", "fontsize": "8", "fontcolor": "#2b6cb0"}

INSTALL_HINT = (
    "drawing {path} needs Graphviz's `dot` program, which was not found on PATH. "
    "Install Graphviz (Debian/Ubuntu: `apt-get install graphviz`; macOS: `brew install graphviz`; "
    "conda: `conda install graphviz`), or write the DOT text instead: result.to_dot(), or a .dot path."
)


class RenderError(RuntimeError):
    """A diagram could not be drawn: Graphviz is missing, or ``dot`` failed."""


def to_dot(result: Result, graph: Graph | pb.Graph | None = None, *, parameters: Iterable[Any] | None = None) -> str:
    """The evaluation as Graphviz DOT text, left to right, one statement per line.

    ``graph`` defaults to the graph the result was evaluated from (clients attach it).
    ``parameters`` names the inputs to draw as parameters (default: every input with a gradient).
    """
    chosen = None if parameters is None else {getattr(p, "name", p) for p in parameters}
    message = _graph_message(result, graph)
    flagged: dict[str, list[str]] = {}
    for flag in _flags(result):
        flagged.setdefault(flag.node, []).append(flag.kind)
    origins = _origins(result)
    lines = [
        "digraph chainrule {",
        '  graph [rankdir=LR, nodesep=0.25, ranksep=0.45, fontname="Helvetica", fontsize=11, labelloc=t, '
        f"label={_quote(_title(result))}];",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9, color="#4a5568"];',
    ]
    for decl in message.inputs:
        has_gradient = decl.name in result.grad
        role = "parameter" if has_gradient and (chosen is None or decl.name in chosen) else "input"
        lines.append(_node(result, decl.name, role, role, flagged, origins))
    for node in message.nodes:
        role = "constant" if not node.inputs else "operator"
        lines.append(_node(result, node.name, node.op, role, flagged, origins))
        for value in node.outputs:
            lines.append(_node(result, value, "value", "value", flagged, origins))
            lines.append(f"  {_quote(node.name)} -> {_quote(value)};")
        lines.extend(_bodies(node))
    shares = {(c.node, c.consumer, c.input_index): c.gradient for c in result.contributions}
    fanout: dict[str, int] = {}
    for node in message.nodes:
        for source in node.inputs:
            fanout[source] = fanout.get(source, 0) + 1
    for node in message.nodes:
        for pos, source in enumerate(node.inputs):
            attrs: dict[str, str] = {}
            if len(node.inputs) > 1:  # which argument: 1/den is not den/1
                attrs.update(headlabel=str(pos), labelfontsize="8", labelfontcolor="#718096")
            share = shares.get((source, node.name, pos))
            if share is not None:
                attrs.update(label=f"+= {_brief(share)}", **CONTRIBUTION_STYLE)
            tail = source
            if fanout[source] > PROXY_FANOUT:  # a reference beside each consumer instead of long edges
                tail = f"{source}@{node.name}#{pos}"
                lines.append(f"  {_quote(tail)}{_attrs({**PROXY_STYLE, 'label': source})};")
            lines.append(f"  {_quote(tail)} -> {_quote(node.name)}{_attrs(attrs)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(result: Result, path: str | Path, *, graph: Graph | pb.Graph | None = None,
           parameters: Iterable[Any] | None = None, format: str | None = None, timeout: float = 300.0) -> Path:
    """Draw the evaluation to ``path``; the format comes from the suffix (.svg, .png, .pdf, or .dot for text).

    Raises :class:`RenderError` saying how to install Graphviz when ``dot`` is missing.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if not fmt:
        raise RenderError(f"{path}: say the format with a suffix (.svg, .png, .pdf, .dot) or format=")
    text = to_dot(result, graph, parameters=parameters)
    if fmt in ("dot", "gv"):
        path.write_text(text, encoding="utf-8")
        return path
    dot = shutil.which("dot")
    if dot is None:
        raise RenderError(INSTALL_HINT.format(path=path))
    try:
        done = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=text.encode("utf-8"),
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RenderError(f"dot took longer than {timeout:g} s to draw {path}; draw a smaller graph") from None
    if done.returncode != 0:
        raise RenderError(f"dot could not draw {path} as {fmt}: {done.stderr.decode(errors='replace').strip()}")
    return path


# --- pieces --------------------------------------------------------------------------------------

def _graph_message(result: Result, graph: Graph | pb.Graph | None) -> pb.Graph:
    graph = graph if graph is not None else result.graph
    if graph is None:
        raise ValueError("this Result does not know its graph; pass it: to_dot(result, graph)")
    return graph if isinstance(graph, pb.Graph) else graph.message


def _origins(result: Result) -> dict[str, str]:
    """Nodes where the diagnostics say values or gradients first stopped being finite."""
    d = result.diagnostics
    marks: dict[str, str] = {}
    if d is None:
        return marks
    if d.first_nonfinite_gradient is not None:
        marks[d.first_nonfinite_gradient.node] = "first non-finite gradient"
    if d.first_nonfinite_value is not None:
        marks[d.first_nonfinite_value.node] = "first non-finite value"
    return marks


def _title(result: Result) -> str:
    lines = [f"{result.output} = {_brief(result.value)}"]
    lines.extend(f"{f.kind} at {f.node}" for f in _flags(result))
    return "\n".join(lines)


def _flags(result: Result) -> list[Flag]:
    return result.diagnostics.flags if result.diagnostics is not None else []


def _node(result: Result, name: str, op: str, role: str, flagged: dict[str, list[str]],
          origins: dict[str, str]) -> str:
    lines = [name if op == role else f"{name} ({op})"]
    attrs = dict(STYLES[role])
    sick = False
    if name in result.values:
        value = result.values[name]
        lines.extend(_describe("value", value))
        sick = _nonfinite(value)
    if name in result.grad:
        grad = result.grad[name]
        lines.extend(_describe("grad", grad))
        sick = sick or _nonfinite(grad)
    elif name in result.no_gradient and role != "constant":
        lines.append("no gradient (integer)")
    if name == result.output:
        lines.append("differentiated output")
        attrs.update(OUTPUT_STYLE)
    if name in origins:
        lines.append(origins[name])
    if name in flagged:
        lines.append(", ".join(flagged[name]))
        attrs.update(FLAGGED_STYLE)
    if sick:
        attrs.update(NONFINITE_STYLE)
    attrs["label"] = "\n".join(lines)
    attrs["class"] = role  # SVG output carries it: diagrams can be styled and tested by role
    return f"  {_quote(name)}{_attrs(attrs)};"


def _bodies(node: pb.Node) -> list[str]:
    """DOT lines drawing each graph attribute of ``node`` (scan's body) as a cluster of its
    operators, joined to the node by a dashed edge. One level: a body's own bodies show as
    their node, with the count of their nodes."""
    lines = []
    for key, attr in sorted(node.attrs.items()):
        if attr.WhichOneof("value") != "graph":
            continue
        body, prefix = attr.graph, f"{node.name}/{key}/"
        lines.append(f"  subgraph {_quote('cluster_' + prefix)} {{")
        lines.append(f"    label={_quote(f'{node.name}.{key}: once per step')}; style=dashed; color=\"#6b46c1\";")
        for decl in body.inputs:
            lines.append(f"    {_quote(prefix + decl.name)}{_attrs({**BODY_STYLE, 'label': decl.name, 'style': 'rounded'})};")
        for inner in body.nodes:
            inner_graphs = sum(len(a.graph.nodes) for a in inner.attrs.values() if a.WhichOneof("value") == "graph")
            label = f"{inner.name} ({inner.op})" + (f"\nbody: {inner_graphs} nodes" if inner_graphs else "")
            lines.append(f"    {_quote(prefix + inner.name)}{_attrs({**BODY_STYLE, 'label': label})};")
            for value in inner.outputs:
                lines.append(f"    {_quote(prefix + value)}{_attrs({**BODY_STYLE, 'label': value, 'style': 'rounded'})};")
                lines.append(f"    {_quote(prefix + inner.name)} -> {_quote(prefix + value)};")
            for source in inner.inputs:
                lines.append(f"    {_quote(prefix + source)} -> {_quote(prefix + inner.name)};")
        for i, out in enumerate(body.outputs):
            lines.append(f"    {_quote(prefix + 'out' + str(i))}{_attrs({'shape': 'plaintext', 'fontsize': '8', 'label': f'output {i}'})};")
            lines.append(f"    {_quote(prefix + out)} -> {_quote(prefix + 'out' + str(i))};")
        lines.append("  }")
        if body.inputs:
            lines.append(f"  {_quote(node.name)} -> {_quote(prefix + body.inputs[0].name)} [style=dashed, arrowhead=none];")
    return lines


def _describe(what: str, array: np.ndarray) -> list[str]:
    """``value 1.546`` for a scalar; dtype[shape], norm and min/max/mean for a tensor."""
    if array.size == 1:
        return [f"{what} {number(array.item())}"]
    s = stats(array)
    head = f"{what} {s.dtype}{list(s.shape)} norm {number(s.norm)}"
    if s.nonfinite:
        head += f" ({s.nonfinite} non-finite)"
    return [head, f"min {number(s.min)} max {number(s.max)} mean {number(s.mean)}"]


def _brief(array: Any) -> str:
    array = np.asarray(array)
    if array.size == 1:
        return number(array.item())
    return f"{array.dtype.name}{list(array.shape)} norm {number(stats(array).norm)}"


def _nonfinite(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" and not bool(np.all(np.isfinite(array)))


def _quote(text: str) -> str:
    """A DOT double-quoted string; newlines become centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(attrs: dict[str, str]) -> str:
    if not attrs:
        return ""
    return " [" + ", ".join(f"{key}={_quote(value)}" for key, value in attrs.items()) + "]"
