import pytest
import torch
import torch.nn as nn

from convrewrite.capture import annotate, capture
from convrewrite.emit import emit, site_calls, verify, with_strides
from convrewrite.forms import Form, get_form
from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.kinds.channel_mix.forms import conv
from convrewrite.rules import find_sites

SPEC = ChannelMixSpec(2, 4, 6, (5, 5))


def test_verify_accepts_equal_forms_and_names_wrong_ones():
    original = get_form("channel_mix", "conv")
    assert verify(get_form("channel_mix", "matmul"), original, SPEC) is None
    off = Form("channel_mix", "off", lambda x, w, b, *, spec: conv(x, w, b, spec=spec) + 1e-2)
    assert "differs" in verify(off, original, SPEC)
    shape = Form("channel_mix", "shape", lambda x, w, b, *, spec: conv(x, w, b, spec=spec)[:1])
    assert "returned" in verify(shape, original, SPEC)


def test_emit_replaces_the_conv_with_a_site_call_reading_live_weights():
    model = nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU())
    gm = capture(model)
    x = torch.randn(2, 4, 5, 5)
    annotate(gm, (x,))
    (site,) = find_sites(gm)
    emit(gm, site, get_form("channel_mix", "matmul"), "site")
    gm.recompile()
    assert [c.form.name for c in site_calls(gm)] == ["matmul"]
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0"]
    torch.testing.assert_close(gm(x), model(x))
    with torch.no_grad():
        model[0].weight.mul_(2)  # the graph reads the user's parameter, not a copy
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("grad", [False, True])
def test_with_strides_views_where_only_size_one_dims_differ_and_copies_otherwise(grad):
    source = torch.randn(44, 1, 158, requires_grad=grad)
    y = source.permute(0, 2, 1)  # [44, 158, 1], strides (158, 1, 158): the layout of (158, 1, 1)
    same_layout = with_strides(y, (158, 1, 1))
    assert same_layout.stride() == (158, 1, 1) and same_layout.data_ptr() == y.data_ptr()
    other = with_strides(y, (1, 44, 44))  # channels first over the batch: another layout
    assert other.stride() == (1, 44, 44) and other.data_ptr() != y.data_ptr()
    for out in (same_layout, other):
        torch.testing.assert_close(out, y)
    if grad:
        (same_layout.sum() + 2 * other.sum()).backward()
        torch.testing.assert_close(source.grad, torch.full_like(source, 3.0))
    assert with_strides(y, y.stride()) is y
