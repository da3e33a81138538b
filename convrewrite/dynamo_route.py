"""optimize()'s second capture: through dynamo, for modules ``symbolic_trace`` cannot capture.

Hugging Face models take ``**kwargs``, branch on their inputs and build their outputs as
``ModelOutput`` objects; timm and torchvision blocks compute sizes in Python. fx cannot trace
such a forward, and a module it cannot trace hides every site inside it. Dynamo can: it
splits the forward into graphs at what it cannot capture, guards each on what it assumed,
and rebuilds the outputs itself. So the module's forward is compiled with the pass as the
backend and the eager executor: each graph dynamo captures is rewritten, verified and
checked against itself as captured (:func:`convrewrite.backend.compile_graph`), and runs as
plain torch ops, gradients included.

Dynamo keeps at most ``recompile_limit`` (8) graphs per code object, and then runs the frame
as written for good. Every input length is a signature of its own, and transformers models
all share their decorators' code, so each optimized module compiles into its own entries
(``isolate_recompiles``, torch >= 2.13) with room for every signature it keeps; on older
torch the limit is raised while a signature is captured.

Dynamo's frame costs some microseconds a call, and graph breaks cost more: a call signature
keeps the compiled forward only if that, timed warm against the module's own forward, wins
by the check's margin (:mod:`convrewrite.check`); otherwise, and wherever no graph was
rewritten, the module's own forward runs with no dynamo at all.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import threading
from typing import Callable

import torch
import torch.nn as nn

from . import distributed
from .backend import FastestCompiled, compile_graph
from .check import GraphFigures, judged_once, whole_graph_times
from .options import Options
from .report import Report
from .rules._fx import dotted

RECOMPILE_LIMIT = 64  # graphs per frame of one optimized module: one per signature it keeps
_ISOLATES = "isolate_recompiles" in inspect.signature(torch.compile).parameters


class DynamoRoute:
    """The compiled forward of one module, and what its first call under each signature decided."""

    def __init__(self, module: nn.Module, options: Options):
        self.module, self.options = module, options
        isolated = {"isolate_recompiles": True, "recompile_limit": RECOMPILE_LIMIT} if _ISOLATES else {}
        self._compiled = torch.compile(module.forward, backend=self._backend, dynamic=False, **isolated)
        self._new: list[FastestCompiled] = []  # graphs compiled during the call being specialised
        self._codes: list[str] = []  # and their code as dynamo gave it
        self._lock = threading.RLock()

    def specialize(self, args: tuple, kwargs: dict, signature: str) -> tuple[Callable, Report, object]:
        """Run the compiled forward once on these arguments (dynamo captures and the pass
        rewrites what this call reaches), check it and say what runs from now on: the
        callable, its report, and this call's output."""
        with self._lock:
            self._new, self._codes = [], []
            with _room_to_recompile():
                output = self._compiled(*args, **kwargs)
            report = _merged([c.report for c in self._new], signature)
        if not report.rewritten:
            return self.module.forward, report, output
        if self.options.check:
            report = self._checked_once(report, args, kwargs)
        return (self._compiled if report.rewritten else self.module.forward), report, output

    def _checked_once(self, report: Report, args: tuple, kwargs: dict) -> Report:
        """The check's verdict; in a job of several processes that trains, rank 0's (see
        :mod:`convrewrite.distributed`)."""
        if not (distributed.training(self.module.parameters()) and self.module.training):
            return self._checked(report, args, kwargs)
        topic = (f"dynamo route {type(self.module).__qualname__} {report.signature} {self.options} "
                 f"{[(s.path, s.key, s.chosen) for s in report]}")
        checked = distributed.decided_once(topic, lambda: self._checked(report, args, kwargs))
        if checked is None:
            return report.kept_original(f"kept original: rank {distributed.DECIDING_RANK} could not check")
        return checked if distributed.deciding() else checked.noted(
            f"forms and figures as decided by rank {distributed.DECIDING_RANK}")

    def _backend(self, gm, example_inputs):
        self._codes.append(gm.code)
        compiled = compile_graph(gm, example_inputs, self.options, "eager")
        compiled.report = compiled.report.under(self._frame_path(gm, example_inputs))
        self._new.append(compiled)
        return compiled.only or compiled

    def _frame_path(self, gm, example_inputs) -> str:
        """The path, in the optimized module, of the module whose frame dynamo captured ``gm``
        from ("" for the module's own forward). Dynamo names what a frame reads from its own
        ``self``: after a graph break inside a submodule, every site would be named as if that
        submodule were the root. A parameter the graph reads tells which module it is (the
        first one dynamo compiled the graph for, where several share its code)."""
        names = {id(t): n for n, t in itertools.chain(self.module.named_parameters(remove_duplicate=False),
                                                      self.module.named_buffers(remove_duplicate=False))}
        for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
            name, grapharg = names.get(id(value)), node.meta.get("grapharg")
            if name is None or grapharg is None:
                continue
            source = grapharg.source.name
            local = dotted(source() if callable(source) else source)
            if name == local or name.endswith(f".{local}"):
                return name[:len(name) - len(local)].rstrip(".")
        return ""

    def _checked(self, report: Report, args: tuple, kwargs: dict) -> Report:
        figures = GraphFigures.of("dynamo route", (args, kwargs), report, "\n".join(self._codes), self.module)
        return judged_once(report, figures, lambda: whole_graph_times(
            self.module.forward, self._compiled, self.module, args, kwargs), "whole model through dynamo")


def _room_to_recompile():
    """Where ``torch.compile`` cannot isolate a module's entries, the recompile limit raised
    while a signature is captured (entries of every module that shares the code count)."""
    if _ISOLATES:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT))


def _merged(reports: list[Report], signature: str) -> Report:
    """One report for the graphs a call compiled (each already says which of its compiled
    variants runs, and keeps its sites' originals where the rewritten one does not)."""
    if not reports:
        return Report(signature=signature, note="captured by dynamo: no new graph (it reuses graphs already "
                                                "compiled, or dynamo ran the forward as written)")
    notes = [f"captured by dynamo: {len(reports)} graph(s)", *(r.note for r in reports if r.note)]
    return Report(tuple(s for r in reports for s in r.sites), signature, "\n".join(notes))
