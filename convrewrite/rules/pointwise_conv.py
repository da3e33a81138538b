"""Rule: pointwise convolutions (every kernel dim 1) as channel-mix sites.

Finds ``nn.Conv1d/2d/3d`` modules (``call_module``) and ``F.conv1d/2d/3d`` / ``torch.conv*d``
calls (``call_function``) whose weight has a 1x1 kernel, with zero padding of any size, any
stride and any groups. Left alone: larger kernels, non-zero padding modes, transposed convs,
conv subclasses with their own forward, modules with hooks, unbatched or empty inputs, and
non-float dtypes.
"""

from __future__ import annotations

import math

import torch.fx as fx
import torch.nn as nn

from ..capture import info
from ..hooks import has_hooks
from ..kinds.channel_mix import ChannelMixSpec
from ..kinds.channel_mix.forms import ORIGINAL
from ..site import Site
from ._fx import (
    CONV_FUNCTIONS,
    FLOAT_DTYPES,
    conv_call_args,
    module_path,
    runs_own_forward,
)

PATTERN = "pointwise conv"
_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def find(gm: fx.GraphModule):
    """Yield a :class:`Site` for every pointwise conv in ``gm`` (annotated by ``capture.annotate``)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            site = _module_site(gm, node)
        elif node.op == "call_function" and node.target in CONV_FUNCTIONS:
            site = _function_site(node)
        else:
            continue
        if site is not None:
            yield site


def _module_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    mod = gm.get_submodule(node.target)
    ndim = _MODULES.get(_conv_base(mod))
    if ndim is None or mod.padding_mode != "zeros" or has_hooks(mod) or len(node.args) != 1 or node.kwargs:
        return None
    padding = (0,) * ndim if isinstance(mod.padding, str) else tuple(mod.padding)
    spec = _spec(node, node.args[0], tuple(mod.weight.shape), mod.bias is not None, mod.stride, padding, mod.groups)
    if spec is None:
        return None
    bias = f"{node.target}.bias" if mod.bias is not None else None
    return Site(node, node.args[0], (f"{node.target}.weight", bias), spec, ORIGINAL, PATTERN, node.target)


def _function_site(node: fx.Node) -> Site | None:
    a = conv_call_args(node)
    if a is None:
        return None
    spec = _spec(node, a["input"], info(a["weight"]).shape, a["bias"] is not None, a["stride"], a["padding"], a["groups"])
    if spec is None:
        return None
    return Site(node, a["input"], (a["weight"], a["bias"]), spec, ORIGINAL, PATTERN, _path_of(node))


def _spec(node, x_node, weight_shape, bias, stride, padding, groups) -> ChannelMixSpec | None:
    """The channel-mix spec of a conv node, or None if it is not a pointwise conv we handle."""
    x, out = info(x_node), info(node)
    ndim = len(weight_shape) - 2
    if x is None or out is None or any(k != 1 for k in weight_shape[2:]) or len(x.shape) != ndim + 2:
        return None
    if x.dtype not in FLOAT_DTYPES or math.prod(x.shape) == 0 or math.prod(out.shape) == 0:
        return None
    return ChannelMixSpec(
        batch=x.shape[0], in_channels=x.shape[1], out_channels=weight_shape[0], spatial=x.shape[2:],
        groups=int(groups), stride=tuple(stride), padding=tuple(padding), bias=bias,
        dtype=str(x.dtype).removeprefix("torch."), device=x.device.type,
        in_layout=x.layout, out_layout=out.layout, grad=out.requires_grad, input_grad=x.requires_grad,
    )


def _conv_base(mod: nn.Module):
    """The nn.ConvNd class whose forward ``mod`` runs unchanged, else None."""
    for base in _MODULES:
        if isinstance(mod, base) and runs_own_forward(mod) and type(mod)._conv_forward is base._conv_forward:
            return base
    return None


def _path_of(node: fx.Node) -> str:
    """The module path of a functional conv: its conv module's (dynamo), or owner:node."""
    stack = node.meta.get("nn_module_stack") or {}
    path = module_path(node)
    owner_type = next(reversed(stack.values()))[1] if stack else None
    if isinstance(owner_type, type) and issubclass(owner_type, tuple(_MODULES)):
        return path
    return f"{path}:{node.name}" if path else node.name
