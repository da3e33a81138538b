"""The layout-chain kind: channel-wise ops (Linear, LayerNorm, activations, per-channel scales)
between a permutation and its inverse, run as written or in the input's own layout. Chains
are model-specific: their figures are measured, never predicted."""

from .. import Kind, register_kind
from .forms import ORIGINAL
from .spec import ChainSpec

KIND = register_kind(Kind(ChainSpec.kind, ChainSpec, ORIGINAL))
