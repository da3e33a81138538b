"""Memory layouts, shared by every spec kind."""

import torch

from convrewrite.spec import CHANNELS_LAST, layout_of, to_layout


def test_to_layout_handles_1d_channels_last():
    x = torch.randn(2, 3, 5)
    y = to_layout(x, CHANNELS_LAST)
    assert layout_of(y) == CHANNELS_LAST and torch.equal(x, y)
