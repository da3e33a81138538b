"""Forms of a convolution lifted from user code (:class:`~convrewrite.kinds.conv.ConvSpec`).

Each takes the operands in the code's own layouts: :func:`conv_input` and :func:`conv_weight`
view them as ``[N, C, *spatial]`` and ``[C_out, C_in / groups, *kernel]``, and
:func:`from_conv` lays the result out as the code did, so those copies are part of each
form's measured cost.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...forms import register_form
from .spec import ConvSpec

KIND = ConvSpec.kind
ORIGINAL = "conv_direct"  # the reference form: one F.convNd call
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_input(x: torch.Tensor, spec) -> torch.Tensor:
    """``x`` as a conv input ``[N, C, *spatial]`` (unpadded)."""
    return _reshape(_permute(x, spec.x_perm), spec.conv_input_shape)


def conv_weight(w: torch.Tensor, spec) -> torch.Tensor:
    """``w`` as a conv weight ``[C_out, C_in / groups, *kernel]``, flipped where the code convolved."""
    w = _reshape(_permute(w, spec.w_perm), spec.conv_weight_shape)
    return w.flip(spec.flipped_dims) if spec.flipped_dims else w


def from_conv(y: torch.Tensor, spec) -> torch.Tensor:
    """A conv output ``[N, C_out, *spatial]`` laid out as the code's output."""
    if not _is_identity(spec.y_unpermute):
        y = _reshape(y, spec.y_conv_order_shape).permute(spec.y_unpermute)
    return _reshape(y, spec.y_shape)


# Small lifted convs cost little more than their views: each skipped view is an autograd node less.
def _permute(t: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    return t if _is_identity(perm) else t.permute(perm)


@functools.cache
def _is_identity(perm: tuple[int, ...]) -> bool:
    return perm == tuple(range(len(perm)))


def _reshape(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t if t.shape == shape else t.reshape(shape)


def _pad(x: torch.Tensor, spec) -> torch.Tensor:
    """The conv input zero-padded (or cropped, for negative pads) as the code read it."""
    flat = [p for before_after in reversed(spec.pads) for p in before_after]
    return F.pad(x, flat) if any(flat) else x


@register_form(KIND, ORIGINAL)
def conv_direct(x, w, b, *, spec):
    """One ``F.convNd`` (symmetric zero padding passed to it, anything else padded first)."""
    x, padding = conv_input(x, spec), spec.symmetric_padding
    if padding is None:
        x, padding = _pad(x, spec), 0
    y = _CONV[spec.ndim](x, conv_weight(w, spec), b, spec.stride, padding, spec.dilation, spec.groups)
    return from_conv(y, spec)


def _unfold_supported(spec) -> bool:
    return spec.ndim <= 2


@register_form(KIND, "conv_unfold", supports=_unfold_supported)
def conv_unfold(x, w, b, *, spec):
    """``F.unfold`` (im2col) and one batched matmul per group; 1D runs as 2D of height 1."""
    x, w = _pad(conv_input(x, spec), spec), conv_weight(w, spec)
    lead = 2 - spec.ndim  # 1D: a height-1 2D problem
    kernel, stride, dilation = (1,) * lead + spec.kernel, (1,) * lead + spec.stride, (1,) * lead + spec.dilation
    x = x.reshape(*x.shape[:2], *(1,) * lead, *x.shape[2:])
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [N, C * taps, positions]
    n, g, c_out = x.shape[0], spec.groups, w.shape[0]
    y = torch.matmul(w.reshape(g, c_out // g, -1), cols.reshape(n, g, -1, cols.shape[-1]))
    y = y.reshape(n, c_out, *_out_spatial(x.shape[2:], kernel, stride, dilation)[lead:])
    if b is not None:
        y = y + b.reshape(-1, *(1,) * spec.ndim)
    return from_conv(y, spec)


def _out_spatial(size, kernel, stride, dilation) -> tuple[int, ...]:
    return tuple((n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(size, kernel, stride, dilation))


def _fft_supported(spec) -> bool:
    return spec.dtype in ("float32", "float64")


@register_form(KIND, "conv_fft", supports=_fft_supported)
def conv_fft(x, w, b, *, spec):
    """Cross-correlation as a product of real FFTs (of a smooth length), per group; wins on
    long kernels, where a direct conv does work proportional to the kernel size."""
    x, w = _pad(conv_input(x, spec), spec), conv_weight(w, spec)
    w = _dilated(w, spec.dilation)
    dims = tuple(range(2, 2 + spec.ndim))
    sizes = [_smooth(n) for n in x.shape[2:]]
    n, g, c_out = x.shape[0], spec.groups, w.shape[0]
    xf = torch.fft.rfftn(x, s=sizes, dim=dims)
    wf = torch.fft.rfftn(w, s=sizes, dim=dims).conj()
    xf = xf.reshape(n, g, -1, *xf.shape[2:])
    wf = wf.reshape(g, c_out // g, -1, *wf.shape[2:])
    y = torch.fft.irfftn(torch.einsum("ngc...,goc...->ngo...", xf, wf), s=sizes, dim=tuple(d + 1 for d in dims))
    valid = tuple(slice(0, size - span + 1, s) for size, span, s in zip(x.shape[2:], w.shape[2:], spec.stride))
    y = y.reshape(n, c_out, *y.shape[3:])[(..., *valid)]
    if b is not None:
        y = y + b.reshape(-1, *(1,) * spec.ndim)
    return from_conv(y, spec)


def _dilated(w: torch.Tensor, dilation: tuple[int, ...]) -> torch.Tensor:
    """``w`` with ``d - 1`` zeros between taps along each kernel dim (dilation ``d``)."""
    if all(d == 1 for d in dilation):
        return w
    size = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilation)]
    out = w.new_zeros(*w.shape[:2], *size)
    out[(..., *(slice(None, None, d) for d in dilation))] = w
    return out


def _smooth(n: int) -> int:
    """The smallest 2-3-5-smooth length >= n (fast FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1

