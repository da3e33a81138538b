"""Built-in forms of the channel mix (pointwise convolution).

Each form reads the input a 1x1 conv reads (zero-padded, then subsampled by the stride),
mixes channels, and returns the output in the layout the original conv returns
(``spec.out_layout``), so the copies a form needs are inside what the profiler times.
Sizes come from the tensors, never from the spec, so a form stays correct on any shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...forms import register_form
from ...spec import CHANNELS_LAST, to_layout
from .spec import ChannelMixSpec

KIND = ChannelMixSpec.kind
ORIGINAL = "conv"
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _read_positions(x: torch.Tensor, spec: ChannelMixSpec) -> torch.Tensor:
    """The input positions a 1x1 conv reads: zero padding first, then the stride."""
    if any(spec.padding):
        x = F.pad(x, [p for p in reversed(spec.padding) for _ in range(2)])
    if any(s > 1 for s in spec.stride):
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in spec.stride))]
    return x


def _ungrouped(spec: ChannelMixSpec) -> bool:
    return spec.groups == 1


def channels_last_backward_may_crash(spec: ChannelMixSpec) -> bool:
    """oneDNN's channels-last 1x1 conv backward with stride > 1 segfaults on CPU (torch 2.13,
    seen on [16,3,98,98] stride 2), so such convs are neither timed nor emitted."""
    return spec.grad and spec.device == "cpu" and any(s > 1 for s in spec.stride)


def _channels_last_conv_applies(spec: ChannelMixSpec) -> bool:
    return spec.ndim in (2, 3) and spec.in_layout != CHANNELS_LAST and not channels_last_backward_may_crash(spec)


@register_form(KIND, ORIGINAL)
def conv(x, w, b, *, spec):
    """The original op: ``F.convNd`` with the 1x1 kernel."""
    return _CONV[spec.ndim](x, w, b, spec.stride, spec.padding, 1, spec.groups)


@register_form(KIND, "conv_channels_last", supports=_channels_last_conv_applies)
def conv_channels_last(x, w, b, *, spec):
    """Convert the input to channels-last, run the conv there, convert back."""
    y = conv(to_layout(x, CHANNELS_LAST), w, b, spec=spec)
    return to_layout(y, spec.out_layout)


@register_form(KIND, "matmul")
def matmul(x, w, b, *, spec):
    """``W @ x`` batched over N (and groups) on the channels-first view: no transposes."""
    x = _read_positions(x, spec)
    n, c, *spatial = x.shape
    g = spec.groups
    y = torch.matmul(w.reshape(g, -1, c // g), x.reshape(n, g, c // g, -1))
    if b is not None:
        y = y + b.view(g, -1, 1)
    return to_layout(y.reshape(n, -1, *spatial), spec.out_layout)


@register_form(KIND, "baddbmm", supports=_ungrouped)
def baddbmm(x, w, b, *, spec):
    """One ``baddbmm`` with W broadcast over the batch and the bias fused in."""
    x = _read_positions(x, spec)
    n, c, *spatial = x.shape
    x3 = x.reshape(n, c, -1)
    w3 = w.reshape(1, -1, c).expand(n, -1, -1)
    y = torch.bmm(w3, x3) if b is None else torch.baddbmm(b.view(1, -1, 1), w3, x3)
    return to_layout(y.view(n, -1, *spatial), spec.out_layout)


@register_form(KIND, "linear", supports=_ungrouped)
def linear(x, w, b, *, spec):
    """``F.linear`` over the channels-last view (``x.movedim(1, -1)``), moved back."""
    x = _read_positions(x, spec)
    y = F.linear(x.movedim(1, -1), w.flatten(1), b)
    return to_layout(y.movedim(-1, 1), spec.out_layout)


@register_form(KIND, "addmm", supports=_ungrouped)
def addmm(x, w, b, *, spec):
    """One 2D ``addmm`` on the flattened channels-last view [N*spatial, C]."""
    x = _read_positions(x, spec).movedim(1, -1)
    x2 = x.reshape(-1, x.shape[-1])
    w2 = w.flatten(1).t()
    y2 = torch.mm(x2, w2) if b is None else torch.addmm(b, x2, w2)
    return to_layout(y2.view(*x.shape[:-1], -1).movedim(-1, 1), spec.out_layout)
