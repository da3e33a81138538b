"""The dynamo backend: ``torch.compile(model, backend="convrewrite", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so the name resolves without
``import convrewrite``. Dynamo hands over a graph whose shapes live in
``node.meta["example_value"]``; :func:`annotate_from_meta` turns them into the annotations
the rules read, the pass rewrites the graph, and an inner compiler (inductor by default)
compiles the result. Sites with symbolic sizes are left alone, so the pass adds no guards.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
import torch.fx as fx

from .capture import META, TensorInfo
from .options import Options
from .passes import rewrite

log = logging.getLogger(__name__)
INNER = ("inductor", "eager")


def annotate_from_meta(gm: fx.GraphModule) -> None:
    """Annotate every node whose ``example_value`` is a tensor of concrete (non-symbolic) size."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor) and value.layout == torch.strided and _concrete(value):
            node.meta[META] = TensorInfo.of(value)


def _concrete(t: torch.Tensor) -> bool:
    return all(isinstance(v, int) for v in (*t.shape, *t.stride()))


def parse_options(options: dict | None) -> tuple[Options, Callable | str]:
    """Split backend options into the pass's :class:`Options` and the inner compiler."""
    options = dict(options or {})
    inner = options.pop("inner", "inductor")
    valid = ["inner", *(f.name for f in dataclasses.fields(Options))]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown convrewrite backend option(s) {unknown}; valid options: {valid}")
    if not (callable(inner) or inner in INNER):
        raise ValueError(f"inner must be one of {INNER} or a callable (gm, example_inputs) -> callable, got {inner!r}")
    return Options(**options), inner


def convrewrite_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Rewrite pointwise convs in a dynamo graph, then compile it with the inner compiler."""
    pass_options, inner = parse_options(options)
    annotate_from_meta(gm)
    report = rewrite(gm, pass_options, executor="inductor" if inner == "inductor" else "eager")
    log.info("%s", report)
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)
    return inner(gm, example_inputs)
