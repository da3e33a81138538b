"""The channel-mix kind: a pointwise (1x1) convolution, as ``Conv1d/2d/3d(kernel_size=1)``,
``F.conv*`` or a ``Linear`` between transposes computes it. Its unseen shapes are
predicted from the table's neighbours, and ``python -m convrewrite.profile`` times its grid."""

from .. import Kind, register_kind
from . import grid
from .forms import ORIGINAL
from .spec import ChannelMixSpec

KIND = register_kind(Kind(ChannelMixSpec.kind, ChannelMixSpec, ORIGINAL, grid))
