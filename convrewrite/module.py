"""The module ``optimize()`` returns: the user's module, specialised per input signature.

It shares the original's parameter, buffer and submodule dicts, so ``state_dict()`` keys and
values are the original's, an optimizer over either trains both, and ``train()``/``eval()``
reach the same submodules; each rewritten graph shares them too, so parameters or submodules
reassigned later are what runs. Each new input signature is bound and keyed here (on the
hot path, so read straight from ``__dict__``), built by :mod:`convrewrite.specialize` (fx, or
dynamo where fx cannot capture) and cached. Whatever cannot be captured or run that way runs
through the original module, unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import threading
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .capture import autocast_state
from .dynamo_route import RECOMPILE_LIMIT
from .hooks import has_hooks, hooks_on_either
from .options import Options
from .report import Report
from .specialize import NOT_RUN, Specialization, Specializer

MAX_SPECIALIZATIONS = RECOMPILE_LIMIT  # input signatures kept per module; the oldest is dropped beyond that


@dataclasses.dataclass
class _State:
    """Per-module caches; kept out of nn.Module's attribute registry."""

    specializer: Specializer
    specs: dict = dataclasses.field(default_factory=dict)
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    last_report: Report | None = None


_training = operator.attrgetter("training")
# fx's own check where this torch has it (is_fx_tracing is also true under torch.export, and warns so)
_fx_tracing = getattr(fx._symbolic_trace, "is_fx_symbolic_tracing", fx._symbolic_trace.is_fx_tracing)
_grad_enabled = torch.is_grad_enabled
_autocast_on = torch._C._is_any_autocast_enabled


def _traced_by_fx(args: tuple, kwargs: dict) -> bool:
    """Whether fx is tracing this call: its flag is process-wide, so while one thread traces
    (a first call capturing), a call in another thread must not take it for its own trace and
    run the original through fx's patched ``nn.Module`` (the tracer would record it); only a
    traced call receives Proxies."""
    return _fx_tracing() and any(isinstance(a, fx.Proxy) for a in pytree.tree_leaves((args, kwargs)))


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
        # share of a small model's time; without hooks or compile() it only calls forward. A jit
        # trace goes this way too once a specialisation is built: it records the same ops.
        d = self.__dict__
        original = d["_convrewrite_original"]
        if hooks_on_either(self, original) or d.get("_compiled_call_impl") is not None:
            return super().__call__(*args, **kwargs)
        inlined = d["_convrewrite_inlined"]
        if len(args) == 1 and not kwargs and type(x := args[0]) is torch.Tensor and len(inlined) <= 1:
            # the common call, one tensor into one traced module (or a leaf module, none inlined),
            # dispatched here: _dispatch and _key (which keys it the same way) would add two
            # calls, about 0.5 us a call
            flags = inlined[0].training if inlined else ()
            key = (_grad_enabled(), _autocast_on() and autocast_state(), flags,
                   x.shape, x.stride(), x.dtype, x.device, x.requires_grad)
            spec = d["_state"].specs.get(key)
            if spec is not None and not (spec.guarded and spec.stale()):
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
        if spec is None or spec.guarded and spec.stale():
            if torch.compiler.is_compiling() or torch._C._get_tracing_state() or _traced_by_fx(args, kwargs):
                # no specialising inside a trace (the outer optimize() of a model holding this one, say)
                return original(*args, **kwargs)
            spec, output = self._specialized(args, kwargs, flat)
            if output is not NOT_RUN:
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
        """Grad mode, autocast's state, the inlined modules' training flags and each argument's key. Written for
        speed: it runs on every call, and one tensor argument and one inlined module (the root)
        is the common case (the forms differ in length, so their keys cannot collide)."""
        inlined = self.__dict__["_convrewrite_inlined"]
        flags = inlined[0].training if len(inlined) == 1 else tuple(map(_training, inlined))
        if len(flat) == 1 and type(v := flat[0]) is torch.Tensor:  # as __call__ keys it
            return (_grad_enabled(), _autocast_on() and autocast_state(), flags,
                    v.shape, v.stride(), v.dtype, v.device, v.requires_grad)
        return (_grad_enabled(), _autocast_on() and autocast_state(), flags, *map(_value_key, flat))

    def _call_key(self, args: tuple, kwargs: dict) -> tuple:
        """The key of a call: :meth:`_key` where the arguments bind to forward's parameters,
        else grad mode, autocast's state, the root's training flag and the arguments as given (dynamo's guards
        cover the rest of a compiled forward's assumptions)."""
        flat = self._flat(args, kwargs)
        if flat is not None:
            return self._key(flat)
        return (_grad_enabled(), _autocast_on() and autocast_state(), "as given", self.original.training,
                _value_key(args), _value_key(kwargs))

    def _specialized(self, args: tuple, kwargs: dict, flat: tuple | None):
        """The specialisation for this call, and its output if building it ran the call."""
        if flat is not None:
            return self._cached(self._key(flat), lambda: self._state.specializer.build(flat))
        if self.__dict__["_convrewrite_arity"] is not None:  # the original raises the call's own error
            return Specialization(None, Report(note="not captured: the arguments do not bind to forward's "
                                                    "signature")), NOT_RUN
        return self._cached(self._call_key(args, kwargs), lambda: self._state.specializer.through_dynamo(args, kwargs))

    def _cached(self, key: tuple, build: Callable):
        """The specialisation for ``key``, built (and this call run) if there is none yet."""
        state = self._state
        spec = state.specs.get(key)
        if spec is not None and not spec.stale():
            return spec, NOT_RUN
        with state.lock:
            spec = state.specs.get(key)
            if spec is not None and not spec.stale():
                return spec, NOT_RUN
            spec, output = build()
            if _fully_sharded(self):
                spec = _owning_outputs(spec)
            state.specs.pop(key, None)
            if len(state.specs) >= MAX_SPECIALIZATIONS:
                state.specs.pop(next(iter(state.specs)))
            state.specs[key] = spec
            state.last_report = spec.report
        return spec, output

    def _reset_state(self) -> None:
        original = self.original
        tracer = fx.Tracer()
        signature = inspect.signature(original.forward)
        variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values())
        # modules whose forward is traced through: Python reads of their .training are baked in
        inlined = tuple(m for name, m in original.named_modules() if not tracer.is_leaf_module(m, name))
        self.__dict__.update(
            _state=_State(Specializer(original, self.options, signature, inlined)),
            _convrewrite_signature=signature,
            _convrewrite_arity=None if variadic else len(signature.parameters),
            _convrewrite_inlined=inlined,
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

    def __bool__(self):  # as the original's: a module without __len__ is true, not a TypeError
        return bool(self.original)

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


def _fully_sharded(module: nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` wraps ``module``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def _owning_outputs(spec: Specialization) -> Specialization:
    """``spec``, its rewritten graph or compiled forward returning no view (a form's result may
    be a reshape of its matmul): FSDP2 hooks a wrapped module's outputs for its backward, and
    an in-place op on a view output (``out += residual``) drops that hook silently (wrong
    gradients, seen)."""
    if spec.gm is not None:
        gm = spec.gm
        (output,) = (n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            output.args = (pytree.tree_map(lambda v: gm.graph.call_function(_owned, (v,))
                                           if isinstance(v, fx.Node) else v, output.args[0]),)
        gm.recompile()
    if spec.compiled is not None:
        compiled = spec.compiled
        spec = dataclasses.replace(spec, compiled=lambda *a, **k: pytree.tree_map(_owned, compiled(*a, **k)))
    return spec


def _owned(value):
    return value.clone() if isinstance(value, torch.Tensor) and value._is_view() else value

