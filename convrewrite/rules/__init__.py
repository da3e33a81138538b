"""Rules: each finds one source pattern in an annotated fx graph and yields :class:`Site` s.

Rules know how patterns look in graphs; nothing downstream does. Adding a pattern means
adding one rule module (or package, as ``conv_loop``, which owns its analysis) that emits an
existing spec kind, and listing it in :func:`rules`. Importing this package imports every
rule, so what a rule registers with capture (:func:`~convrewrite.capture.register_opaque`)
is in place.
"""

from __future__ import annotations

import torch.fx as fx

from ..site import Site
from . import conv_loop, layout_chain, pointwise_conv


def rules() -> tuple:
    """The rules, in the order they run: a chain claims its 1x1 convs before the
    pointwise-conv rule sees them (if the chain is kept as written, that rule still may)."""
    return (conv_loop.find, layout_chain.find, pointwise_conv.find)


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every site of every rule in ``gm`` as it is now."""
    return [site for rule in rules() for site in rule(gm)]
