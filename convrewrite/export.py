"""The pass on a ``torch.export`` program: an ``ExportedProgram`` in, an equal one out.

``torch.export`` and AOTInductor deploy an ``ExportedProgram``, which neither ``optimize()``
nor the dynamo backend reaches. Its module (``ep.module()``: ATen ops over the program's
parameters) has the ops the rules read renamed to the torch functions of the same signature
(``aten.conv2d.default`` -> ``torch.conv2d``, ``aten.linear.default`` -> ``F.linear``, ...),
is annotated by a run on the program's example inputs, rewritten by the pass, and exported
again: the chosen forms are ATen ops of the new program, which AOTInductor compiles as any
other. Programs with dynamic dimensions are returned as they are (the figures are per size).

With ``check`` (the default) the rewritten program is kept only if it runs faster than the
program as exported on its example inputs (inference), both compiled by inductor for the
inductor executor: each site's figures are of the site alone, and inductor fuses across sites
(the compiled rewrite of a MobileNetV2 block the figures favoured ran 2x the time of AOTInductor's
own compile). That costs two inductor compiles, once, before the program is packaged.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .capture import annotate
from .check import judged, whole_graph_times
from .options import Options
from .pipeline import rewrite
from .report import Report

aten = torch.ops.aten
# ATen ops the rules read, and the torch function with the same signature and meaning
_TORCH_OF = {
    aten.conv1d.default: torch.conv1d, aten.conv2d.default: torch.conv2d, aten.conv3d.default: torch.conv3d,
    aten.linear.default: F.linear, aten.permute.default: torch.permute, aten.transpose.int: torch.transpose,
    aten.relu.default: torch.relu, aten.gelu.default: F.gelu, aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh, aten.silu.default: F.silu, aten.mul.Tensor: torch.mul, aten.add.Tensor: torch.add,
    aten.layer_norm.default: F.layer_norm,  # its sixth argument, cudnn_enable, is dropped (CPU and CUDA ignore it)
}
_ARITY = {aten.layer_norm.default: 5}
EXECUTORS = ("inductor", "eager")


def rewrite_exported(ep: torch.export.ExportedProgram, *, executor: str = "inductor", **options
                     ) -> tuple[torch.export.ExportedProgram, Report]:
    """``ep`` with each rewritable site in its fastest equal form for ``executor``
    (``"inductor"``: figures measured under inductor, as AOTInductor compiles the program;
    ``"eager"``: as ``ep.module()`` runs), and the pass's report. Decided on the program's
    example inputs, for inference (under ``torch.no_grad``, whatever the caller's grad mode);
    every rewritten site verified against its original there, and (with ``check``) the whole
    program timed against the program as exported. ``options``: see
    :class:`convrewrite.Options`."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    pass_options = Options.from_kwargs(**options)
    if ep.example_inputs is None:
        raise ValueError("the program holds no example inputs to decide on; export it with torch.export.export")
    if _dynamic(ep):
        return ep, Report(note="not rewritten: the program has dynamic dimensions, and figures are per size")
    args, kwargs = ep.example_inputs
    gm = ep.module()
    _as_torch_functions(gm)
    with torch.no_grad():  # decided for inference, as AOTInductor runs the program, whatever the caller's grad mode
        annotate(gm, tuple(pytree.tree_leaves((args, kwargs))))
        report = rewrite(gm, pass_options, executor=executor)
    if report.rewritten and pass_options.check:
        report = _checked(report, ep, gm, executor)
    if not report.rewritten:
        return ep, report
    return torch.export.export(gm, args, kwargs), report


def _checked(report: Report, ep: torch.export.ExportedProgram, gm: fx.GraphModule, executor: str) -> Report:
    """``report``, or its sites back on their originals where the rewritten program ``gm`` is
    not clearly faster than ``ep`` as exported (both compiled by inductor for its executor)."""
    original, rewritten = ep.module(), gm
    if executor == "inductor":
        original, rewritten = torch.compile(original), torch.compile(rewritten)
    args, kwargs = ep.example_inputs
    with torch.no_grad():  # AOTInductor compiles the program for inference
        times = whole_graph_times(original, rewritten, gm, args, kwargs)
    what = "whole program, compiled by inductor" if executor == "inductor" else "whole program"
    return judged(report, times, what, original="as exported")


def _dynamic(ep: torch.export.ExportedProgram) -> bool:
    return any(not isinstance(d, int) for node in ep.graph.nodes if node.op == "placeholder"
               and isinstance(node.meta.get("val"), torch.Tensor) for d in node.meta["val"].shape)


def _as_torch_functions(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _TORCH_OF:
            node.args = node.args[:_ARITY.get(node.target, len(node.args))]
            node.target = _TORCH_OF[node.target]
    gm.recompile()
