"""Emit a chosen form into the graph, and check it against the original op first.

The emitted node is a ``call_module`` to a :class:`SiteCall`, a parameterless module that
holds the form and the spec: the graph reads ``self.convrewrite_site0(x, conv.weight, conv.bias)``
and the weights stay the user's parameters, read live through ``get_attr``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .forms import Form
from .rules import Site

_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class SiteCall(torch.nn.Module):
    """Calls ``form(x, w, b, spec=spec)``; the graph's handle on one rewritten site."""

    def __init__(self, form: Form, spec):
        super().__init__()
        self.form, self.spec = form, spec

    def forward(self, x, w, b):
        return self.form.fn(x, w, b, spec=self.spec)

    def extra_repr(self) -> str:
        return f"form={self.form.name!r}, spec={self.spec.key()!r}"


def verify(form: Form, original: Form, spec) -> str | None:
    """Run ``form`` and ``original`` on the same random inputs; return why they differ, or None."""
    x, w, b = spec.example_inputs(torch.Generator(spec.device).manual_seed(0))
    with torch.no_grad():
        expected, got = original(x, w, b, spec=spec), form(x, w, b, spec=spec)
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"form {form.name!r} returned {tuple(got.shape)} {got.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
    tol = _TOLERANCE.get(expected.dtype, 1e-4)
    err = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    if not err <= tol * max(scale, 1.0):
        return f"form {form.name!r} differs from {original.name!r} by {err:.3g} (tolerance {tol * max(scale, 1.0):.3g})"
    return None


def emit(gm: fx.GraphModule, site: Site, form: Form, name: str) -> fx.Node:
    """Replace ``site.node`` by a call of ``form`` registered on ``gm`` as submodule ``name``;
    return the new node."""
    gm.add_submodule(name, SiteCall(form, site.spec))
    graph = gm.graph
    with graph.inserting_before(site.node):
        w, b = (graph.get_attr(v) if isinstance(v, str) else v for v in (site.weight, site.bias))
        new = graph.call_module(name, (site.x, w, b))
    new.meta.update(site.node.meta)
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)
    return new
