"""Rules: each finds one source pattern in an annotated fx graph and yields :class:`Site` s.

Rules know how patterns look in graphs; nothing downstream does. Adding a pattern means
adding one rule module that emits an existing spec kind, and listing it in ``RULES``.
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


def rules() -> tuple:
    """The rules, in the order they run: a chain claims its 1x1 convs before the
    pointwise-conv rule sees them (if the chain is kept as written, that rule still may)."""
    from . import conv_loop, layout_chain, pointwise_conv

    return (conv_loop.find, layout_chain.find, pointwise_conv.find)


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every site of every rule in ``gm`` as it is now."""
    return [site for rule in rules() for site in rule(gm)]
