"""Emit a chosen form into the graph, and check it against the original op first.

The emitted node is a ``call_function`` of a :class:`SiteCall`, the form bound to its spec:
the graph reads ``convrewrite_site0(x, getattr(self.conv, "weight"), ...)`` and the weights
stay the user's parameters, read live from their modules. A plain callable, not a submodule:
an ``nn.Module`` call costs microseconds of hook bookkeeping per site and call.
"""

from __future__ import annotations

import collections
import threading

import torch
import torch.fx as fx

from .capture import info, rebuilds_container
from .device import generator
from .forms import Form
from .site import Site

_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class SiteCall:
    """Calls ``form(x, *params, spec=spec)``; the graph's handle on one rewritten site.
    ``__name__`` is the name the graph's code gives it."""

    def __init__(self, form: Form, spec, name: str):
        self.form, self.spec, self.__name__ = form, spec, name
        self._fn = form.fn

    def __call__(self, x, *params):
        return self._fn(x, *params, spec=self.spec)

    def __repr__(self) -> str:
        return f"SiteCall({self.__name__}, form={self.form.name!r}, spec={self.spec.key()!r})"


def site_calls(gm: fx.GraphModule) -> list[SiteCall]:
    """The rewritten sites of ``gm``, in graph order."""
    return [n.target for n in gm.graph.nodes if isinstance(n.target, SiteCall)]


VERIFIED_KEPT = 1024  # verdicts remembered, the least recently used dropped first
_verified: collections.OrderedDict[tuple, str | None] = collections.OrderedDict()
_verified_lock = threading.Lock()  # specialisations may run in several threads at once


def verify(form: Form, original: Form, spec) -> str | None:
    """Run ``form`` and ``original`` on the same random inputs, forward and (if ``spec.grad``)
    backward; return why they differ, or None. Results are cached per forms' sources and spec
    (the last ``VERIFIED_KEPT``)."""
    key = (form.name, form.source_hash, original.source_hash, spec.key())
    with _verified_lock:
        if key in _verified:
            _verified.move_to_end(key)
            return _verified[key]
    problem = _compare(form, original, spec)
    with _verified_lock:
        _verified[key] = problem
        if len(_verified) > VERIFIED_KEPT:
            _verified.popitem(last=False)
    return problem


def _compare(form: Form, original: Form, spec) -> str | None:
    args = spec.example_inputs(generator(spec.device, 0))
    inputs = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    with torch.set_grad_enabled(spec.grad):
        expected, got = original(*args, spec=spec), form(*args, spec=spec)
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"form {form.name!r} returned {tuple(got.shape)} {got.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
    pairs = [("output", got, expected)]
    if spec.grad:
        grad_out = torch.randn(expected.shape, generator=generator(spec.device, 1),
                               dtype=expected.dtype, device=expected.device)
        got_grads = torch.autograd.grad(got, inputs, grad_out)
        want_grads = torch.autograd.grad(expected, inputs, grad_out)
        pairs += [(f"gradient {i}", g, e) for i, (g, e) in enumerate(zip(got_grads, want_grads, strict=True))]
    for what, g, e in pairs:
        problem = _mismatch(g, e)
        if problem:
            return f"form {form.name!r} {what} differs from {original.name!r}'s by {problem}"
    return None


def _mismatch(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    tol = _TOLERANCE.get(expected.dtype, 1e-4)
    if not got.numel():
        return None
    err = (got.double() - expected.double()).abs().max().item()
    bound = tol * max(expected.double().abs().max().item(), 1.0)
    return None if err <= bound else f"{err:.3g} (tolerance {bound:.3g})"


def _read_attribute(graph: fx.Graph, path: str) -> fx.Node:
    """``getattr(module, name)`` at run time, so parametrized weights are computed as the
    module's own forward computes them."""
    owner, name = path.rsplit(".", 1)
    return graph.call_function(getattr, (graph.get_attr(owner), name))


def emit(gm: fx.GraphModule, site: Site, form: Form, name: str) -> fx.Node:
    """Replace ``site.node`` by a call of ``form`` named ``name`` in the graph's code, placed
    after the last of the site's nodes (a region of unrolled code may keep writing to its
    output after making it); return the new node."""
    graph = gm.graph
    with graph.inserting_before(max((site.node, *site.nodes)).next):
        params = tuple(_read_attribute(graph, v) if isinstance(v, str) else v for v in site.params)
        new = graph.call_function(SiteCall(form, site.spec, name), (site.x, *params))
    new.meta.update(site.node.meta)
    site.node.replace_all_uses_with(new)
    for node in (site.node, *reversed(site.nodes)):
        graph.erase_node(node)
    return new


def keep_output_strides(gm: fx.GraphModule) -> None:
    """Each tensor ``gm`` returns, with the strides it had as written: a form may return its
    values in another layout (a channels-first conv for a chain whose permute back made a
    channels-last view), and the caller sees the original's layout. A copy is made only where
    the strides differ."""
    _restride_arguments(gm.graph, next(n for n in reversed(gm.graph.nodes) if n.op == "output"))


def _restride_arguments(graph: fx.Graph, consumer: fx.Node) -> None:
    """``consumer``'s tensor arguments with their strides as written, into the containers
    (dicts, lists, namedtuples, dataclasses) it returns."""
    def restrided(node: fx.Node) -> fx.Node:
        if rebuilds_container(node):
            _restride_arguments(graph, node)
            return node
        annotation = info(node)
        if annotation is None:
            return node
        with graph.inserting_before(consumer):
            kept = graph.call_function(with_strides, (node, annotation.stride))
        kept.meta.update(node.meta)
        return kept
    consumer.args = fx.node.map_arg(consumer.args, restrided)
    consumer.kwargs = fx.node.map_arg(consumer.kwargs, restrided)


def with_strides(y: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``y`` with ``stride``: itself where its strides are those, a view where they differ only
    in dimensions of size 1 (no element is reached through those: the same memory layout, a
    few microseconds cheaper than a copy), else a copy."""
    own = y.stride()
    if own == stride:
        return y
    if all(size == 1 or a == b for size, a, b in zip(y.shape, own, stride)):
        return y.as_strided(y.shape, stride)
    return torch.empty_strided(y.shape, stride, dtype=y.dtype, device=y.device).copy_(y)
