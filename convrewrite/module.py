"""The module ``optimize()`` returns: the user's module, specialised per input signature.

It shares the original's parameter, buffer and submodule dicts, so ``state_dict()`` keys and
values are the original's, an optimizer over either trains both, and ``train()``/``eval()``
reach the same submodules; each rewritten graph shares them too, so parameters or submodules
reassigned later are what runs. Each new input signature is captured, rewritten and cached:
by ``torch.fx`` where it can trace the forward, else through dynamo
(:mod:`convrewrite.dynamo_route`). Whatever cannot be captured or run that way runs through
the original module, unchanged.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import operator
import threading
import warnings
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import ROOT, CaptureError, annotate, capture, fold_sizes, hidden_sites, opaque_root
from .check import ORIGINAL, REWRITTEN, rewrite_wins, whole_graph_times
from .dynamo_route import DynamoRoute
from .hooks import global_hooks, has_hooks, own_hooks
from .options import Options
from .pipeline import rewrite
from .report import Report

MAX_SPECIALIZATIONS = 64  # input signatures kept per module; the oldest is dropped beyond that


@dataclasses.dataclass
class Specialization:
    """What runs for one input signature, and its report: the rewritten graph ``gm`` (called
    with forward's arguments in order), else the ``compiled`` forward (called as forward is),
    else (both None) the original's own forward."""

    gm: fx.GraphModule | None
    report: Report
    watched: tuple[nn.Module, ...] = ()  # rewritten modules: a hook added to one invalidates the graph
    compiled: Callable | None = None

    def stale(self) -> bool:
        return any(own_hooks(m) for m in self.watched)


@dataclasses.dataclass
class _State:
    """Per-module caches; kept out of nn.Module's attribute registry."""

    specs: dict = dataclasses.field(default_factory=dict)
    traces: dict = dataclasses.field(default_factory=dict)  # concrete (None/bool) arguments -> graph or error
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    warned: set = dataclasses.field(default_factory=set)  # reasons already warned about
    last_report: Report | None = None
    dynamo: DynamoRoute | None = None  # made at the first signature fx cannot capture


_training = operator.attrgetter("training")
# fx's own check where this torch has it (is_fx_tracing is also true under torch.export, and warns so)
_fx_tracing = getattr(fx._symbolic_trace, "is_fx_symbolic_tracing", fx._symbolic_trace.is_fx_tracing)
_grad_enabled = torch.is_grad_enabled


def _value_key(v):
    """A value's part of the signature. Graphs are traced with None and bools fixed, and read
    tensors by shape, strides, dtype, device and requires_grad; other values do not change
    the graph, so only their type counts (a float timestep must not re-specialise)."""
    if isinstance(v, torch.Tensor):
        return (v.shape, v.stride(), v.dtype, v.device, v.requires_grad)
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(_value_key(i) for i in v))
    if isinstance(v, dict):
        return (dict, tuple((k, _value_key(i)) for k, i in v.items()))
    return type(v)


def describe(args) -> str:
    """A short human-readable form of the tensor arguments' shapes and dtypes."""
    return ", ".join(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in args if isinstance(a, torch.Tensor))


