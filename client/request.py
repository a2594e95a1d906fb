"""Turn a client call into an EvaluateRequest; shared by Client and LocalClient.

Inputs given as Python numbers, lists or numpy arrays are converted to the
dtype the graph declares when numpy can do so within the same kind of number
(int -> float, float64 -> float32); anything else is sent as given so that
the server reports the mismatch (DTYPE_MISMATCH, naming the input).
"""
from __future__ import annotations

from itertools import repeat
from typing import Any, Mapping, NamedTuple, Sequence, Union

import numpy as np

from chainrule.core.errors import ChainruleError
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.convert import array_to_tensor
from chainrule.wire.outgoing import Carrier, Outgoing

from .builder import GraphBuilder, Var
from .graph import Graph
from .result import name_of

Selectable = Union[str, Sequence[Any]]  # "all", "none", or names/Vars
#: A parsed selection: "all", "none", or node names in order, each once.
Selected = Union[str, tuple[str, ...]]

_UNREACHED = {"zeros": pb.UNREACHED_ZEROS, "omit": pb.UNREACHED_OMIT}


def check_unreached(unreached: str) -> None:
    if unreached not in _UNREACHED:
        raise ValueError(f"unreached: expected 'zeros' or 'omit', got {unreached!r}")


def as_graph(target: Any) -> Graph:
    """The Graph behind a Graph, a GraphBuilder (its marked outputs), a Var or a Graph message."""
    if isinstance(target, Graph):
        return target
    if isinstance(target, Var):
        return target.graph
    if isinstance(target, GraphBuilder):
        return target.build()
    if isinstance(target, pb.Graph):
        return Graph(target)
    raise TypeError(f"expected a Graph, GraphBuilder or Var, got {type(target).__name__}")


def resolve_target(target: Any, output: Any = None) -> tuple[Graph, str]:
    """The graph to send and the output to differentiate ("" lets the server pick the only one)."""
    if isinstance(target, Var):
        if output is not None and name_of(output) != target.name:
            raise TypeError(f"output={name_of(output)!r} conflicts with the Var '{target.name}' being evaluated")
        return target.graph, target.name
    return as_graph(target), "" if output is None else name_of(output)


def merge_inputs(inputs: Mapping[Any, Any] | None, named: Mapping[str, Any], owner: Any = None) -> dict[str, Any]:
    """One name -> value dict from the positional mapping (names or Vars of ``owner``) and keyword inputs."""
    merged: dict[str, Any] = {}
    if inputs:
        if type(inputs) is dict and all(map(isinstance, inputs, repeat(str))):  # names only: nothing to resolve
            merged.update(inputs)
        else:
            for key, value in inputs.items():
                name = name_of(key, owner)
                if name in merged:
                    raise TypeError(f"input '{name}' is given twice")
                merged[name] = value
    for name, value in named.items():
        if name in merged:
            raise TypeError(f"input '{name}' is given twice")
        merged[name] = value
    return merged


def without_unused_inputs(graph: Graph, feeds: dict[str, Any]) -> dict[str, Any]:
    """``feeds`` without the inputs of the graph's builder that this (pruned) graph does not use
    (see :func:`is_unused_input`); ``feeds`` itself when every name is declared, the common case."""
    declared = graph.inputs
    if graph.builder is None or feeds.keys() <= declared.keys():
        return feeds
    return {name: value for name, value in feeds.items() if name in declared or not is_unused_input(graph, name)}


#: Declared dtype names as numpy dtypes: comparing dtypes is fast, a dtype with a name is not.
_DECLARED = {name: np.dtype(name) for name in ("float64", "float32", "int64", "int32", "bool")}


def to_array(name: str, value: Any, declared: str | None) -> np.ndarray:
    """One input as an array, converted to the declared dtype when that is a same-kind cast
    that keeps every value (2**40 does not fit an int32, 1e300 a float32: a TypeError says so)."""
    if type(value) is np.ndarray and value.dtype == _DECLARED.get(declared):  # the common case
        return value
    array = np.asarray(value)
    if declared is None or array.dtype == declared or not np.can_cast(array.dtype, declared, "same_kind"):
        return array
    with np.errstate(over="ignore"):
        cast = array.astype(declared)
    if cast.dtype.kind == "f":  # a float target rounds, as floats do; only an overflow to inf loses a value
        kept = np.isfinite(cast).all() or np.array_equal(np.isfinite(cast), np.isfinite(array))
    else:  # an integer target must hold every value exactly
        kept = np.array_equal(cast, array)
    if not kept:
        raise TypeError(f"input '{name}': its {array.dtype} values do not fit the declared {declared}")
    return cast


