"""The conv kind: a convolution lifted from code that computes one (loops over taps or
pixels, unfold + multiply + sum), with its operands in the code's own layouts. Lifted code
is model-specific: its figures are measured, never predicted."""

from .. import Kind, register_kind
from .forms import ORIGINAL
from .spec import ConvSpec

KIND = register_kind(Kind(ConvSpec.kind, ConvSpec, ORIGINAL))
