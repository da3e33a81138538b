"""Forms of a layout chain: the chain as written, or run in the input's own layout.

The chain's ops are the records of :mod:`.spec` (``Mix``, ``LayerNorm``, ...).

``as_written`` permutes, runs the ops along the permuted channel axis and permutes back, as
the source does. The other forms drop both permutes and run the ops along the input's own
channel axis: a LayerNorm over dim 1 is computed from its definition (mean and biased
variance over the channels, same eps), so it is the same function. An open chain (no inverse
permute in the source) ends in the permuted layout: there the other forms permute their
result once, into a contiguous tensor as the source's last mix or LayerNorm returns it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...forms import register_form
from .spec import ChainSpec, Gelu

KIND = ChainSpec.kind
ORIGINAL = "as_written"

_SCALAR_OPS = {"mul": torch.mul, "add": torch.add, "sub": torch.sub, "div": torch.div}
_ACTIVATIONS = {
    "relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish, "identity": lambda y: y,
}


def _activation(y, op):
    if isinstance(op, Gelu):
        return F.gelu(y, approximate=op.approximate)
    return _ACTIVATIONS[op.name](y)


def _mix_linear(y, w, b):
    return F.linear(y, w.reshape(w.shape[0], -1), b)


def _mix_conv(y, w, b):
    spatial = y.dim() - 2
    return (F.conv1d, F.conv2d, F.conv3d)[spatial - 1](y, w.reshape(w.shape[0], -1, *(1,) * spatial), b)


def _mix_matmul(y, w, b):
    n, c, *spatial = y.shape
    out = torch.matmul(w.reshape(w.shape[0], c), y.reshape(n, c, -1))
    if b is not None:
        out = out + b[:, None]
    return out.view(n, -1, *spatial)


def _layer_norm_dim1(y, w, b, eps):
    # in float32 for half-precision inputs, as F.layer_norm computes: statistics of a few
    # channels in bfloat16 would round far more than the op it replaces
    x = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if w is not None:
        out = out * _along_dim1(w, x)
    if b is not None:
        out = out + _along_dim1(b, x)
    return out.to(y.dtype)


def _along_dim1(p, y):
    return p.reshape(-1, *(1,) * (y.dim() - 2))


def _run(ops, y, params, channels_last: bool, mix, keep_copies: bool):
    """Apply ``ops`` to ``y`` whose channels are its last dim (or dim 1)."""
    along = (lambda p, y: p.reshape(-1)) if channels_last else _along_dim1
    it = iter(params)
    for op in ops:
        if op.op == "mix":
            y = mix(y, next(it), next(it))
        elif op.op == "ln":
            w, b = next(it), next(it)
            y = F.layer_norm(y, (op.channels,), w, b, op.eps) if channels_last else _layer_norm_dim1(y, w, b, op.eps)
        elif op.op == "act":
            y = _activation(y, op)
        elif op.op == "scale":
            y = y * along(next(it), y)
        elif op.op == "shift":
            y = y + along(next(it), y)
        elif op.op in _SCALAR_OPS:
            y = _SCALAR_OPS[op.op](y, op.value)
        elif op.op == "contiguous" and keep_copies:
            y = y.contiguous()
    return y


def _to_inner(x, spec):
    """The source's entry permutation: channels from dim 1 to last, or from last to dim 1."""
    return x.movedim(1, -1) if spec.channel_axis == "first" else x.movedim(-1, 1)


def _from_inner(y, spec):
    return y.movedim(-1, 1) if spec.channel_axis == "first" else y.movedim(1, -1)


def _as_source_ends(y, spec):
    """``y``, computed along the input's own channel axis, in the layout the source returns."""
    return y if spec.permutes_back else _to_inner(y, spec).contiguous()


def _channels_first_input(spec) -> bool:
    return spec.channel_axis == "first"


def _channels_last_input(spec) -> bool:
    return spec.channel_axis == "last"


@register_form(KIND, ORIGINAL)
def as_written(x, *params, spec):
    """Permute, run the chain along the permuted channel axis, permute back if the source does."""
    inner_last = spec.channel_axis == "first"
    y = _run(spec.ops, _to_inner(x, spec), params, inner_last, _mix_linear if inner_last else _mix_conv, True)
    return _from_inner(y, spec) if spec.permutes_back else y


@register_form(KIND, "channels_first_conv", supports=_channels_first_input)
def channels_first_conv(x, *params, spec):
    """No permutes: the chain along dim 1, each mix a 1x1 conv."""
    return _as_source_ends(_run(spec.ops, x, params, False, _mix_conv, False), spec)


@register_form(KIND, "channels_first_matmul", supports=_channels_first_input)
def channels_first_matmul(x, *params, spec):
    """No permutes: the chain along dim 1, each mix ``W @ x`` batched over N."""
    return _as_source_ends(_run(spec.ops, x, params, False, _mix_matmul, False), spec)


@register_form(KIND, "channels_last_linear", supports=_channels_last_input)
def channels_last_linear(x, *params, spec):
    """No permutes: the chain along the last dim, each mix an ``F.linear``."""
    return _as_source_ends(_run(spec.ops, x, params, True, _mix_linear, False), spec)
