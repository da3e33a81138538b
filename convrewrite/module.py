"""The module ``optimize()`` returns: the user's module, specialised per input signature.

It shares the original's parameter, buffer and submodule dicts, so ``state_dict()`` keys and
values are the original's, an optimizer over either trains both, and ``train()``/``eval()``
reach the same submodules. Each new input signature (shapes, dtypes, devices, layouts, grad
mode) is captured, rewritten and cached; a model that cannot be captured runs unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import CaptureError, annotate, capture
from .options import Options
from .passes import rewrite
from .report import Report

MAX_SPECIALIZATIONS = 64  # input signatures kept per module; the oldest is dropped beyond that


def signature(args: tuple, kwargs: dict) -> tuple:
    """What a specialisation depends on: every tensor's shape, strides (its layout), dtype,
    device and requires_grad, other arguments by value, and the grad mode."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return (v.shape, v.stride(), v.dtype, v.device, v.requires_grad)
        if isinstance(v, (tuple, list)):
            return (type(v).__name__, tuple(one(i) for i in v))
        if isinstance(v, dict):
            return ("dict", tuple((k, one(i)) for k, i in v.items()))
        try:
            hash(v)
            return v
        except TypeError:  # graphs do not bake in argument values: only tensor shapes matter
            return ("type", type(v).__qualname__)
    return (torch.is_grad_enabled(), tuple(one(a) for a in args), tuple((k, one(v)) for k, v in sorted(kwargs.items())))


def describe(args: tuple, kwargs: dict) -> str:
    """A short human-readable form of the tensor arguments' shapes and dtypes."""
    parts = [f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" for a in (*args, *kwargs.values())
             if isinstance(a, torch.Tensor)]
    return ", ".join(parts)


class ConvRewriteModule(nn.Module):
    """A module whose forward runs the rewritten graph for the current input signature."""

    def __init__(self, original: nn.Module, options: Options):
        super().__init__()
        self.__dict__.update(_parameters=original._parameters, _buffers=original._buffers,
                             _modules=original._modules,
                             _non_persistent_buffers_set=original._non_persistent_buffers_set)
        self.__dict__["_convrewrite_original"] = original
        self.__dict__["_convrewrite_options"] = options
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
        """The report of the most recent specialisation (None before the first)."""
        return self._state.last_report

    def specialize(self, *args, **kwargs) -> Report:
        """Capture and rewrite for these inputs now (the first call does it otherwise)."""
        return self._specialization(args, kwargs, run=False)[1]

    def graph_module(self, *args, **kwargs) -> fx.GraphModule | None:
        """The rewritten graph used for these inputs (None if the model could not be captured)."""
        return self._specialization(args, kwargs, run=False)[0]

    def forward(self, *args, **kwargs):
        gm, _, first_output = self._specialization(args, kwargs, run=True)
        if first_output is not _NOT_RUN:
            return first_output
        return gm(*args, **kwargs) if gm is not None else self.original(*args, **kwargs)

    # -- specialisation ---------------------------------------------------------------------
    def _specialization(self, args, kwargs, run: bool):
        state, key = self._state, signature(args, kwargs)
        entry = state.specs.get(key)
        if entry is not None:
            return (*entry, _NOT_RUN)
        with state.lock:
            entry = state.specs.get(key)
            if entry is not None:
                return (*entry, _NOT_RUN)
            gm, report, output = self._build(args, kwargs)
            if len(state.specs) >= MAX_SPECIALIZATIONS:
                state.specs.pop(next(iter(state.specs)))
            state.specs[key] = (gm, report)
            state.last_report = report
        return gm, report, output if run else _NOT_RUN

    def _build(self, args, kwargs):
        """Capture, annotate (running the original graph once) and rewrite."""
        state = self._state
        if state.capture_error is None and state.traced is None:
            try:
                state.traced = capture(self.original)
            except CaptureError as e:
                state.capture_error = str(e)
                warnings.warn(f"convrewrite: {type(self.original).__name__} runs unchanged: {e}", stacklevel=4)
        if state.traced is None:
            return None, Report(signature=describe(args, kwargs), note=f"not captured: {state.capture_error}"), _NOT_RUN
        gm = fx.GraphModule(state.traced, copy.deepcopy(state.traced.graph))
        output = annotate(gm, args, kwargs)
        report = rewrite(gm, self.options)
        return gm, Report(report.sites, describe(args, kwargs)), output

    def _reset_state(self) -> None:
        self.__dict__["_state"] = _State()

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

    def extra_repr(self) -> str:
        return f"convrewrite: {len(self._state.specs)} specialisation(s) of {type(self.original).__name__}"

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_state"]  # specialisations are rebuilt on demand; locks do not pickle
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_state()


@dataclasses.dataclass
class _State:
    """Per-module cache of captured graphs; kept out of nn.Module's attribute registry."""

    specs: dict = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    traced: fx.GraphModule | None = None
    capture_error: str | None = None
    last_report: Report | None = None


_NOT_RUN = object()
