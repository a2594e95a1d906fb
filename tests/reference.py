"""The readable model of core/engine.py: what ``evaluate`` computes, and nothing else.

``core/compile.py`` and ``core/engine.py`` compute exactly this, but fast and
safely: a compiled flat plan of slots, arity fast paths, selective vjp
(``needs=``), contract checks on every rule's result, unbroadcasting only where
a shape differs, in-place accumulation into buffers the engine owns, pruning to
``wrt=``, the contribution log, deadlines and memory limits. This file is the
same computation in the style of micrograd's engine, so a reader can see what
the hot loop means; tests/test_reference.py checks the engine against it on
random graphs.

Deliberately left out (the engine has them, this model does not):

* every check: unknown operators or names, arity, attribute schemas and
  defaults (attributes are passed as written in the graph), dtypes, shapes,
  seeds, cycles (a node on a cycle is silently never reached), limits;
* dtypes: every value is assumed to be a float and to carry a gradient, so
  integer values and literals (``const``) get gradients here, where the
  engine gives them none;
* ``wrt=`` and selective vjp: every input's gradient is computed, and ``needs``
  is never passed (operators with ``selective_vjp`` default it to all True);
* ``unreached="omit"``: a value that does not reach the output keeps a zero
  gradient (the engine's default, ``unreached="zeros"``);
* caching, fast paths, buffer ownership, the contribution log, diagnostics.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from chainrule.core import unbroadcast


def topological_order(graph):
    """The graph's nodes, each after the nodes it reads (Kahn's algorithm: iterative, no recursion)."""
    waiting_for = {node.name: 0 for node in graph.nodes}  # how many inputs are not computed yet
    readers = {node.name: [] for node in graph.nodes}     # the nodes that read each node
    for node in graph.nodes:
        for name in node.inputs:
            if name in readers:                           # a node, not a declared input
                waiting_for[node.name] += 1
                readers[name].append(node)
    ready = deque(node for node in graph.nodes if waiting_for[node.name] == 0)
    order = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for reader in readers[node.name]:
            waiting_for[reader.name] -= 1
            if waiting_for[reader.name] == 0:
                ready.append(reader)
    return order


def evaluate(graph, registry, inputs, output=None, seed=None):
    """Forward, then backward from ``output``: (values, gradients), two dicts by name.

    ``seed`` is d output / d output (default: ones, right for a scalar output).
    """
    order = topological_order(graph)
    values = dict(inputs)
    saved = {}                                            # residuals: what a forward rule hands its vjp
    for node in order:                                    # forward: each operator's forward rule
        op = registry[node.op]
        values[node.name], saved[node.name] = op.apply(*[values[name] for name in node.inputs], **node.attrs)

    output = output or graph.outputs[0]
    grads = {name: np.zeros_like(value) for name, value in values.items()}
    grads[output] = np.ones_like(values[output]) if seed is None else np.array(seed, dtype=float)
    for node in reversed(order):                          # backward: the chain rule, outputs first
        op = registry[node.op]
        parts = op.apply_vjp(grads[node.name], values[node.name], *[values[name] for name in node.inputs],
                             saved=saved[node.name], **node.attrs)
        for name, grad in zip(node.inputs, parts):
            if grad is not None:                          # None: that input has no gradient
                grads[name] += unbroadcast(grad, np.shape(values[name]))  # fan-out adds up
    return values, grads
