"""The layout-chain spec: channel-wise ops after a permutation, up to its inverse or open."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import torch

from ...spec import CHANNELS_FIRST, CHANNELS_LAST, SpecBase, requiring_grad_as_in_a_model, to_layout


class Mix(NamedTuple):
    """``y = W x + b`` over the channel axis (a Linear or a 1x1 conv)."""
    op: str  # "mix"
    cin: int
    cout: int
    bias: bool

    def param_shapes(self) -> list:
        return [(self.cout, self.cin), (self.cout,) if self.bias else None]


class LayerNorm(NamedTuple):
    """LayerNorm over the channel axis."""
    op: str  # "ln"
    channels: int
    eps: float
    weight: bool
    bias: bool

    def param_shapes(self) -> list:
        return [(self.channels,) if self.weight else None, (self.channels,) if self.bias else None]


class Activation(NamedTuple):
    """An elementwise activation by name (``_ACTIVATIONS`` in the kind's forms)."""
    op: str  # "act"
    name: str

    def param_shapes(self) -> list:
        return []


class Gelu(NamedTuple):
    """GELU, exact or tanh-approximated."""
    op: str  # "act"
    name: str  # "gelu"
    approximate: str

    def param_shapes(self) -> list:
        return []


class PerChannel(NamedTuple):
    """Times (``"scale"``) or plus (``"shift"``) a per-channel parameter."""
    op: str
    channels: int

    def param_shapes(self) -> list:
        return [(self.channels,)]


class Scalar(NamedTuple):
    """``"mul"``, ``"add"``, ``"sub"`` or ``"div"`` with a Python number."""
    op: str
    value: float

    def param_shapes(self) -> list:
        return []


class Copy(NamedTuple):
    """A copy the source made (``"contiguous"``): kept as written, dropped with the permutes."""
    op: str

    def param_shapes(self) -> list:
        return []


_RECORDS = {"mix": Mix, "ln": LayerNorm, "scale": PerChannel, "shift": PerChannel, "mul": Scalar, "add": Scalar,
            "sub": Scalar, "div": Scalar, "contiguous": Copy}


def chain_op(values: tuple) -> tuple:
    """The record of one chain op written as a plain tuple, e.g. ``("ln", 96, 1e-6, True, True)``."""
    if values[0] == "act":
        return (Gelu if values[1] == "gelu" else Activation)(*values)
    return _RECORDS[values[0]](*values)


@dataclasses.dataclass(frozen=True)
class ChainSpec(SpecBase):
    """A channel-wise chain after a permutation, e.g. ConvNeXt's
    ``permute(0,2,3,1) -> LayerNorm -> Linear -> GELU -> Linear -> gamma * x -> permute(0,3,1,2)``.

    ``shape`` is the region input ``x``; its channels sit at dim 1 (``channel_axis="first"``,
    the chain works channels-last) or at the last dim (``"last"``, the chain works
    channels-first). ``ops`` is the chain, in order, as op records (:class:`Mix`,
    :class:`LayerNorm`, ...: tuples whose first field names the op; plain tuples are turned
    into records). ``permutes_back``: the chain ends in the inverse permutation; without it
    (an open chain, e.g. Wav2Vec2's ``transpose(1, 2) -> LayerNorm``) its output keeps the
    permuted layout, contiguous as the last mix or LayerNorm leaves it.
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
    permutes_back: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(chain_op(tuple(op)) for op in self.ops))

    def key(self) -> str:
        ops = ";".join(",".join(map(str, op)) for op in self.ops)
        return (f"{self.kind}|{'x'.join(map(str, self.shape))}|{self.channel_axis}|{ops}|{self.dtype}|{self.device}"
                f"|{self.in_layout}|{self.mode}|{self.executor}{'' if self.permutes_back else '|open'}")

    def describe(self) -> str:
        """A short human-readable form, for reports."""
        names = [getattr(op, "name", op.op) for op in self.ops]
        end = "" if self.permutes_back else ", no inverse permute"
        return f"{list(self.shape)} {' > '.join(map(str, names))} {self.dtype}{end}"

    def param_shapes(self) -> list[tuple[int, ...] | None]:
        """Shapes of the params the ops read, in order (None where an op has no such param)."""
        return [shape for op in self.ops for shape in op.param_shapes()]

    def example_inputs(self, generator: torch.Generator | None = None):
        """Random (x, *params) for this chain, with the spec's dtype, device and input layout."""
        kw = dict(dtype=self.torch_dtype, device=self.device)
        x = torch.randn(*self.shape, generator=generator, **kw)
        if self.in_layout == CHANNELS_LAST:
            x = to_layout(x, CHANNELS_LAST)
        params = [None if s is None else torch.randn(*s, generator=generator, **kw) / math.sqrt(s[-1])
                  for s in self.param_shapes()]
        requiring_grad_as_in_a_model(self, x, params)
        return (x, *params)