def to_tensor(name: str, value: Any, declared: str | None) -> pb.Tensor:
    """Encode one input (see :func:`to_array`) as a Tensor message."""
    if isinstance(value, pb.Tensor):
        return value
    try:
        return array_to_tensor(to_array(name, value, declared))
    except ChainruleError as exc:
        raise TypeError(f"input '{name}': {exc.message}") from None


def input_tensors(graph: Graph, values: Mapping[Any, Any], *, skip_unused: bool = False) -> dict[str, pb.Tensor]:
    """Inputs keyed by name or Var (of ``graph``), encoded as Tensor messages of their declared dtypes.
    ``skip_unused`` leaves out the inputs of the graph's builder that the graph does not use."""
    declared = graph.inputs
    tensors = {}
    for key, value in values.items():
        name = name_of(key, graph.builder)
        spec = declared.get(name)
        if spec is None and skip_unused and is_unused_input(graph, name):
            continue
        tensors[name] = to_tensor(name, value, spec.dtype if spec else None)
    return tensors


def is_unused_input(graph: Graph, name: str) -> bool:
    """Whether ``name`` is an input of the graph's builder that this (pruned) graph does not declare:
    a value for it has nothing to feed, and is dropped rather than refused."""
    builder = graph.builder
    return (builder is not None and name not in graph.inputs and name in builder
            and builder[name].op is None)


def parse_selection(spec: Selectable | None, field: str, owner: Any = None) -> Selected:
    """``"all"``, ``"none"`` or the names of a list of names/Vars (of ``owner``), each once, in order."""
    if spec is None:
        return "all"
    if isinstance(spec, str):
        if spec in ("all", "none"):
            return spec
        raise ValueError(f"{field}: expected 'all', 'none' or a list of names, got {spec!r}")
    if type(spec) in (list, tuple) and all(map(isinstance, spec, repeat(str))):  # names only: nothing to resolve
        return tuple(dict.fromkeys(spec))
    return tuple(dict.fromkeys(name_of(k, owner) for k in spec))


class EvaluateCall(NamedTuple):
    """One ``evaluate`` as the user asked for it, checked and resolved, before any transport
    decides how it travels (a request message, or the engine called in this process).

    Immutable; a NamedTuple rather than a frozen dataclass because one is made per call, and
    a frozen dataclass of ten fields takes three times as long to make (1 µs against 0.3 µs).
    ``template``: the :class:`CallTemplate` it was made from, when there is one; a transport may
    keep in its ``memo`` what it derives from the graph and selections alone."""

    graph: Graph
    output: str                 # "" lets the server pick the graph's only output
    feeds: Mapping[str, Any]    # input name -> value as given (numbers, lists, arrays, Tensor messages)
    seed: Any
    values: Selected
    grads: Selected
    unreached: str
    contributions: bool
    diagnostics: bool
    timeout: float | None
    template: "CallTemplate | None" = None

    def request(self, *, graph_id: str | None = None, carrier: Carrier | None = None) -> Outgoing:
        """The EvaluateRequest of this call (see :func:`evaluate_request`)."""
        return evaluate_request(
            self.graph, self.output, self.feeds, graph_id=graph_id, seed=self.seed, values=self.values,
            grads=self.grads, unreached=self.unreached, contributions=self.contributions,
            diagnostics=self.diagnostics, carrier=carrier,
        )


def evaluate_request(
    graph: Graph,
    output: str,
    inputs: Mapping[str, Any],
    *,
    graph_id: str | None = None,
    seed: Any = None,
    values: Selectable = "all",
    grads: Selectable = "all",
    unreached: str = "zeros",
    contributions: bool = False,
    diagnostics: bool = True,
    carrier: Carrier | None = None,
) -> Outgoing:
    """The EvaluateRequest for one call; the graph travels by id when ``graph_id`` is given.

    Large inputs travel as ``carrier`` decides (see chainrule.wire.outgoing):
    hand-encoded for gRPC, kept as arrays in-process, written into shared
    memory; by default inside the message.
    """
    check_unreached(unreached)
    request = _request_fields(graph, output, graph_id, values, grads, unreached, contributions, diagnostics)
    outgoing = Outgoing(request, carrier)
    declared = graph.inputs
    for name, value in inputs.items():
        spec = declared.get(name)
        if isinstance(value, pb.Tensor):
            request.inputs[name].CopyFrom(value)
            continue
        array = to_array(name, value, spec.dtype if spec else None)
        try:
            outgoing.put_map_tensor("inputs", name, array)
        except ChainruleError as exc:
            raise TypeError(f"input '{name}': {exc.message}") from None
    if seed is not None:
        request.seed.CopyFrom(to_tensor("seed", seed, None))
    return outgoing


#: Requests' fields other than tensors, by call form, for calls that send a graph id (see _request_fields).
_FIELDS: dict[tuple[Any, ...], pb.EvaluateRequest] = {}
MAX_KEPT_FORMS = 256


