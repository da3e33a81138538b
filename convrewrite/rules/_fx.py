"""What the rules share about fx graphs: float dtypes, functional conv calls, modules
that run torch.nn's own forward, and where a node ran, for reports."""

from __future__ import annotations

import re

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture import info

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CONV_FUNCTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_FUNCTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_FUNCTION_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def conv_call_args(node: fx.Node) -> dict | None:
    """The arguments of an annotated ``torch.convNd`` call by name, stride and padding as
    tuples (string padding: zero, as it is for a 1x1 kernel), or None if they are not constants."""
    if len(node.args) > len(_FUNCTION_ARGS) or set(node.kwargs) - set(_FUNCTION_ARGS):
        return None
    a = {**_FUNCTION_DEFAULTS, **dict(zip(_FUNCTION_ARGS, node.args)), **node.kwargs}
    if info(a["weight"]) is None or any(isinstance(a[k], fx.Node) for k in ("stride", "padding", "dilation", "groups")):
        return None
    if a["bias"] is not None and info(a["bias"]) is None:
        return None
    ndim = CONV_FUNCTIONS[node.target]
    a["padding"] = (0,) * ndim if isinstance(a["padding"], str) else _ntuple(a["padding"], ndim)
    a["stride"] = _ntuple(a["stride"], ndim)
    return a


def runs_own_forward(mod: nn.Module) -> bool:
    """Does ``mod`` run the forward of the torch.nn class it derives from (no override)?"""
    base = next((c for c in type(mod).__mro__ if c.__module__.startswith("torch.nn.modules")), None)
    return base is not None and type(mod).forward is base.forward


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module ``node`` ran in, from the root module ("" for
    the root itself or where unknown). Dynamo names a module by the source it was reached
    through (``L['self'].blocks._modules['0']``, ``getattr(L['fn'].__self__.features, '12')``);
    fx by its qualified name. An optimized module's proxy is left out, as it is from a user's
    attribute access."""
    stack = node.meta.get("nn_module_stack") or {}
    return dotted(next(reversed(stack.values()))[0]) if stack else ""


_ROOT = re.compile(r"^L\['[^']*'\](?:\.__self__)?")
# the proxy's ways to its original module: the attribute, or the first of its inlined modules
_PROXY = re.compile(r"\.?__dict__\['_convrewrite_(?:original'\]|inlined'\]\[0\])")
_ITEM = re.compile(r"(?:\._(?:modules|parameters|buffers))?\[\'?([^'\]]*)\'?\]")


def dotted(source: str) -> str:
    """A dynamo source (``L['self'].enc._modules['0']._parameters['weight']``) as a dotted path (``enc.0.weight``)."""
    while (call := re.search(r"getattr\(([^()]*), '([^']*)'\)", source)):  # innermost first
        source = f"{source[:call.start()]}{call[1]}.{call[2]}{source[call.end():]}"
    source = _PROXY.sub("", _ROOT.sub("", source))
    return _ITEM.sub(r".\1", source).strip(".")


def _ntuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n
