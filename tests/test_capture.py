import pytest
import torch
import torch.nn as nn

from convrewrite.capture import META, CaptureError, annotate, capture, info
from convrewrite.spec import CHANNELS_LAST


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, scale=2.0):
        return self.conv(x) * scale


def test_annotate_records_every_tensor_and_returns_the_output():
    model = Model()
    gm = capture(model)
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    out = annotate(gm, (x, 3.0))
    torch.testing.assert_close(out, model(x, 3.0))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    meta = info(conv)
    assert meta.shape == (2, 4, 5, 5) and meta.dtype == torch.float32 and meta.device.type == "cpu"
    assert info(conv.args[0]).layout == CHANNELS_LAST and meta.requires_grad


def test_graph_shares_the_module_parameters():
    model = Model()
    assert capture(model).conv.weight is model.conv.weight


def test_untraceable_module_raises_capture_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(CaptureError, match="symbolic_trace failed"):
        capture(Branchy())


def test_non_tensor_nodes_are_not_annotated():
    gm = capture(Model())
    annotate(gm, (torch.randn(1, 3, 2, 2), 2.0))
    scale = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "scale")
    assert META not in scale.meta and info(None) is None
