"""The dynamo backend: ``torch.compile(model, backend="convrewrite", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so the name resolves without
``import convrewrite``. Dynamo hands over a graph whose shapes live in
``node.meta["example_value"]``; :func:`annotate_from_meta` turns them into the annotations
the rules read, the pass rewrites the graph, and an inner compiler (inductor by default)
compiles the result. Sites with symbolic sizes are left alone, so the pass adds no guards.

Each site's choice comes from figures of the site alone, and inductor fuses across sites, so
with ``check`` (the default) the graph as dynamo gave it is compiled too (and, for inductor,
once more with ``conv_1x1_as_mm``), every compiled graph is timed on copies of the example
inputs (with the cache flushed between calls), and the fastest runs if it wins by the
check's margin and by ``FRAME_S`` per call; otherwise inductor's own compile runs. Where the pass turned more than ``UNROLLED`` ops of unrolled loops into
convolutions, the graph as dynamo gave it is not compiled: that compile is what takes
inductor minutes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import META, TensorInfo
from .check import FRAME_S, ORIGINAL, REWRITTEN, compiled_times, fastest
from .kinds.channel_mix import ChannelMixSpec
from .kinds.conv import ConvSpec
from .options import Options
from .pipeline import rewrite

log = logging.getLogger(__name__)
INNER = ("inductor", "eager")
CONV_1X1_AS_MM = {"conv_1x1_as_mm": True}
# Loops that unrolled into more ops than this are not compiled as written: inductor took
# 17 s on a 148-op per-pixel loop and 130 s on a 1605-op one (2-core CPU).
UNROLLED = 256


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
    """Rewrite a dynamo graph, compile it with the inner compiler, and (with ``check``) run the
    fastest of it and the graph as dynamo gave it (also with inductor's 1x1-as-mm lowering)."""
    pass_options, inner = parse_options(options)
    compiled = compile_graph(gm, example_inputs, pass_options, inner, mode)
    return compiled.only or compiled


def compile_graph(gm: fx.GraphModule, example_inputs, pass_options: Options, inner, mode: str | None = None
                  ) -> "FastestCompiled":
    """The backend's work on one dynamo graph: rewrite it, compile it and its variants with
    ``inner``; the result runs the fastest of them and holds the report."""
    annotate_from_meta(gm)
    original = _graph_copy(gm) if pass_options.check else None
    report = rewrite(gm, pass_options, executor="inductor" if inner == "inductor" else "eager")
    lifted = _lifted_ops(original, gm, report) if original is not None else 0
    if lifted > UNROLLED:
        report = report.noted(f"the graph as dynamo gave it is not compiled: {lifted} ops of unrolled loops "
                              "became convolutions")
        original = None
    variants = _variants(original, gm, report, inner)
    compiled = {name: _compile(inner, graph, example_inputs, mode, patches) for name, (graph, patches) in variants.items()}
    params = {id(p): p for p in (*example_inputs, *gm.parameters()) if isinstance(p, nn.Parameter) and p.requires_grad}
    return FastestCompiled(compiled, report, list(params.values()))


class FastestCompiled:
    """Runs the fastest of several compiled graphs of one dynamo graph, timed side by side on
    (copies of) the first call's inputs: at run time, not inside dynamo's compile, where a
    backward that aot_autograd compiles on first use cannot be compiled. The graph as dynamo
    gave it runs unless another is faster by the check's margin and by ``FRAME_S`` per call.
    ``report``: the pass's report, with the times and the choice once made; ``only``: the one
    compiled graph, where there was nothing to choose between (it is returned to dynamo
    itself, with no wrapper around its calls)."""

    def __init__(self, compiled: dict[str, Callable], report, params: list):
        self.compiled, self.report, self._params = compiled, report, params
        self._run = self.only = None
        self._lock = threading.Lock()
        if len(compiled) == 1:  # nothing to choose between: this graph runs
            (name, self.only), = compiled.items()
            self._run, self.report = self.only, report.running(name)
            log.info("%s", self.report)

    def __call__(self, *args):
        if self._run is None:
            with self._lock:
                if self._run is None:
                    self._run = self.compiled[self._choose(args)]
        return self._run(*args)

    def _choose(self, args) -> str:
        times = compiled_times(self.compiled, list(args), self._params)
        chosen = fastest(times, slack_s=FRAME_S)
        self.report = self.report.noted("compiled graphs on these inputs: " + ", ".join(
            f"{name} {t * 1e3:.3f} ms" for name, t in times.items())).running(chosen)
        if chosen != REWRITTEN and self.report.rewritten:
            self.report = self.report.kept_original(f"kept original: {chosen} ran faster")
        log.info("%s", self.report)
        return chosen


def _lifted_ops(original: fx.GraphModule, rewritten: fx.GraphModule, report) -> int:
    """How many ops fewer the rewritten graph has for its lifted loops (0 if none was lifted:
    a lifted loop is a site that computes a :class:`ConvSpec`)."""
    if not any(s.kind == ConvSpec.kind for s in report.rewritten):
        return 0
    return len(original.graph.nodes) - len(rewritten.graph.nodes)


def _variants(original: fx.GraphModule | None, rewritten: fx.GraphModule, report, inner) -> dict:
    """The graphs to compile, name -> (graph, inductor config patches): the rewritten graph,
    and unless ``original`` is None that graph too, and for inductor once more with 1x1 convs
    lowered to matmuls where there are pointwise convs (sites that compute a
    :class:`ChannelMixSpec`; often, not always, faster)."""
    if original is None:
        return {REWRITTEN: (rewritten, {})}
    variants = {ORIGINAL: (original, {})}
    if inner == "inductor" and any(s.kind == ChannelMixSpec.kind for s in report):
        variants[f"{ORIGINAL}-1x1mm"] = (_graph_copy(original), CONV_1X1_AS_MM)
    if report.rewritten:
        variants[REWRITTEN] = (rewritten, {})
    return variants


def _compile(inner, gm: fx.GraphModule, example_inputs, mode: str | None, patches: dict) -> Callable:
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs, config_patches={**(list_mode_options(mode) if mode else {}), **patches})
    return inner(gm, example_inputs)


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph (compilers may change the graph they get)."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))
