"""A site: one place in a graph that a rule found and the pass may rewrite.

Rules (:mod:`convrewrite.rules`) make sites; the pass (:mod:`convrewrite.pipeline`) decides
and :mod:`convrewrite.emit` rewrites them. Neither end imports the other.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from typing import Callable, Hashable

import torch.fx as fx


@dataclasses.dataclass
class Site:
    """One place to rewrite: ``node`` computes ``spec`` from ``x`` and ``params``.

    A site whose source is code rather than a form (a lifted loop) is :attr:`from_code`: it
    has the seconds its first call took, if seen (``source_seconds``), and a way to time it
    (``source_runner()``: a context in which a call runs the code once on random operands;
    sites with equal ``source_key`` share one timing). The pass times it; a form replaces it
    only if faster by the margin. A site found but not rewritable has no ``spec``, and a
    ``note`` that says why.

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
    source_seconds: float | None = None  # the source is code: its first call's seconds
    source_runner: Callable[[], AbstractContextManager[Callable[[], object]]] | None = None
    source_key: Hashable = None

    @property
    def from_code(self) -> bool:
        """Whether the source is code rather than a form (a loop lifted to one conv)."""
        return self.source_runner is not None or self.source_seconds is not None
