"""Canonical specs: what a rewrite site computes, independent of how the source wrote it.

Every finder turns its pattern into a spec; every form consumes one; ``spec.key()`` is the
cost-table key. A spec describes the operation and its operands (sizes, dtype, device,
memory layout), never the graph it came from. Each kind of spec lives in its own package
under :mod:`convrewrite.kinds`; this module holds what they share: the :class:`Spec`
protocol, the :class:`Predictable` protocol of kinds whose unseen shapes the table predicts,
and memory layouts.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

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


def requiring_grad_as_in_a_model(spec, x: torch.Tensor, params) -> None:
    """Mark ``x`` and ``params`` (None for a missing one) as a model's would be for ``spec``:
    the parameters always, as an ``nn.Parameter`` requires grad in inference too (and
    ``matmul`` takes another path for such an operand: a channels-first ``F.linear`` ran up
    to 1.8x slower so), the data only where the backward needs its gradient."""
    x.requires_grad_(spec.grad and spec.input_grad)
    for p in params:
        if p is not None:
            p.requires_grad_(True)


@runtime_checkable
class Spec(Protocol):
    """What every spec kind implements (frozen dataclasses, so specs hash and compare)."""

    kind: ClassVar[str]  # the kind's registered name: the first field of every key
    predictable: ClassVar[bool]  # whether unseen shapes are predicted (then it is Predictable)
    dtype: str
    device: str
    grad: bool  # autograd records the op: timed forward + backward
    input_grad: bool  # the backward also needs the input's gradient
    executor: str  # what runs the emitted form: "eager" or "inductor"

    def key(self) -> str:
        """The cost-table key: every field that can change which form is fastest."""

    def describe(self) -> str:
        """A short human-readable form, for reports."""

    def example_inputs(self, generator: torch.Generator | None = None) -> tuple:
        """Random ``(x, *params)`` with the spec's sizes, dtype, device and layouts."""


class Predictable(Spec, Protocol):
    """A spec kind whose unseen shapes the cost table predicts from measured neighbours."""

    @classmethod
    def from_key(cls, key: str) -> "Predictable":
        """Inverse of ``key()`` (ValueError for keys of another kind or version)."""

    def partition(self) -> tuple:
        """Specs of different partitions never inform each other's predictions."""

    def features(self) -> tuple[tuple, tuple[float, ...]]:
        """(categorical, numeric) features: neighbours share the first and are near in the second."""

    def work(self) -> float:
        """A rough size of the work, only to scale times between neighbours."""


class SpecBase:
    """The fields' readings every kind shares (a mixin of the kinds' dataclasses)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def mode(self) -> str:
        """infer, train (backward to input and parameters) or train-w (to parameters only)."""
        return "infer" if not self.grad else "train" if self.input_grad else "train-w"