class ConvRewriteModule(nn.Module):
    """A module whose forward runs the rewritten graph for the current input signature.

    Attributes and methods of the original module stay reachable through this one.
    """

    def __init__(self, original: nn.Module, options: Options):
        super().__init__()
        self.__dict__.update(_parameters=original._parameters, _buffers=original._buffers,
                             _modules=original._modules,
                             _non_persistent_buffers_set=original._non_persistent_buffers_set,
                             _convrewrite_original=original, _convrewrite_options=options)
        self._reset_state()
        self.training = original.training

    # -- public -----------------------------------------------------------------------------
    @property
    def original(self) -> nn.Module:
        """The module this one was made from (it shares all parameters with it)."""
        return self.__dict__["_convrewrite_original"]

    @property
    def options(self) -> Options:
        return self.__dict__["_convrewrite_options"]

    @property
    def report(self) -> Report | None:
        """The report of the most recently built specialisation (None before the first); with
        several input signatures, :meth:`report_for` gives the one a call runs."""
        return self._state.last_report

    @property
    def reports(self) -> list[Report]:
        """The report of every specialisation held now, oldest first (each names its input
        signature); ``report_for(*inputs)`` picks the one a call with those inputs runs."""
        return [spec.report for spec in self._state.specs.values()]

    def report_for(self, *args, **kwargs) -> Report | None:
        """The report of the specialisation a call with these inputs runs (None if none is
        built for them yet: call the module, or :meth:`specialize`, first)."""
        spec = self._state.specs.get(self._call_key(args, kwargs))
        return None if spec is None else spec.report

    def specialize(self, *args, **kwargs) -> Report:
        """Capture and rewrite for these inputs now (the first call does it otherwise)."""
        return self._specialization_for(args, kwargs).report

    def graph_module(self, *args, **kwargs) -> fx.GraphModule | None:
        """The rewritten graph run for these inputs (None where the original runs instead:
        nothing was rewritten, or the model could not be captured)."""
        return self._specialization_for(args, kwargs).gm

    def _specialization_for(self, args, kwargs) -> Specialization:
        return self._specialized(args, kwargs, self._flat(args, kwargs))[0]

    def __call__(self, *args, **kwargs):
        # nn.Module.__call__ adds two frames and its own hook checks to every call, a measurable
        # share of a small model's time; without hooks, compile() or a jit trace it only calls forward.
        d = self.__dict__
        original = d["_convrewrite_original"]
        if global_hooks() or own_hooks(self) or own_hooks(original) \
                or self._compiled_call_impl is not None or torch._C._get_tracing_state():
            return super().__call__(*args, **kwargs)
        inlined = d["_convrewrite_inlined"]
        if len(args) == 1 and not kwargs and type(x := args[0]) is torch.Tensor and len(inlined) <= 1:
            # the common call, one tensor into one traced module (or a leaf module, none inlined),
            # dispatched here: _dispatch and _key (which keys it the same way) would add two
            # calls, about 0.5 us a call
            flags = inlined[0].training if inlined else ()
            key = (_grad_enabled(), flags, x.shape, x.stride(), x.dtype, x.device, x.requires_grad)
            spec = d["_state"].specs.get(key)
            if spec is not None and not (spec.watched and spec.stale()):
                return spec.gm.forward(x) if spec.gm is not None else (spec.compiled or original.forward)(x)
        return self._dispatch(args, kwargs)

    def forward(self, *args, **kwargs):
        if has_hooks(self.original):  # hooks on the root run only through its own __call__
            return self.original(*args, **kwargs)
        return self._dispatch(args, kwargs)

    def _dispatch(self, args: tuple, kwargs: dict):
        """Run the specialisation for these arguments (the hot path: it reads __dict__ directly)."""
        d = self.__dict__
        original = d["_convrewrite_original"]
        flat = args if not kwargs and len(args) == d["_convrewrite_arity"] else self._flat(args, kwargs)
        spec = d["_state"].specs.get(self._key(flat) if flat is not None else self._call_key(args, kwargs))
        if spec is None or spec.watched and spec.stale():
            if torch.compiler.is_compiling() or torch._C._get_tracing_state() or _fx_tracing():
                # no specialising inside a trace (the outer optimize() of a model holding this one, say)
                return original(*args, **kwargs)
            spec, output = self._specialized(args, kwargs, flat)
            if output is not _NOT_RUN:
                return output
        # forward, not __call__: the root has no hooks (checked by the caller)
        if spec.gm is not None:
            return spec.gm.forward(*flat)
        return (spec.compiled or original.forward)(*args, **kwargs)

    # -- specialisation ---------------------------------------------------------------------
    def _flat(self, args, kwargs) -> tuple | None:
        """The arguments in forward's parameter order, defaults filled; None where forward takes
        ``*args``/``**kwargs`` or the call does not bind (the original then runs, and says why)."""
        arity = self.__dict__["_convrewrite_arity"]
        if arity is None:
            return None
        if not kwargs and len(args) == arity:
            return args
        try:
            bound = self._forward_signature.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        return tuple(bound.arguments.values())

    @property
    def _forward_signature(self) -> inspect.Signature:
        return self.__dict__["_convrewrite_signature"]

    def _key(self, flat: tuple) -> tuple:
        """Grad mode, the inlined modules' training flags and each argument's key. Written for
        speed: it runs on every call, and one tensor argument and one inlined module (the root)
        is the common case (the forms differ in length, so their keys cannot collide)."""
        inlined = self.__dict__["_convrewrite_inlined"]
        flags = inlined[0].training if len(inlined) == 1 else tuple(map(_training, inlined))
        if len(flat) == 1 and type(v := flat[0]) is torch.Tensor:  # as __call__ keys it
            return (_grad_enabled(), flags, v.shape, v.stride(), v.dtype, v.device, v.requires_grad)
        return (_grad_enabled(), flags, *map(_value_key, flat))

    def _call_key(self, args: tuple, kwargs: dict) -> tuple:
        """The key of a call: :meth:`_key` where the arguments bind to forward's parameters,
        else grad mode, the root's training flag and the arguments as given (dynamo's guards
        cover the rest of a compiled forward's assumptions)."""
        flat = self._flat(args, kwargs)
        if flat is not None:
            return self._key(flat)
        return (_grad_enabled(), "as given", self.original.training, _value_key(args), _value_key(kwargs))

    def _specialized(self, args: tuple, kwargs: dict, flat: tuple | None):
        """The specialisation for this call, and its output if building it ran the call."""
        if flat is not None:
            return self._cached(self._key(flat), lambda: self._build(flat))
        if self.__dict__["_convrewrite_arity"] is not None:  # the original raises the call's own error
            return Specialization(None, Report(note="not captured: the arguments do not bind to forward's "
                                                    "signature")), _NOT_RUN
        return self._cached(self._call_key(args, kwargs), lambda: self._through_dynamo(args, kwargs))

    def _cached(self, key: tuple, build: Callable):
        """The specialisation for ``key``, built (and this call run) if there is none yet."""
        state = self._state
        spec = state.specs.get(key)
        if spec is not None and not spec.stale():
            return spec, _NOT_RUN
        with state.lock:
            spec = state.specs.get(key)
            if spec is not None and not spec.stale():
                return spec, _NOT_RUN
            spec, output = build()
            state.specs.pop(key, None)
            if len(state.specs) >= MAX_SPECIALIZATIONS:
                state.specs.pop(next(iter(state.specs)))
            state.specs[key] = spec
            state.last_report = spec.report
        return spec, output

    def _build(self, flat: tuple):
        """Capture (once per pattern of None/bool arguments), annotate by running the graph
        once on these inputs (its output is this call's), and rewrite."""
        signature = describe(flat)
        traced = self._trace(flat)
        if isinstance(traced, str) or hidden_sites(traced):  # dynamo sees into what fx cannot trace
            return self._through_dynamo(*_as_call(self._forward_signature, flat))
        try:
            gm = _sharing_graph_module(traced, self.original)
            output = annotate(gm, flat)
            fold_sizes(gm)
        except Exception as e:  # the original reports the user's own error, if it is one
            return self._fallen_back(signature, "the captured graph failed on these inputs", e), _NOT_RUN
        why = opaque_root(traced)
        try:
            report = Report(rewrite(gm, self.options).sites, signature, f"not traced: {why}" if why else "")
            if report.rewritten and self.options.check:
                report = self._checked(report, gm, flat)
        except Exception as e:  # a failure of the pass never reaches the user: this call's output stands
            return self._fallen_back(signature, "rewriting failed", e), output
        if not report.rewritten:  # nothing gained: the original's own forward is the cheapest to call
            if why and why not in self._state.warned:
                self._state.warned.add(why)
                warnings.warn(f"convrewrite: {type(self.original).__name__} runs unchanged: {why}", stacklevel=5)
            return Specialization(None, report), output
        watched = tuple(m for m in (_submodule(self.original, s.path) for s in report.rewritten) if m is not None)
        return Specialization(gm, report, watched), output

    def _through_dynamo(self, args: tuple, kwargs: dict):
        """Capture through dynamo (see :mod:`convrewrite.dynamo_route`), running this call."""
        state, signature = self._state, describe((*args, *kwargs.values()))
        if state.dynamo is None:
            state.dynamo = DynamoRoute(self.original, self.options)
        try:
            compiled, report, output = state.dynamo.specialize(args, kwargs, signature)
        except Exception as e:  # the original reports the user's own error, if it is one
            return self._fallen_back(signature, "capture through dynamo failed", e), _NOT_RUN
        return Specialization(None, report, compiled=compiled if report.rewritten else None), output

    def _fallen_back(self, signature: str, what: str, error: Exception) -> Specialization:
        """The original, for these inputs, with one warning naming the real reason."""
        why = f"{what} ({type(error).__name__}: {error})"
        warnings.warn(f"convrewrite: {why}; these inputs run through the original module "
                      f"({type(self.original).__name__})", stacklevel=6)
        return Specialization(None, Report(signature=signature, note=f"not rewritten: {why}"))

    def _checked(self, report: Report, gm: fx.GraphModule, flat: tuple) -> Report:
        """``report``, or its sites back on their originals if the whole rewritten graph is
        not clearly faster than the model's own forward on these inputs."""
        if any(has_hooks(m) for m in self.original.modules()):  # timing would run them again and again
            return report.noted("whole graph not checked: the model has hooks")
        times = whole_graph_times(_positional(self.original.forward, self._forward_signature), gm.forward,
                                  self.original, flat)
        if len(times) < 2:
            return report.kept_original("kept original: the whole-graph check could not run both graphs")
        old, new = times[ORIGINAL], times[REWRITTEN]
        load = " (under load from other processes)" if times.contended else ""
        line = f"whole model, warm, on these inputs: {new * 1e3:.3f} ms rewritten, {old * 1e3:.3f} ms as written{load}"
        if not rewrite_wins(times):
            return report.kept_original(f"kept original: the rewritten graph ran {new / old:.2f}x the time").noted(line)
        return report.noted(line)

    def _trace(self, flat: tuple) -> fx.GraphModule | str:
        """The captured graph for this pattern of None/bool arguments and training flags."""
        names = list(self._forward_signature.parameters)
        concrete = {n: v for n, v in zip(names, flat) if v is None or isinstance(v, bool)}
        key = (tuple(concrete.items()), tuple(m.training for m in self.__dict__["_convrewrite_inlined"]))
        traces = self._state.traces
        if key not in traces:
            try:
                traces[key] = capture(self.original, concrete)
            except CaptureError as e:
                traces[key] = str(e)
                warnings.warn(f"convrewrite: {type(self.original).__name__} runs unchanged: {e}", stacklevel=6)
        return traces[key]

    def _reset_state(self) -> None:
        original = self.original
        tracer = fx.Tracer()
        signature = inspect.signature(original.forward)
        variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values())
        self.__dict__.update(
            _state=_State(),
            _convrewrite_signature=signature,
            _convrewrite_arity=None if variadic else len(signature.parameters),
            # modules whose forward is traced through: Python reads of their .training are baked in
            _convrewrite_inlined=tuple(m for name, m in original.named_modules() if not tracer.is_leaf_module(m, name)),
        )

    # -- nn.Module behaviour that must reach the original too --------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.original.training = mode
        return self

    def _apply(self, fn, recurse=True):
        # Parameters may change dtype or device: every specialisation is stale.
        self.original._apply(fn, recurse)
        self._reset_state()
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "_convrewrite_original" not in self.__dict__:
                raise
            return getattr(self.__dict__["_convrewrite_original"], name)

    def __getitem__(self, index):
        return self.original[index]

    def __len__(self):
        return len(self.original)

    def __iter__(self):
        return iter(self.original)

    def extra_repr(self) -> str:
        return f"convrewrite: {len(self._state.specs)} specialisation(s) of {type(self.original).__name__}"

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in ("_state", "_convrewrite_signature", "_convrewrite_arity", "_convrewrite_inlined"):
            del state[name]  # rebuilt on demand; locks and graphs of bound methods do not pickle
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_state()


def _sharing_graph_module(traced: fx.GraphModule, original: nn.Module) -> fx.GraphModule:
    """A fresh GraphModule over a copy of ``traced``'s graph whose parameters, buffers and
    submodules are the original's own dicts (submodules it adds stay its own)."""
    gm = fx.GraphModule(traced, copy.deepcopy(traced.graph))
    own = {ROOT: original} if opaque_root(traced) else {}
    gm.__dict__.update(_parameters=original._parameters, _buffers=original._buffers,
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


_NOT_RUN = object()
