"""Front door: ``optimize(model)`` and ``explain(model, *inputs)``."""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .module import ConvRewriteModule
from .options import Options
from .report import Report


def optimize(model: nn.Module, example_inputs=None, **options) -> ConvRewriteModule:
    """Return ``model`` running each of its rewritable sites in the fastest equal form on this
    device: pointwise convs (``Conv*d(kernel_size=1)``, ``F.conv*``, ``Linear`` between
    transposes), channel-wise chains between a permute and its inverse, and convolutions
    written as code (loops over taps or pixels, unfold + multiply + sum). A form replaces the
    original only where verified equal and measurably faster, and the whole rewritten graph
    only where it beats the model's own forward; otherwise the original runs.

    The model is captured with ``torch.fx``; where fx cannot trace it or bind the call
    (``**kwargs`` forwards as in transformers, data-dependent Python, untraceable children
    holding convs or linears), with dynamo, as ``torch.compile`` would. Outputs keep their
    types (ModelOutput, dataclasses, namedtuples, dicts).

    Without ``example_inputs`` the model specialises on its first call, for that call's input
    signature (shapes, dtypes, devices, layouts, grad mode), and again whenever a new signature
    arrives; with them (a tuple of positional arguments, or one tensor) it specialises now.
    The result shares ``model``'s parameters, so ``state_dict()`` is unchanged and ``model``
    itself keeps working. Options: keywords, or an :class:`convrewrite.Options` in place of
    ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"convrewrite.optimize expects a torch.nn.Module, got {type(model).__name__}; "
            "wrap a function in an nn.Module, or use torch.compile(fn, backend='convrewrite')")
    if isinstance(model, ConvRewriteModule):
        model = model.original
    if isinstance(example_inputs, Options):  # optimize(model, Options(...)): options, not an input
        if options:
            raise TypeError("convrewrite.optimize: give options as an Options or as keywords, not both")
        example_inputs, options = None, dataclasses.asdict(example_inputs)
    optimized = ConvRewriteModule(model, Options.from_kwargs(**options))
    if example_inputs is not None:
        optimized.specialize(*_as_args(example_inputs))
    return optimized


def explain(model: nn.Module, *example_inputs, **options) -> Report:
    """Report what ``optimize`` does to ``model`` on these inputs, site by site.

    For a module returned by :func:`optimize`, its own specialisation for these inputs (made
    now if it has none, as a call would make it: ``model.reports`` then lists it).
    ``print(report)`` shows each site's choice; ``print(report.candidates())`` every
    candidate's figure and why it won or lost.
    """
    if isinstance(model, ConvRewriteModule) and not options:
        return model.specialize(*example_inputs)
    return optimize(model, **options).specialize(*example_inputs)


def _as_args(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
