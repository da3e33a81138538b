"""A site: one place in a graph that a rule found and the pass may rewrite.

Rules (:mod:`convrewrite.rules`) make sites; the pass (:mod:`convrewrite.pipeline`) decides
and :mod:`convrewrite.emit` rewrites them. Neither end imports the other.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx


@dataclasses.dataclass
class Site:
    """One place to rewrite: ``node`` computes ``spec`` from ``x`` and ``params``.

    A site whose source is code rather than a form (a lifted loop) has ``source_seconds``;
    a form replaces it only if faster by the margin. A site found but not rewritable has no
    ``spec``, and a ``note`` that says why.

    ``params`` (weights, biases) are graph nodes, attribute paths on the graph module (for
    module parameters), or None. ``original`` names the form that reproduces the source.
    ``nodes`` are the nodes the site replaces besides ``node`` (erased with it).
    """

    node: fx.Node
    x: fx.Node
    params: tuple
    spec: object
    original: str
    pattern: str
    path: str
    nodes: tuple = ()
    note: str = ""
    source_seconds: float | None = None  # the source is code, not a form: how long it took
