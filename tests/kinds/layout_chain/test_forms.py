"""Every layout-chain form against the chain as written, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from convrewrite.forms import forms_for
from convrewrite.kinds.layout_chain import ChainSpec
from convrewrite.kinds.layout_chain.forms import as_written
from convrewrite.spec import CHANNELS_FIRST, CHANNELS_LAST

CONVNEXT = (("ln", 8, 1e-6, True, True), ("mix", 8, 32, True), ("act", "gelu", "none"), ("mix", 32, 8, True),
            ("scale", 8))
CHAINS = [
    ("first", (2, 8, 5), (("mix", 8, 8, False),)),
    ("first", (2, 8, 4, 3), CONVNEXT),
    ("first", (2, 8, 4, 3), (("contiguous",), ("ln", 8, 1e-5, False, False), ("act", "gelu", "tanh"),
                             ("mul", 0.5), ("sub", 1.0), ("div", 3.0), ("shift", 8))),
    ("first", (2, 8, 2, 3, 2), (("mix", 8, 4, True), ("act", "silu"), ("add", 2))),
    ("last", (2, 7, 8), (("mix", 8, 16, True), ("act", "relu"), ("mix", 16, 8, True))),
    ("last", (3, 5, 8), (("contiguous",), ("mix", 8, 8, False), ("act", "sigmoid"), ("scale", 8), ("act", "tanh"))),
]


# a channels-last memory layout only exists for inputs whose channels are at dim 1
# and every chain also open: no inverse permute at its end
CASES = [(*chain, layout, back) for chain in CHAINS for layout in (CHANNELS_FIRST, CHANNELS_LAST)
         for back in (True, False) if layout == CHANNELS_FIRST or chain[0] == "first"]


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-9), ("float32", 2e-5)])
@pytest.mark.parametrize("axis, shape, ops, layout, back", CASES)
def test_every_form_equals_the_chain_as_written(axis, shape, ops, layout, back, dtype, tol):
    spec = ChainSpec(shape, axis, ops, dtype=dtype, in_layout=layout, grad=True, permutes_back=back)
    args = spec.example_inputs(torch.Generator().manual_seed(0))
    inputs = [t for t in args if t is not None]
    ref = as_written(*args, spec=spec)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    forms = forms_for(spec)
    assert len(forms) >= 2
    for form in forms:
        out = form(*args, spec=spec)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol, msg=form.name)
        for g, r in zip(torch.autograd.grad(out, inputs, grad_out), ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=tol * 10, atol=tol * 10, msg=form.name)


def test_candidates_follow_the_channel_axis():
    first = {f.name for f in forms_for(ChainSpec((1, 4, 3), "first", (("mix", 4, 4, False),)))}
    last = {f.name for f in forms_for(ChainSpec((1, 3, 4), "last", (("mix", 4, 4, False),)))}
    assert first == {"as_written", "channels_first_conv", "channels_first_matmul"}
    assert last == {"as_written", "channels_last_linear"}


def test_key_distinguishes_chains():
    a = ChainSpec((1, 4, 3), "first", (("mix", 4, 4, False),))
    b = ChainSpec((1, 4, 3), "first", (("mix", 4, 4, True),))
    c = ChainSpec((1, 4, 3), "first", (("mix", 4, 4, False),), grad=True)
    d = ChainSpec((1, 4, 3), "first", (("mix", 4, 4, False),), permutes_back=False)
    assert len({a.key(), b.key(), c.key(), d.key()}) == 4


def test_an_open_chain_ends_in_the_permuted_layout_as_the_source_leaves_it():
    spec = ChainSpec((2, 8, 5), "first", (("ln", 8, 1e-5, True, True), ("mix", 8, 6, True)), permutes_back=False)
    args = spec.example_inputs(torch.Generator().manual_seed(0))
    expected = as_written(*args, spec=spec)
    assert expected.shape == (2, 5, 6) and expected.is_contiguous()
    for form in forms_for(spec):
        out = form(*args, spec=spec)
        assert out.shape == expected.shape and out.stride() == expected.stride(), form.name


def test_layer_norm_over_dim1_is_as_accurate_as_layer_norm_in_bfloat16():
    spec = ChainSpec((2, 4, 8, 8), "first", (("ln", 4, 1e-5, True, True),), dtype="bfloat16")
    x, w, b = spec.example_inputs(torch.Generator().manual_seed(0))
    x = x * 0.01 + 1.0  # nearly equal channels: statistics taken in bfloat16 would cancel
    exact = F.layer_norm(x.double().movedim(1, -1), (4,), w.double(), b.double(), 1e-5).movedim(-1, 1)
    errors = {f.name: (f(x, w, b, spec=spec).double() - exact).abs().max().item() for f in forms_for(spec)}
    assert errors["channels_first_conv"] <= 2 * errors["as_written"] + 1e-3, errors
