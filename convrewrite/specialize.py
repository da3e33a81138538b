"""Building a specialisation: what runs for one input signature of an optimized module.

:class:`Specializer` captures the module with fx (sizes folded to the signature's), rewrites
and checks the graph, or captures through dynamo where fx cannot
(:mod:`convrewrite.dynamo_route`), and falls back to the original with one warning naming
the reason. :class:`~convrewrite.module.ConvRewriteModule` caches what it builds per signature.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import time
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from . import distributed
from .capture import (ROOT, CaptureError, annotate, autocast_state, capture, fold_sizes, hidden_sites,
                      opaque_root)
from .check import GraphFigures, judged_once, whole_graph_times
from .decide import CONTENDED
from .dynamo_route import DynamoRoute
from .hooks import has_hooks, own_hooks
from .options import Options
from .pipeline import rewrite
from .report import Report
from .warn import warn_user

NOT_RUN = object()  # a build's output where building did not run the call
# a specialisation decided from figures taken under load is decided again this long after (in
# seconds; doubled at each try, at most RETRIES tries): a busy first call must not fix a choice
# for the rest of the process
RETRY_S, RETRIES = 2.0, 4
_now = time.monotonic


@dataclasses.dataclass
class Specialization:
    """What runs for one input signature, and its report: the rewritten graph ``gm`` (called
    with forward's arguments in order), else the ``compiled`` forward (called as forward is),
    else (both None) the original's own forward."""

    gm: fx.GraphModule | None
    report: Report
    watched: tuple[nn.Module, ...] = ()  # rewritten modules: a hook added to one invalidates the graph
    compiled: Callable | None = None
    retry_at: float | None = None  # the monotonic time after which it is decided again (see RETRY_S)
    guarded: bool = dataclasses.field(init=False)  # whether stale() can be true: the hot path asks only then

    def __post_init__(self):
        self.guarded = bool(self.watched) or self.retry_at is not None

    def stale(self) -> bool:
        return (self.retry_at is not None and _now() > self.retry_at) or any(own_hooks(m) for m in self.watched)


def describe(args) -> str:
    """A short human-readable form of the tensor arguments' shapes and dtypes."""
    return ", ".join(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in args if isinstance(a, torch.Tensor))


class Specializer:
    """Builds specialisations of ``original`` (whose forward has ``signature``; ``inlined``:
    the modules whose forward fx traces through). It keeps the graphs traced per pattern of
    None/bool arguments, the reasons already warned about and the dynamo route."""

    def __init__(self, original: nn.Module, options: Options, signature: inspect.Signature,
                 inlined: tuple[nn.Module, ...]):
        self.original, self.options, self.signature, self.inlined = original, options, signature, inlined
        self.traces: dict = {}  # concrete (None/bool) arguments and training flags -> graph or error
        self.warned: set = set()
        self.dynamo: DynamoRoute | None = None  # made at the first signature fx cannot capture
        self.tries: collections.Counter = collections.Counter()  # decisions made under load, per call signature

    def build(self, flat: tuple):
        """Capture (once per pattern of None/bool arguments), annotate by running the graph
        once on these inputs (its output is this call's), and rewrite."""
        signature = describe(flat)
        if autocast_state():
            return self._under_autocast(signature), NOT_RUN
        traced = self._trace(flat)
        hidden = {} if isinstance(traced, str) else hidden_sites(traced)
        if isinstance(traced, str) or hidden:  # dynamo sees into what fx cannot trace
            why = traced if isinstance(traced, str) else "; ".join(
                w if path == ROOT else f"{path}: {w}" for path, w in hidden.items())
            return self.through_dynamo(*_as_call(self.signature, flat), untraced=why)
        try:
            gm = _sharing_graph_module(traced, self.original)
            output = annotate(gm, flat)
            fold_sizes(gm)
        except Exception as e:  # the original reports the user's own error, if it is one
            return self._fallen_back(signature, "the captured graph failed on these inputs", e), NOT_RUN
        why = opaque_root(traced)
        try:
            report = self._rewritten(gm, flat, Report((), signature, f"not traced: {why}" if why else ""))
        except Exception as e:  # a failure of the pass never reaches the user: this call's output stands
            return self._fallen_back(signature, "rewriting failed", e), output
        delay = self._retry_in(report)
        retry_at = None if delay is None else _now() + delay
        if delay is not None:
            report = report.noted(f"decided under load from other processes: decided again in {delay:g} s")
        if not report.rewritten:  # nothing gained: the original's own forward is the cheapest to call
            if why and not report.sites and why not in self.warned:  # a site found and kept says why itself
                self.warned.add(why)
                warn_user(f"convrewrite: {type(self.original).__name__} runs unchanged: {why}")
            return Specialization(None, report, retry_at=retry_at), output
        watched = tuple(m for m in (_submodule(self.original, s.path) for s in report.rewritten) if m is not None)
        return Specialization(gm, report, watched, retry_at=retry_at), output

    def _retry_in(self, report: Report) -> float | None:
        """In how many seconds to decide these inputs again, where this decision rests on
        figures taken under load (None otherwise, after ``RETRIES`` tries, and where a job of
        several processes trains: its ranks run rank 0's decision, which one rank alone must
        not change)."""
        if not _under_load(report) or distributed.training(self.original.parameters()) and self.original.training:
            return None
        signature = (report.signature, torch.is_grad_enabled(), self.original.training)
        tries = self.tries[signature]
        if tries >= RETRIES:
            return None
        self.tries[signature] += 1
        return RETRY_S * 2 ** tries

    def _rewritten(self, gm: fx.GraphModule, flat: tuple, head: Report) -> Report:
        """Rewrite ``gm`` and check it; in a job of several processes training (grad enabled,
        the model in training mode), only rank 0 decides (see :mod:`convrewrite.distributed`)
        and the others take its decisions. Evaluation decides per rank: it is often run on one
        rank alone, where waiting for the others would last the process group's timeout.
        ``head`` carries the signature and the note."""
        if not (distributed.training(self.original.parameters()) and self.original.training):
            return self._decided_here(gm, flat, head)
        topic = f"optimize {type(self.original).__qualname__} {head.signature} {self.options}\n{gm.code}"
        decided = distributed.decided_once(topic, lambda: self._decided_here(gm, flat, head))
        if distributed.deciding():
            return decided
        if decided is None:
            return head.noted(f"rank {distributed.DECIDING_RANK} could not decide: the original runs on every rank")
        sites = rewrite(gm, self.options, decided=decided).sites
        return dataclasses.replace(head, sites=sites).noted(f"forms as decided by rank {distributed.DECIDING_RANK}")

    def _decided_here(self, gm: fx.GraphModule, flat: tuple, head: Report) -> Report:
        captured = gm.code
        report = dataclasses.replace(head, sites=rewrite(gm, self.options).sites)
        if report.rewritten and self.options.check:
            report = self._checked(report, gm, flat, captured)
        return report

    def through_dynamo(self, args: tuple, kwargs: dict, untraced: str = ""):
        """Capture through dynamo (see :mod:`convrewrite.dynamo_route`), running this call;
        ``untraced``: why fx could not capture it, for the report."""
        signature = describe((*args, *kwargs.values()))
        if autocast_state():
            return self._under_autocast(signature), NOT_RUN
        if self.dynamo is None:
            self.dynamo = DynamoRoute(self.original, self.options)
        try:
            compiled, report, output = self.dynamo.specialize(args, kwargs, signature)
        except Exception as e:  # the original reports the user's own error, if it is one
            return self._fallen_back(signature, "capture through dynamo failed", e), NOT_RUN
        report = report.noted(f"not traced by fx: {untraced}") if untraced else report
        if _under_load(report):  # dynamo keeps what it compiled: deciding again means compiling again
            report = report.noted("decided under load from other processes: through dynamo, not decided again")
        return Specialization(None, report, compiled=compiled if report.rewritten else None), output

    def _under_autocast(self, signature: str) -> Specialization:
        """The original, for calls under ``torch.autocast``: the forms are verified in one
        dtype, and autocast runs some of their ops in another (a matmul in bfloat16, the bias
        added to it in float32), so a rewrite could change the output's dtype."""
        why = "calls under torch.autocast run the original: its forms are verified without autocast"
        if why not in self.warned:
            self.warned.add(why)
            warn_user(f"convrewrite: {why} ({type(self.original).__name__})")
        return Specialization(None, Report(signature=signature, note=f"not rewritten: {why}"))

    def _fallen_back(self, signature: str, what: str, error: Exception) -> Specialization:
        """The original, for these inputs, with one warning naming the real reason."""
        why = f"{what} ({type(error).__name__}: {error})"
        warn_user(f"convrewrite: {why}; these inputs run through the original module "
                  f"({type(self.original).__name__})")
        return Specialization(None, Report(signature=signature, note=f"not rewritten: {why}"))

    def _checked(self, report: Report, gm: fx.GraphModule, flat: tuple, captured: str) -> Report:
        """``report``, or its sites back on their originals if the whole rewritten graph is
        not clearly faster than the model's own forward on these inputs (as timed here, or
        by an earlier process on this machine: ``captured`` is the graph's code before the
        rewrite)."""
        if any(has_hooks(m) for m in self.original.modules()):  # timing would run them again and again
            return report.noted("whole graph not checked: the model has hooks")
        figures = GraphFigures.of("optimize", flat, report, f"{captured}\n{gm.code}", self.original)
        return judged_once(report, figures, lambda: whole_graph_times(
            _positional(self.original.forward, self.signature), gm.forward, self.original, flat), "whole model")

    def _trace(self, flat: tuple) -> fx.GraphModule | str:
        """The captured graph for this pattern of None/bool arguments and training flags, or
        why fx could not capture it."""
        names = list(self.signature.parameters)
        concrete = {n: v for n, v in zip(names, flat) if v is None or isinstance(v, bool)}
        key = (tuple(concrete.items()), tuple(m.training for m in self.inlined))
        traces = self.traces
        if key not in traces:
            try:
                traces[key] = capture(self.original, concrete)
            except CaptureError as e:  # dynamo captures it instead, and warns if it cannot
                traces[key] = str(e)
            except Exception as e:  # noqa: BLE001 (a failure of the pass: dynamo's capture may still do)
                traces[key] = f"capturing with torch.fx failed ({type(e).__name__}: {e})"
        return traces[key]


def _under_load(report: Report) -> bool:
    """Whether ``report``'s decisions rest on figures taken under load (a site's or the check's)."""
    return report.under_load or any(s.source == CONTENDED for s in report.sites)


def _sharing_graph_module(traced: fx.GraphModule, original: nn.Module) -> fx.GraphModule:
    """A fresh GraphModule over a copy of ``traced``'s graph whose parameters, buffers and
    submodules are the original's own dicts (submodules it adds stay its own)."""
    gm = fx.GraphModule(traced, copy.deepcopy(traced.graph))
    own = {ROOT: original} if opaque_root(traced) else {}
    constants = {name: t for name, t in traced._buffers.items() if name not in original._buffers}  # fx's
    gm.__dict__.update(_parameters=original._parameters, _buffers=collections.ChainMap(constants, original._buffers),
                       _modules=collections.ChainMap(own, original._modules))
    return gm


def _positional(forward, signature: inspect.Signature):
    """``forward`` called with the arguments in its parameter order, as the graphs take them
    (keyword-only parameters passed by name)."""
    if all(p.kind != p.KEYWORD_ONLY for p in signature.parameters.values()):
        return forward
    return lambda *flat: (lambda args, kwargs: forward(*args, **kwargs))(*_as_call(signature, flat))


def _as_call(signature: inspect.Signature, flat: tuple) -> tuple[tuple, dict]:
    """Forward's arguments in parameter order as a call passes them: positional, and
    keyword-only ones by name."""
    params = list(signature.parameters.values())
    n = sum(p.kind != p.KEYWORD_ONLY for p in params)
    return flat[:n], {p.name: v for p, v in zip(params[n:], flat[n:])}


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None
