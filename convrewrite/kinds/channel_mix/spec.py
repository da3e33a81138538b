"""The channel-mix spec: a pointwise (1x1) convolution, whatever the source wrote."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ...spec import CHANNELS_FIRST, CHANNELS_LAST, STRIDED, SpecBase, requiring_grad_as_in_a_model, to_layout


@dataclasses.dataclass(frozen=True)
class ChannelMixSpec(SpecBase):
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

    def work(self) -> float:
        """A rough size of the work (multiply-adds plus elements moved), only to scale times."""
        positions = self.batch * math.prod(self.out_spatial)
        return positions * (self.in_channels * self.out_channels / self.groups + self.in_channels + self.out_channels)

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
        requiring_grad_as_in_a_model(self, x, (w, b))
        return x, w, b
