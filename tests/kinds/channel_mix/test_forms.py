"""Every registered form against the original conv over a grid of specs, forward and backward."""

import itertools

import pytest
import torch

import convrewrite
from convrewrite.forms import Form, forms_for, get_form, unregister_form
from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.kinds.channel_mix.forms import ORIGINAL, conv
from convrewrite.spec import CHANNELS_FIRST, CHANNELS_LAST, STRIDED, layout_of

GRID = [
    dict(spatial=sp, groups=g, stride=(st,) * len(sp), padding=(p,) * len(sp), bias=bias, in_layout=layout)
    for sp, g, st, p, bias, layout in itertools.product(
        [(7,), (5, 6), (3, 4, 5)], [1, 2], [1, 2], [0, 1], [True, False], [CHANNELS_FIRST, CHANNELS_LAST, STRIDED])
]
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 5e-2}


def _spec(dtype, **kw):
    spec = ChannelMixSpec(batch=2, in_channels=4, out_channels=6, dtype=dtype, grad=True, **kw)
    x, w, b = spec.example_inputs()
    return ChannelMixSpec(**{**spec.__dict__, "out_layout": layout_of(conv(x, w, b, spec=spec))})


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("kw", GRID, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_every_form_equals_the_conv(dtype, kw):
    spec = _spec(dtype, **kw)
    x, w, b = spec.example_inputs(torch.Generator().manual_seed(0))
    inputs = [t for t in (x, w, b) if t is not None]
    ref = conv(x, w, b, spec=spec)
    ref_grads = torch.autograd.grad(ref, inputs, torch.ones_like(ref))
    tol = TOLERANCE[dtype]
    forms = forms_for(spec)
    assert len(forms) >= 2 and forms[0].name == "conv"
    for form in forms:
        y = form(x, w, b, spec=spec)
        assert y.shape == ref.shape and y.dtype == ref.dtype, form.name
        assert layout_of(y) == spec.out_layout, form.name
        torch.testing.assert_close(y, ref, atol=tol, rtol=tol, msg=form.name)
        for g, r in zip(torch.autograd.grad(y, inputs, torch.ones_like(y)), ref_grads):
            torch.testing.assert_close(g, r, atol=tol * 10, rtol=tol * 10, msg=form.name)


def test_legality_checks_exclude_ungroupable_forms():
    names = {f.name for f in forms_for(ChannelMixSpec(1, 4, 4, (3, 3), groups=2))}
    assert {"conv", "matmul", "conv_channels_last"} <= names
    assert not names & {"linear", "addmm", "baddbmm"}


def test_channels_last_conv_is_not_offered_where_it_is_the_original():
    assert "conv_channels_last" not in {f.name for f in forms_for(ChannelMixSpec(1, 4, 4, (3, 3), in_layout=CHANNELS_LAST))}
    assert "conv_channels_last" not in {f.name for f in forms_for(ChannelMixSpec(1, 4, 4, (9,)))}


def test_register_and_unregister_a_form():
    @convrewrite.register_form("channel_mix", "test_double_conv", supports=lambda s: s.groups == 1)
    def double(x, w, b, *, spec):
        return conv(x, w, b, spec=spec)

    try:
        assert get_form("channel_mix", "test_double_conv").fn is double
        assert "test_double_conv" not in {f.name for f in forms_for(ChannelMixSpec(1, 4, 4, (3,), groups=2))}
    finally:
        unregister_form("channel_mix", "test_double_conv")
    with pytest.raises(KeyError, match="registered"):
        get_form("channel_mix", "test_double_conv")


def test_source_hash_changes_with_the_source():
    def a(x, w, b, *, spec):
        return x

    def b_(x, w, b, *, spec):
        return x + 0

    assert Form("k", "n", a).source_hash != Form("k", "n", b_).source_hash
    assert get_form("channel_mix", ORIGINAL).source_hash == get_form("channel_mix", ORIGINAL).source_hash