def _request_fields(graph: Graph, output: str, graph_id: str | None, values: Selectable, grads: Selectable,
                    unreached: str, contributions: bool, diagnostics: bool) -> pb.EvaluateRequest:
    """A new EvaluateRequest with every field but the tensors set. A call that sends its graph's id
    with selections of names (every call of a graph after its first) copies a message kept for its
    form: one C call, where setting the fields and selections takes several microseconds."""
    key = None
    if graph_id and _names_or_mode(values) and _names_or_mode(grads):
        key = (graph_id, output, values, grads, unreached, contributions, diagnostics)
        kept = _FIELDS.get(key)
        if kept is not None:
            request = pb.EvaluateRequest()
            request.CopyFrom(kept)
            return request
    request = pb.EvaluateRequest(output=output, unreached=_UNREACHED[unreached], contributions=contributions,
                                 diagnostics=pb.DIAGNOSTICS_FULL if diagnostics else pb.DIAGNOSTICS_OFF)
    if graph_id:
        request.graph_id = graph_id
    else:
        request.graph.CopyFrom(graph.message)
    _select_into(request.return_values, values, "return_values", graph.builder)
    _select_into(request.return_grads, grads, "return_grads", graph.builder)
    if key is not None:
        if len(_FIELDS) >= MAX_KEPT_FORMS:
            _FIELDS.clear()
        kept = pb.EvaluateRequest()
        kept.CopyFrom(request)
        _FIELDS[key] = kept
    return request


def _names_or_mode(selection: Any) -> bool:
    """Whether a selection is "all", "none" or a tuple of names: one that says the same every time."""
    return type(selection) is str or (type(selection) is tuple and all(type(n) is str for n in selection))


def _select_into(message: pb.Selection, spec: Selectable | None, field: str, owner: Any) -> None:
    """Write a selection (``"all"``, ``"none"`` or names/Vars of ``owner``) into a request's Selection
    field in place ("all": left unset)."""
    chosen = parse_selection(spec, field, owner)
    if chosen == "all":
        return
    if chosen == "none":
        message.mode = pb.Selection.NONE
        return
    message.mode = pb.Selection.LISTED
    message.names.extend(chosen)


# --- what a call resolves to before its inputs are looked at ----------------------------------------

class CallTemplate:
    """One form of ``evaluate`` call resolved: the graph to run, its output's name, the parsed
    selections and the declared inputs' names; nothing that depends on the inputs' values.

    A client keeps one per target and selections (:class:`CallTemplates`) and reuses it while it is
    :meth:`current`, so that a repeated call parses, prunes and merges nothing again. ``memo``
    belongs to the transport: what it derives from the template alone (a plan, a recipe)."""

    __slots__ = ("graph", "output", "values", "grads", "declared", "with_unused", "reusable", "builder", "version",
                 "metadata", "memo")

    def __init__(self, graph: Graph, output: str, values: Selected, grads: Selected, *, reusable: bool,
                 builder: GraphBuilder | None = None, version: int = 0, metadata: dict[str, str] | None = None) -> None:
        self.graph = graph
        self.output = output
        self.values = values
        self.grads = grads
        #: The graph's input names (a keys view): feeds naming exactly these need no merging or pruning.
        self.declared = graph.inputs.keys()
        #: The names a call fed besides some unused inputs of the builder (see :meth:`feeds`).
        self.with_unused: frozenset[str] = frozenset()
        #: False when reusing it could go stale unnoticed (Vars named in a Graph's selections: renames).
        self.reusable = reusable
        #: For a Var's call: its builder, and the builder's version and metadata the graph was pruned under.
        self.builder = builder
        self.version = version
        self.metadata = metadata
        self.memo: Any = None

    def current(self) -> bool:
        """Whether the template still says what resolving its call again would: a Graph's always (graphs
        are frozen); a Var's while its builder has neither changed (a node, a name) nor its metadata."""
        builder = self.builder
        return builder is None or (builder.version == self.version and builder.metadata == self.metadata)

    def feeds(self, inputs: Mapping[Any, Any] | None, named: dict[str, Any]) -> Mapping[str, Any]:
        """The call's inputs by name (see :func:`merge_inputs`, :func:`without_unused_inputs`).

        The common case costs one comparison: a dict naming exactly the declared inputs is the
        feeds as it is (read, never changed), the caller's mapping or the keyword arguments. A dict
        with the names of the last call that also fed unused inputs of the builder loses those alone."""
        given = inputs if not named else named if not inputs else None
        if type(given) is dict:
            if _names_equal(given, self.declared):
                return given
            if _names_equal(given, self.with_unused):
                declared = self.declared
                return {name: value for name, value in given.items() if name in declared}
        feeds = without_unused_inputs(self.graph, merge_inputs(inputs, named, self.graph.builder))
        if self.builder is not None and type(given) is dict and feeds.keys() <= self.declared:
            self._remember_unused(given)
        return feeds

    def _remember_unused(self, given: dict[Any, Any]) -> None:
        """Keep the names of ``given``, whose undeclared names all were unused inputs of the builder
        (dropped), when they are names: the same names next time drop the same. Only for a Var's
        template, which is not reused once its builder changed (what is unused may change with it)."""
        if all(map(isinstance, given, repeat(str))):
            self.with_unused = frozenset(given)


