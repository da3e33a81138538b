"""Rule: channel-wise chains between a permutation and its inverse.

Finds ``transpose``/``permute``/``movedim``/``.mT`` that moves the channels from dim 1 to the
last dim (or back), followed by a chain of ops along the moved channel axis, ending in the
inverse permutation. Chain ops: Linear / ``F.linear`` (channels last) or 1x1 ``ConvNd`` /
``F.convNd`` (channels at dim 1), LayerNorm over the channels, activations, per-channel scale/shift parameters,
arithmetic with Python numbers, ``.contiguous()`` and ``Dropout(p=0)``. Channels-last chains
may also regroup the other dims (``reshape``/``view``/``flatten``/``unflatten`` keeping the
channels last, e.g. ``[N, H, W, C] -> [N, H*W, C]`` and back): channel-wise ops commute with
that, and a reshape keeps the elements' order, so reshapes that end in the shape they began
with cancel. Every value inside the chain must have exactly one user: a permuted tensor used
elsewhere keeps the chain as written.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..capture import info
from ..hooks import has_hooks
from ..kinds.layout_chain import ChainSpec
from ..kinds.layout_chain.forms import ORIGINAL
from ..kinds.layout_chain.spec import Activation, Copy, Gelu, LayerNorm, Mix, PerChannel, Scalar
from ..site import Site
from ._fx import CONV_FUNCTIONS, FLOAT_DTYPES, conv_call_args, runs_own_forward

PATTERN = "layout chain"
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
                nn.Hardswish: "hardswish", nn.Identity: "identity"}
_ACT_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", F.relu6: "relu6", F.silu: "silu", torch.tanh: "tanh",
                  torch.sigmoid: "sigmoid", F.hardswish: "hardswish"}
_ACT_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_ARITH = {operator.mul: "mul", torch.mul: "mul", operator.add: "add", torch.add: "add",
          operator.sub: "sub", torch.sub: "sub", operator.truediv: "div", torch.div: "div"}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RESHAPE_METHODS = {"reshape", "view", "flatten", "unflatten"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten}


def find(gm: fx.GraphModule):
    """Yield a :class:`Site` for every layout chain in ``gm``. Chains do not overlap: a
    permutation that ends one chain and starts the next belongs to the first."""
    claimed = set()
    for node in gm.graph.nodes:
        site = _chain_from(gm, node)
        if site is not None and claimed.isdisjoint((*site.nodes, site.node)):
            claimed.update((*site.nodes, site.node))
            yield site


def _chain_from(gm, entry: fx.Node) -> Site | None:
    x = info(entry.args[0]) if entry.args else None
    if x is None or x.dtype not in FLOAT_DTYPES or len(x.shape) < 3 or math.prod(x.shape) == 0:
        return None
    perm = _permutation(entry, len(x.shape))
    n = len(x.shape)
    to_last, to_first = (0, *range(2, n), 1), (0, n - 1, *range(1, n - 1))
    for axis, wanted in (("first", to_last), ("last", to_first)):
        if perm == wanted:
            site = _walk(gm, entry, axis, x)
            if site is not None:
                return site
    return None


def _walk(gm, entry: fx.Node, axis: str, x) -> Site | None:
    """Follow single-user ops from ``entry`` to the inverse permutation."""
    channels_last_inside = axis == "first"
    channels = x.shape[1] if axis == "first" else x.shape[-1]
    ops, params, nodes, y = [], [], [entry], entry
    while True:
        if len(y.users) != 1:
            return None
        (user,) = y.users
        if _permutation(user, len(x.shape)) == _inverse(_permutation(entry, len(x.shape))):
            break
        step = _op(gm, user, y, channels, channels_last_inside)
        if step is None:
            return None
        op, op_params, channels = step
        if op is not None:  # None: a regrouping of the other dims, checked to cancel at the end
            ops.append(op)
        params.extend(op_params)
        nodes.append(user)
        y = user
    if not any(op.op != "contiguous" for op in ops):
        return None
    out, inside = info(user), info(entry).shape
    expected = (*inside[:-1], channels) if channels_last_inside else (inside[0], channels, *inside[2:])
    if out is None or tuple(info(y).shape) != tuple(expected):  # reshapes inside did not cancel
        return None
    spec = ChainSpec(tuple(x.shape), axis, tuple(ops), str(x.dtype).removeprefix("torch."), x.device.type,
                     x.layout, out.requires_grad, x.requires_grad)
    removed = sum(op.op == "contiguous" for op in ops)
    note = f"removes 2 permutes{f' and {removed} copies' if removed else ''}"
    return Site(user, entry.args[0], tuple(params), spec, ORIGINAL, PATTERN, _path(nodes), tuple(nodes), note)


def _op(gm, node: fx.Node, y: fx.Node, channels: int, channels_last: bool):
    """(op, params, channels after) if ``node`` is a chain op applied to ``y``, else None."""
    if node.op == "call_module":
        return _module_op(gm, node, y, channels, channels_last)
    if _regroups(node, y, channels, channels_last):
        return None, (), channels
    if node.op == "call_method" and node.args[0] is y:
        if node.target == "contiguous" and len(node.args) == 1 and not node.kwargs:
            return Copy("contiguous"), (), channels
        if node.target in _ACT_METHODS and len(node.args) == 1 and not node.kwargs:
            return Activation("act", _ACT_METHODS[node.target]), (), channels
        return None
    if node.op != "call_function":
        return None
    if node.target in _ACT_FUNCTIONS and node.args == (y,) and not node.kwargs:
        return Activation("act", _ACT_FUNCTIONS[node.target]), (), channels
    if node.target is F.gelu and node.args == (y,) and set(node.kwargs) <= {"approximate"}:
        return Gelu("act", "gelu", node.kwargs.get("approximate", "none")), (), channels
    if node.target is F.linear and channels_last:
        return _linear_call(node, y, channels)
    if node.target is F.layer_norm and channels_last:
        return _layer_norm_call(node, y, channels)
    if node.target in CONV_FUNCTIONS and not channels_last:
        return _conv_call(node, y, channels)
    if node.target in _ARITH and len(node.args) == 2 and not node.kwargs:
        return _arith(node, y, channels, channels_last, len(info(y).shape))
    return None


def _regroups(node: fx.Node, y: fx.Node, channels: int, channels_last: bool) -> bool:
    """Does ``node`` reshape ``y`` (channels last) keeping the channels as the last dim?"""
    reshape = (node.op == "call_method" and node.target in _RESHAPE_METHODS
               or node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS)
    if not (reshape and channels_last and node.args and node.args[0] is y) or info(node) is None:
        return False
    if any(isinstance(a, torch.dtype) for a in (*node.args, *node.kwargs.values())):
        return False  # view(dtype) reinterprets the bits: not a regrouping
    (before, after) = info(y), info(node)
    return after.dtype == before.dtype and len(after.shape) >= 2 and before.shape[-1] == after.shape[-1] == channels


def _module_op(gm, node, y, channels, channels_last):
    mod = gm.get_submodule(node.target)
    if node.args != (y,) or node.kwargs or has_hooks(mod) or not runs_own_forward(mod):
        return None
    path = node.target
    if getattr(mod, "inplace", False):
        return None  # it would write through the permuted view into the chain's input
    if type(mod) in _ACT_MODULES:
        return Activation("act", _ACT_MODULES[type(mod)]), (), channels
    if isinstance(mod, nn.GELU):
        return Gelu("act", "gelu", mod.approximate), (), channels
    if isinstance(mod, nn.Dropout) and mod.p == 0:
        return Activation("act", "identity"), (), channels
    bias = f"{path}.bias" if getattr(mod, "bias", None) is not None else None
    if isinstance(mod, nn.Linear) and channels_last and mod.in_features == channels:
        return Mix("mix", channels, mod.out_features, bias is not None), (f"{path}.weight", bias), mod.out_features
    if isinstance(mod, _CONVS) and not channels_last and _plain_pointwise(mod) and mod.in_channels == channels:
        return Mix("mix", channels, mod.out_channels, bias is not None), (f"{path}.weight", bias), mod.out_channels
    if isinstance(mod, nn.LayerNorm) and channels_last and tuple(mod.normalized_shape) == (channels,):
        weight = f"{path}.weight" if mod.weight is not None else None
        return LayerNorm("ln", channels, mod.eps, weight is not None, bias is not None), (weight, bias), channels
    return None


def _plain_pointwise(conv) -> bool:
    return (all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride) and conv.groups == 1
            and conv.padding_mode == "zeros" and (isinstance(conv.padding, str) or not any(conv.padding)))


def _linear_call(node, y, channels):
    args = dict(zip(("input", "weight", "bias"), node.args), **node.kwargs)
    w, b = args.get("weight"), args.get("bias")
    if args.get("input") is not y or set(args) - {"input", "weight", "bias"} or info(w) is None:
        return None
    if len(info(w).shape) != 2 or info(w).shape[1] != channels or (b is not None and info(b) is None):
        return None
    return Mix("mix", channels, info(w).shape[0], b is not None), (w, b), info(w).shape[0]


def _conv_call(node, y, channels):
    a = conv_call_args(node)
    if a is None or a["input"] is not y or a["groups"] != 1 or set(a["stride"]) != {1} or any(a["padding"]):
        return None
    w = info(a["weight"]).shape
    if w[1] != channels or any(k != 1 for k in w[2:]) or len(w) != len(info(y).shape):
        return None
    return Mix("mix", channels, w[0], a["bias"] is not None), (a["weight"], a["bias"]), w[0]


def _layer_norm_call(node, y, channels):
    args = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args), **node.kwargs)
    w, b = args.get("weight"), args.get("bias")
    if args.get("input") is not y or tuple(args.get("normalized_shape", ())) != (channels,):
        return None
    if any(p is not None and info(p) is None for p in (w, b)):
        return None
    return LayerNorm("ln", channels, float(args.get("eps", 1e-5)), w is not None, b is not None), (w, b), channels


def _arith(node, y, channels, channels_last, ndim):
    name = _ARITH[node.target]
    a, b = node.args
    other = b if a is y else a if b is y and name in ("mul", "add") else None
    if other is None:
        return None
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return Scalar(name, other), (), channels
    p = info(other)
    if name in ("mul", "add") and p is not None and _per_channel(p.shape, channels, channels_last, ndim):
        return PerChannel("scale" if name == "mul" else "shift", channels), (other,), channels
    return None


def _per_channel(shape, channels, channels_last, ndim) -> bool:
    """Does a parameter of ``shape`` broadcast along the channel axis of an ``ndim`` value only?"""
    if math.prod(shape) != channels or len(shape) > ndim:
        return False
    if channels_last:
        return len(shape) >= 1 and shape[-1] == channels
    at = len(shape) - ndim + 1  # the parameter dim that lines up with dim 1
    return at >= 0 and shape[at] == channels


def _permutation(node: fx.Node, ndim: int) -> tuple[int, ...] | None:
    """The dims permutation ``node`` applies to its first argument, if it is one."""
    method = node.target if node.op == "call_method" else None
    fn = node.target if node.op == "call_function" else None
    args = node.args[1:]
    if node.kwargs:
        return None
    if method == "transpose" or fn is torch.transpose:
        if len(args) != 2 or not all(isinstance(d, int) for d in args):
            return None
        return _swap(ndim, args[0] % ndim, args[1] % ndim)
    if method == "permute" or fn is torch.permute:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return None
        return tuple(d % ndim for d in dims)
    if method == "movedim" or fn is torch.movedim:
        if len(args) != 2 or not all(isinstance(d, int) for d in args):
            return None
        perm = list(range(ndim))
        perm.insert(args[1] % ndim, perm.pop(args[0] % ndim))
        return tuple(perm)
    if fn is getattr and args == ("mT",):
        return _swap(ndim, ndim - 2, ndim - 1)
    return None


def _swap(ndim, d0, d1):
    perm = list(range(ndim))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return tuple(perm)


def _inverse(perm):
    if perm is None:
        return None
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return tuple(inverse)


def _path(nodes) -> str:
    mods = [n.target for n in nodes if n.op == "call_module"]
    if mods:
        return mods[0] if len(mods) == 1 else f"{mods[0]}..{mods[-1]}"
    return nodes[0].name
