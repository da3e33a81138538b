"""Canonical specs: what a rewrite site computes, independent of how the source wrote it.

Every finder turns its pattern into a spec; every form consumes one; ``spec.key()`` is the
cost-table key. A spec describes the operation and its operands (sizes, dtype, device,
memory layout), never the graph it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import torch

CHANNELS_FIRST = "cf"
CHANNELS_LAST = "cl"
STRIDED = "strided"


def layout_of(t: torch.Tensor) -> str:
    """Classify a [N, C, *spatial] tensor's memory layout as channels-first, channels-last or other."""
    if t.is_contiguous():
        return CHANNELS_FIRST
    if t.dim() >= 3 and t.movedim(1, -1).is_contiguous():
        return CHANNELS_LAST
    return STRIDED


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Return ``t`` with the given layout (channels-last works for any rank, 1D included)."""
    if layout == CHANNELS_LAST:
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


@dataclasses.dataclass(frozen=True)
class ChannelMixSpec:
    """``y[n, o, *s] = sum_i W[o, i] x[n, i, *s] + b[o]`` (per group), i.e. a pointwise conv.

    ``spatial`` is the input's spatial size; ``padding`` and ``stride`` say which input
    positions are read (a 1x1 kernel reads the zero-padded input subsampled by the stride).
    ``in_layout``/``out_layout`` are the memory layouts of the input the site receives and
    of the output the original op produces: every form must return that output layout, so
    the copies a form needs are part of its measured cost. ``grad``: autograd records the
    op (timed as forward + backward); ``input_grad``: the backward also needs the input's
    gradient (False for a first layer, whose input does not require grad). ``executor``: what runs the emitted form, ``"eager"``
    or ``"inductor"`` (timed compiled), since a form that wins in eager can lose after fusion.
    """

    kind: ClassVar[str] = "channel_mix"
    predictable: ClassVar[bool] = True  # unseen shapes are predicted from table neighbours

    batch: int
    in_channels: int
    out_channels: int
    spatial: tuple[int, ...]
    groups: int = 1
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    bias: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    in_layout: str = CHANNELS_FIRST
    out_layout: str = CHANNELS_FIRST
    grad: bool = False
    input_grad: bool = True
    executor: str = "eager"

    def __post_init__(self):
        nd = len(self.spatial)
        if nd not in (1, 2, 3):
            raise ValueError(f"channel mix needs 1 to 3 spatial dims, got {self.spatial}")
        object.__setattr__(self, "stride", tuple(self.stride) or (1,) * nd)
        object.__setattr__(self, "padding", tuple(self.padding) or (0,) * nd)
        if len(self.stride) != nd or len(self.padding) != nd:
            raise ValueError("stride and padding need one entry per spatial dim")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError("channels must be divisible by groups")

    @property
    def ndim(self) -> int:
        return len(self.spatial)

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple((s + 2 * p - 1) // st + 1 for s, p, st in zip(self.spatial, self.padding, self.stride))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def key(self) -> str:
        """The cost-table key: every field that can change which form is fastest."""
        dims = lambda t: "x".join(map(str, t))  # noqa: E731
        return (
            f"{self.kind}|n{self.batch}|i{self.in_channels}|o{self.out_channels}|s{dims(self.spatial)}"
            f"|g{self.groups}|st{dims(self.stride)}|p{dims(self.padding)}|b{int(self.bias)}"
            f"|{self.dtype}|{self.device}|{self.in_layout}>{self.out_layout}|{self.mode}|{self.executor}"
        )

    @classmethod
    def from_key(cls, key: str) -> "ChannelMixSpec":
        """Inverse of :meth:`key`."""
        parts = key.split("|")
        if parts[0] != cls.kind or len(parts) != 14:
            raise ValueError(f"not a {cls.kind} key: {key!r}")
        dims = lambda s: tuple(int(v) for v in s.split("x"))  # noqa: E731
        in_layout, out_layout = parts[11].split(">")
        return cls(
            batch=int(parts[1][1:]), in_channels=int(parts[2][1:]), out_channels=int(parts[3][1:]),
            spatial=dims(parts[4][1:]), groups=int(parts[5][1:]), stride=dims(parts[6][2:]),
            padding=dims(parts[7][1:]), bias=parts[8] == "b1", dtype=parts[9], device=parts[10],
            in_layout=in_layout, out_layout=out_layout, grad=parts[12] != "infer", input_grad=parts[12] != "train-w",
            executor=parts[13],
        )

    @property
    def mode(self) -> str:
        """infer, train (backward to input and parameters) or train-w (to parameters only)."""
        return "infer" if not self.grad else "train" if self.input_grad else "train-w"

    def describe(self) -> str:
        """A short human-readable form, for reports."""
        extra = "".join([f" g{self.groups}" if self.groups > 1 else "",
                         f" s{'x'.join(map(str, self.stride))}" if any(s > 1 for s in self.stride) else "",
                         f" p{'x'.join(map(str, self.padding))}" if any(self.padding) else "",
                         f" {self.in_layout}" if self.in_layout != CHANNELS_FIRST else ""])
        dims = "x".join(map(str, self.spatial))
        return f"[{self.batch},{self.in_channels},{dims}]->{self.out_channels}{extra} {self.dtype}"

    def partition(self) -> tuple[str, str]:
        """Specs of different partitions never inform each other's predictions."""
        return self.device, self.executor

    def features(self) -> tuple[tuple, tuple[float, ...]]:
        """(categorical, numeric) features for predicting timings of unseen shapes.

        Categorical: what changes the set of legal forms or their code path. Numeric: log2 of
        the sizes that set the amount of work, per group.
        """
        categorical = (self.ndim, self.groups > 1, any(s > 1 for s in self.stride), any(self.padding),
                       self.dtype, self.device, self.in_layout, self.out_layout, self.mode)
        numeric = (
            math.log2(self.batch),
            math.log2(self.in_channels // self.groups),
            math.log2(self.out_channels // self.groups),
            math.log2(self.groups),
            math.log2(math.prod(self.out_spatial)),
        )
        return categorical, numeric

    def example_inputs(self, generator: torch.Generator | None = None):
        """Random (x, weight, bias) with this spec's sizes, dtype, device and input layout."""
        kw = dict(dtype=self.torch_dtype, device=self.device)
        x = torch.randn(self.batch, self.in_channels, *self.spatial, generator=generator, **kw)
        if self.in_layout == CHANNELS_LAST:
            x = to_layout(x, CHANNELS_LAST)
        elif self.in_layout == STRIDED:
            x = torch.randn(*x.shape[:-1], 2 * x.shape[-1], generator=generator, **kw)[..., ::2]
        w = torch.randn(self.out_channels, self.in_channels // self.groups, *(1,) * self.ndim,
                        generator=generator, **kw) / math.sqrt(self.in_channels // self.groups)
        b = torch.randn(self.out_channels, generator=generator, **kw) if self.bias else None
        if self.grad:
            x.requires_grad_(self.input_grad)
            w.requires_grad_(True)
            if b is not None:
                b.requires_grad_(True)
        return x, w, b


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """A channel-wise chain between a permutation and its inverse, e.g. ConvNeXt's
    ``permute(0,2,3,1) -> LayerNorm -> Linear -> GELU -> Linear -> gamma * x -> permute(0,3,1,2)``.

    ``shape`` is the region input ``x``; its channels sit at dim 1 (``channel_axis="first"``,
    the chain works channels-last) or at the last dim (``"last"``, the chain works
    channels-first). ``ops`` is the chain as tuples, in order (see ``forms.layout_chain``).
    Chains are model-specific, so their figures are measured, never predicted.
    """

    kind: ClassVar[str] = "layout_chain"
    predictable: ClassVar[bool] = False

    shape: tuple[int, ...]
    channel_axis: str
    ops: tuple[tuple, ...]
    dtype: str = "float32"
    device: str = "cpu"
    in_layout: str = CHANNELS_FIRST
    grad: bool = False
    input_grad: bool = True
    executor: str = "eager"

    torch_dtype = ChannelMixSpec.torch_dtype
    mode = ChannelMixSpec.mode

    def key(self) -> str:
        ops = ";".join(",".join(map(str, op)) for op in self.ops)
        return (f"{self.kind}|{'x'.join(map(str, self.shape))}|{self.channel_axis}|{ops}|{self.dtype}|{self.device}"
                f"|{self.in_layout}|{self.mode}|{self.executor}")

    def describe(self) -> str:
        """A short human-readable form, for reports."""
        names = [op[1] if op[0] == "act" else op[0] for op in self.ops]
        return f"{list(self.shape)} {' > '.join(map(str, names))} {self.dtype}"

    def param_shapes(self) -> list[tuple[int, ...] | None]:
        """Shapes of the params the ops read, in order (None where an op has no such param)."""
        shapes = []
        for op in self.ops:
            if op[0] == "mix":
                shapes += [(op[2], op[1]), (op[2],) if op[3] else None]
            elif op[0] == "ln":
                shapes += [(op[1],) if op[3] else None, (op[1],) if op[4] else None]
            elif op[0] in ("scale", "shift"):
                shapes.append((op[1],))
        return shapes

    def example_inputs(self, generator: torch.Generator | None = None):
        """Random (x, *params) for this chain, with the spec's dtype, device and input layout."""
        kw = dict(dtype=self.torch_dtype, device=self.device)
        x = torch.randn(*self.shape, generator=generator, **kw)
        if self.in_layout == CHANNELS_LAST:
            x = to_layout(x, CHANNELS_LAST)
        params = [None if s is None else torch.randn(*s, generator=generator, **kw) / math.sqrt(s[-1])
                  for s in self.param_shapes()]
        if self.grad:
            x.requires_grad_(self.input_grad)
            for p in params:
                if p is not None:
                    p.requires_grad_(True)
        return (x, *params)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A convolution lifted from user code, with its operands in the layouts the code had.

    The code computed ``y`` (shape ``y_shape``) from data ``x`` and weight ``w``; ``x_perm``
    orders x's dims as a conv input ``[batch..., channel..., spatial...]`` (the first
    ``x_batch`` of them flatten into the batch, the rest but the spatial ones into channels,
    group-major); ``w_perm`` orders w's dims as ``[out channel..., in channel..., kernel...]``
    with groups outermost; ``y_perm`` lists y's dims (of size > 1) in the order the conv output
    ``[batch..., channel..., spatial...]`` holds them. ``pads`` are (before, after) per spatial
    dim, negative for a crop; ``flip`` marks kernel dims read reversed (a true convolution).
    Lifted code is model-specific, so its figures are measured, never predicted.
    """

    kind: ClassVar[str] = "conv"
    predictable: ClassVar[bool] = False

    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    x_perm: tuple[int, ...]
    x_batch: int
    w_perm: tuple[int, ...]
    y_perm: tuple[int, ...]
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    flip: tuple[bool, ...]
    bias: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    grad: bool = False
    input_grad: bool = True
    executor: str = "eager"

    torch_dtype = ChannelMixSpec.torch_dtype
    mode = ChannelMixSpec.mode

    @property
    def ndim(self) -> int:
        return len(self.stride)

    # cached: the forms read these on every call, and the spec is frozen
    @functools.cached_property
    def conv_input_shape(self) -> tuple[int, ...]:
        """``[N, C, *spatial]``, the shape x takes as a conv input (before padding)."""
        sizes = [self.x_shape[d] for d in self.x_perm]
        spatial = sizes[len(sizes) - self.ndim:]
        return (math.prod(sizes[:self.x_batch]), math.prod(sizes[self.x_batch:len(sizes) - self.ndim]), *spatial)

    @functools.cached_property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.w_shape[d] for d in self.w_perm[len(self.w_perm) - self.ndim:])

    @functools.cached_property
    def conv_weight_shape(self) -> tuple[int, ...]:
        """``[C_out, C_in / groups, *kernel]``, the shape w takes as a conv weight."""
        n_in = self.conv_input_shape[1] // self.groups
        return (math.prod(self.w_shape) // (n_in * math.prod(self.kernel)), n_in, *self.kernel)

    @functools.cached_property
    def y_conv_order_shape(self) -> tuple[int, ...]:
        """y's sizes (of size > 1) in the conv output's order (``y_perm``)."""
        return tuple(self.y_shape[d] for d in self.y_perm)

    @functools.cached_property
    def flipped_dims(self) -> list[int]:
        """The conv weight's dims to flip (a true convolution reads its kernel reversed)."""
        return [2 + i for i, f in enumerate(self.flip) if f]

    @functools.cached_property
    def symmetric_padding(self) -> tuple[int, ...] | None:
        """The ``padding`` argument of ``F.convNd`` if the pads are symmetric, else None."""
        return tuple(b for b, _ in self.pads) if all(b == a >= 0 for b, a in self.pads) else None

    @functools.cached_property
    def y_unpermute(self) -> tuple[int, ...]:
        """The permutation from ``y_perm`` order back to y's own dim order."""
        return tuple(sorted(range(len(self.y_perm)), key=self.y_perm.__getitem__))

    def key(self) -> str:
        parts = (self.x_shape, self.w_shape, self.y_shape, self.x_perm, self.x_batch, self.w_perm, self.y_perm,
                 self.groups, self.stride, self.dilation, self.pads, self.flip)
        text = "|".join(",".join(map(str, p)) if isinstance(p, tuple) else str(p) for p in parts)
        return (f"{self.kind}|{text.replace(' ', '')}|{int(self.bias)}|{self.dtype}|{self.device}|{self.mode}"
                f"|{self.executor}")

    def describe(self) -> str:
        """A short human-readable form, for reports."""
        extra = "".join(f" {n}={v}" for n, v, default in (("stride", self.stride, 1), ("dilation", self.dilation, 1))
                        if any(i != default for i in v))
        extra += f" groups={self.groups}" if self.groups > 1 else ""
        extra += " flipped" if any(self.flip) else ""
        return (f"conv{self.ndim}d {list(self.x_shape)} * {list(self.w_shape)} -> {list(self.y_shape)}"
                f"{extra} {self.dtype}")

    def example_inputs(self, generator: torch.Generator | None = None):
        """Random (x, weight, bias) with this spec's shapes, dtype and device."""
        kw = dict(dtype=self.torch_dtype, device=self.device)
        fan_in = math.prod(self.conv_weight_shape[1:])
        x = torch.randn(*self.x_shape, generator=generator, **kw)
        w = torch.randn(*self.w_shape, generator=generator, **kw) / math.sqrt(fan_in)
        b = torch.randn(self.conv_weight_shape[0], generator=generator, **kw) if self.bias else None
        if self.grad:
            x.requires_grad_(self.input_grad)
            for t in (w, b):
                if t is not None:
                    t.requires_grad_(True)
        return x, w, b
