"""Rule: channel-wise chains after a permutation, up to its inverse or open.

Finds ``transpose``/``permute``/``movedim``/``.mT`` that moves the channels from dim 1 to the
last dim (or back), followed by a chain of ops along the moved channel axis, ending in the
inverse permutation. Chain ops: Linear / ``F.linear`` (channels last) or 1x1 ``ConvNd`` /
``F.convNd`` (channels at dim 1), LayerNorm over the channels, activations, per-channel scale/shift parameters,
arithmetic with Python numbers, ``.contiguous()`` and ``Dropout(p=0)``. Channels-last chains
may also regroup the other dims (``reshape``/``view``/``flatten``/``unflatten`` keeping the
channels last, e.g. ``[N, H, W, C] -> [N, H*W, C]`` and back): channel-wise ops commute with
that, and a reshape keeps the elements' order, so reshapes that end in the shape they began
with cancel. Every value inside the chain must have exactly one user. A permuted tensor read
by several ops starts a chain at each of them that is one, and stays for the others.

A chain with no inverse permutation (Wav2Vec2's ``transpose(1, 2) -> LayerNorm``, an audio
model's ``transpose(1, 2) -> Linear``) is an open chain: it ends at its last chain op before
a value with several users, a regrouping or an op of another kind, and counts only if it
mixes or normalises the channels. Its output keeps the permuted layout.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

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
from ._fx import CONV_FUNCTIONS, FLOAT_DTYPES, conv_call_args, module_path, runs_own_forward

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
    permutation that ends one chain and starts the next belongs to the first, also where it
    stays for other users (the next chain would read the first one's inside, which its
    rewrite removes: timm's Sequencer2d, a downsampling conv between permutes, then a
    LayerNorm read beside a residual)."""
    claimed, inside = set(), set()
    for node in gm.graph.nodes:
        for site in _chains_from(gm, node):
            if claimed.isdisjoint((*site.nodes, site.node)) and site.x not in inside:
                claimed.update((*site.nodes, site.node))
                inside.update(site.nodes)
                yield site


def _chains_from(gm, entry: fx.Node):
    """The chains that start at ``entry``, if it is a permutation: one per user (a permuted
    tensor read by several ops stays in the graph for those that are not chains)."""
    x = info(entry.args[0]) if entry.args else None
    if x is None or x.dtype not in FLOAT_DTYPES or len(x.shape) < 3 or math.prod(x.shape) == 0:
        return
    perm = _permutation(entry, len(x.shape))
    n = len(x.shape)
    to_last, to_first = (0, *range(2, n), 1), (0, n - 1, *range(1, n - 1))
    for user in list(entry.users):
        for axis, wanted in (("first", to_last), ("last", to_first)):
            site = _walk(gm, entry, user, axis, x) if perm == wanted else None
            if site is not None:
                yield site
                break


class _Step(NamedTuple):
    node: fx.Node
    op: tuple | None  # None: a regrouping of the other dims, which must cancel by the end
    params: tuple
    channels: int  # after the op


def _walk(gm, entry: fx.Node, user: fx.Node, axis: str, x) -> Site | None:
    """Follow single-user chain ops from ``user`` of ``entry`` to the inverse permutation, or
    as far as they go (an open chain)."""
    n, channels_last_inside = len(x.shape), axis == "first"
    channels = x.shape[1] if axis == "first" else x.shape[-1]
    steps, y = [], entry
    while True:
        if _permutation(user, n) == _inverse(_permutation(entry, n)):
            return _closed(entry, steps, user, axis, x) or _open(entry, steps, axis, x)
        step = _op(gm, user, y, channels, channels_last_inside)
        if step is None:
            break
        steps.append(_Step(user, *step))
        y, channels = user, step[2]
        if len(y.users) != 1:
            break
        (user,) = y.users
    return _open(entry, steps, axis, x)


def _closed(entry, steps, exit_node, axis, x) -> Site | None:
    """The site of a chain that ends in the inverse permutation, if its regroupings cancel."""
    inside = info(entry).shape
    channels = steps[-1].channels if steps else (inside[-1] if axis == "first" else inside[1])
    expected = (*inside[:-1], channels) if axis == "first" else (inside[0], channels, *inside[2:])
    if tuple(info(steps[-1].node if steps else entry).shape) != tuple(expected):
        return None
    return _site(entry, steps, exit_node, axis, x)


def _open(entry, steps, axis, x) -> Site | None:
    """The site of a chain with no inverse permutation, up to its first regrouping, if it
    mixes or normalises the channels (the ops whose speed depends on the layout)."""
    regrouping = next((i for i, step in enumerate(steps) if step.op is None), len(steps))
    steps = steps[:regrouping]
    if not any(step.op.op in ("mix", "ln") for step in steps):
        return None
    return _site(entry, steps, steps[-1].node, axis, x)


def _site(entry, steps, exit_node, axis, x) -> Site | None:
    ops = tuple(step.op for step in steps if step.op is not None)
    out = info(exit_node)
    if out is None or not any(op.op != "contiguous" for op in ops):
        return None
    permutes_back = not steps or exit_node is not steps[-1].node
    spec = ChainSpec(tuple(x.shape), axis, ops, str(x.dtype).removeprefix("torch."), x.device.type, x.layout,
                     out.requires_grad, x.requires_grad, permutes_back=permutes_back)
    shared = len(entry.users) > 1  # the entry stays for its other users
    nodes = (*(() if shared else (entry,)), *(step.node for step in steps if step.node is not exit_node))
    params = tuple(p for step in steps for p in step.params)
    return Site(exit_node, entry.args[0], params, spec, ORIGINAL, PATTERN, _path((*nodes, exit_node)), nodes,
                _note(ops, permutes_back + (not shared), permutes_back))


def _note(ops, removed: int, permutes_back: bool) -> str:
    copies = sum(op.op == "contiguous" for op in ops)
    said = [f"removes {removed} permute{'s' if removed > 1 else ''}"] if removed else []
    said += [f"{copies} cop{'ies' if copies > 1 else 'y'}"] if copies else []
    return " and ".join(said) + ("" if permutes_back else "; permutes the output instead")


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
    module = module_path(nodes[0])
    return f"{module}:{nodes[0].name}" if module else nodes[0].name
