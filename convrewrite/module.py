"""The module ``optimize()`` returns: the user's module, specialised per input signature.

It shares the original's parameter, buffer and submodule dicts, so ``state_dict()`` keys and
values are the original's, an optimizer over either trains both, and ``train()``/``eval()``
reach the same submodules; each rewritten graph shares them too, so parameters or submodules
reassigned later are what runs. Each new input signature is captured, rewritten and cached.
Whatever cannot be captured or run that way runs through the original module, unchanged.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import operator
import threading
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import ROOT, CaptureError, annotate, capture, opaque_root
from .check import ORIGINAL, REWRITTEN, rewrite_wins, whole_graph_times
from .hooks import global_hooks, has_hooks, own_hooks
from .options import Options
from .passes import rewrite
from .report import Report

MAX_SPECIALIZATIONS = 64  # input signatures kept per module; the oldest is dropped beyond that


@dataclasses.dataclass
class Specialization:
    """The graph run for one input signature (None: run the original), and its report."""

    gm: fx.GraphModule | None
    report: Report
    watched: tuple[nn.Module, ...] = ()  # rewritten modules: a hook added to one invalidates the graph

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


_training = operator.attrgetter("training")
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
        flat = self._flat(args, kwargs)
        spec = None if flat is None else self._state.specs.get(self._key(flat))
        return None if spec is None else spec.report

    def specialize(self, *args, **kwargs) -> Report:
        """Capture and rewrite for these inputs now (the first call does it otherwise)."""
        return self._specialization_for(args, kwargs).report

    def graph_module(self, *args, **kwargs) -> fx.GraphModule | None:
        """The rewritten graph run for these inputs (None where the original runs instead:
        nothing was rewritten, or the model could not be captured)."""
        return self._specialization_for(args, kwargs).gm

    def _specialization_for(self, args, kwargs) -> Specialization:
        flat = self._flat(args, kwargs)
        if flat is None:
            why = "forward takes *args or **kwargs" if self.__dict__["_convrewrite_arity"] is None else \
                "the arguments do not bind to forward's signature"
            return Specialization(None, Report(note=f"not captured: {why}"))
        return self._specialization(flat)[0]

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
                return original.forward(x) if spec.gm is None else spec.gm.forward(x)
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
        if flat is None:
            return original(*args, **kwargs)
        spec = d["_state"].specs.get(self._key(flat))
        if spec is None or spec.watched and spec.stale():
            if torch.compiler.is_compiling() or torch._C._get_tracing_state():  # no specialising inside a trace
                return original(*args, **kwargs)
            spec, output = self._specialization(flat)
            if output is not _NOT_RUN:
                return output
        # forward, not __call__: the root has no hooks (checked by the caller)
        return spec.gm.forward(*flat) if spec.gm is not None else original.forward(*args, **kwargs)

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

    def _specialization(self, flat: tuple):
        state, key = self._state, self._key(flat)
        spec = state.specs.get(key)
        if spec is not None and not spec.stale():
            return spec, _NOT_RUN
        with state.lock:
            spec = state.specs.get(key)
            if spec is not None and not spec.stale():
                return spec, _NOT_RUN
            spec, output = self._build(flat)
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
        if isinstance(traced, str):
            return Specialization(None, Report(signature=signature, note=f"not captured: {traced}")), _NOT_RUN
        try:
            gm = _sharing_graph_module(traced, self.original)
            output = annotate(gm, flat)
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
        times = whole_graph_times(_positional(self.original.forward, self._forward_signature), gm,
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
    params = list(signature.parameters.values())
    if all(p.kind != p.KEYWORD_ONLY for p in params):
        return forward
    n = sum(p.kind != p.KEYWORD_ONLY for p in params)
    names = [p.name for p in params[n:]]
    return lambda *flat: forward(*flat[:n], **dict(zip(names, flat[n:])))


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


_NOT_RUN = object()
