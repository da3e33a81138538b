import torch
import torch.nn as nn

from convrewrite.capture import annotate, capture
from convrewrite.emit import emit, site_calls, verify
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