class CallTemplates:
    """A client's :class:`CallTemplate` per call form: the target (a Var or a Graph, by identity), ``output``
    and the selections as given. At most :attr:`MAX_TEMPLATES`, then started afresh; read and replaced
    without a lock (a dict's get and set are atomic, and a template is made alike by any thread)."""

    MAX_TEMPLATES = 64

    def __init__(self) -> None:
        self._known: dict[tuple[Any, ...], CallTemplate] = {}

    def template(self, target: Any, output: Any, values: Selectable | None, grads: Selectable | None,
                 unreached: str) -> CallTemplate:
        """The call's template, kept or resolved now (:func:`resolve_call`: the errors of a bad call).
        ``unreached`` is checked on every call."""
        key: tuple[Any, ...] | None = (target, output, _selection_key(values), _selection_key(grads))
        try:
            known = self._known.get(key)
        except TypeError:  # a form not kept (see _selection_key), or a Var compared with a name
            known = key = None
        if known is not None and known.current():
            if unreached != "zeros":
                check_unreached(unreached)
            return known
        template = resolve_call(target, output, values, grads, unreached)
        if key is not None and template.reusable:
            known_now = self._known
            if len(known_now) >= self.MAX_TEMPLATES:
                known_now = self._known = {}  # rebound, not cleared: a concurrent reader keeps a whole dict
            known_now[key] = template
        return template


def resolve_call(target: Any, output: Any, values: Selectable | None, grads: Selectable | None,
                 unreached: str) -> CallTemplate:
    """Check a call's arguments and resolve its target: a Var gives the graph of what it and the
    nodes named in ``values``/``grads`` need (``builder.graph_for``), a Graph itself."""
    owner = target.builder if isinstance(target, Var) else None
    chosen_values = parse_selection(values, "values", owner)
    chosen_grads = parse_selection(grads, "grads", owner)
    check_unreached(unreached)
    if owner is None:
        graph, output_name = resolve_target(target, output)
        reusable = isinstance(target, Graph) and _names_only(output, values, grads)
        return CallTemplate(graph, output_name, chosen_values, chosen_grads, reusable=reusable)
    if output is not None and name_of(output) != target.name:
        raise TypeError(f"output={name_of(output)!r} conflicts with the Var '{target.name}' being evaluated")
    version, metadata = owner.version, dict(owner.metadata)  # read first: a change meanwhile shows later
    # Only what the output needs, and the nodes asked for by name: unrelated nodes of the builder
    # are not sent, their inputs need no feeds and their errors do not matter.
    wanted = [target, *_vars_named(owner, chosen_values), *_vars_named(owner, chosen_grads)]
    return CallTemplate(owner.graph_for(*wanted), target.name, chosen_values, chosen_grads, reusable=True,
                        builder=owner, version=version, metadata=metadata)


def _vars_named(builder: GraphBuilder, chosen: Selected) -> list[Var]:
    """The builder's Vars among the selected names (others are left for the service to refuse)."""
    if isinstance(chosen, str):
        return []
    return builder.vars_named(chosen)


class _NotKept:
    """A selection of a form not kept (an iterator is read once): unhashable, so that no key holding
    it is looked up or kept."""

    __hash__ = None  # type: ignore[assignment]


_NOT_KEPT = _NotKept()


def _selection_key(spec: Any) -> Any:
    """A selection as part of a template's key: names or "all"/"none" as given, a list as a tuple."""
    kind = type(spec)
    if kind is str or spec is None:
        return spec
    if kind is list or kind is tuple:
        return tuple(spec)
    return _NOT_KEPT


def _names_only(output: Any, *selections: Any) -> bool:
    """Whether ``output`` and the selections are names only (no Var, whose name may change)."""
    if output is not None and not isinstance(output, str):
        return False
    return all(isinstance(s, str) or s is None or all(map(isinstance, s, repeat(str))) for s in selections)


def _names_equal(given: dict[Any, Any], declared: Any) -> bool:
    """Whether ``given``'s keys are exactly the ``declared`` names (a Var key never is)."""
    try:
        return given.keys() == declared
    except TypeError:  # a Var key whose hash met a name's: Vars refuse == with strings
        return False
