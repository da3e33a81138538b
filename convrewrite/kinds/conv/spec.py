"""The conv spec: a convolution lifted from user code, operands in the code's own layouts."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import torch

from ...spec import SpecBase, requiring_grad_as_in_a_model


@dataclasses.dataclass(frozen=True)
class ConvSpec(SpecBase):
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
        requiring_grad_as_in_a_model(self, x, (w, b))
        return x, w, b
