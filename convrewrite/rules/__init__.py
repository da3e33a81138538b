"""Rules: each finds one source pattern in an annotated fx graph and yields :class:`Site` s.

Rules know how patterns look in graphs; nothing downstream does. Adding a pattern means
adding one rule module that emits an existing spec kind, and listing it in ``RULES``.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx


@dataclasses.dataclass
class Site:
    """One place to rewrite: ``node`` computes ``spec`` from (x, weight, bias).

    ``weight``/``bias`` are graph nodes, attribute paths on the graph module (for module
    sites), or None. ``original`` names the form that reproduces the source op.
    """

    node: fx.Node
    x: fx.Node
    weight: fx.Node | str
    bias: fx.Node | str | None
    spec: object
    original: str
    pattern: str
    path: str


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every site of every rule in ``gm``."""
    from . import pointwise_conv

    rules = (pointwise_conv.find,)
    return [site for rule in rules for site in rule(gm)]
