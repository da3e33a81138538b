"""Every form of a lifted convolution against ``F.convNd`` on the same operands, forward and
backward, across operand layouts, groups, strides, dilations, flips and asymmetric pads."""

import pytest
import torch
import torch.nn.functional as F

from convrewrite.forms import forms_for
from convrewrite.kinds.conv import ConvSpec


def reference(x, w, b, spec):
    """What each spec below means, written out with one conv call per case."""
    xc = x.permute(spec.x_perm).reshape(spec.conv_input_shape)
    wc = w.permute(spec.w_perm).reshape(spec.conv_weight_shape).flip([2 + i for i, f in enumerate(spec.flip) if f])
    xc = F.pad(xc, [p for pair in reversed(spec.pads) for p in pair])
    y = getattr(F, f"conv{spec.ndim}d")(xc, wc, b, spec.stride, 0, spec.dilation, spec.groups)
    return y.reshape([spec.y_shape[d] for d in spec.y_perm]).permute(
        sorted(range(len(spec.y_perm)), key=spec.y_perm.__getitem__)).reshape(spec.y_shape)


SPECS = {
    "conv2d stride pad bias": ConvSpec((2, 3, 9, 10), (4, 3, 3, 3), (2, 4, 5, 5), (0, 1, 2, 3), 1, (0, 1, 2, 3),
                                       (0, 1, 2, 3), 1, (2, 2), (1, 1), ((1, 1), (1, 1)), (False, False), bias=True),
    "depthwise full conv1d, flipped, channels-last":
        ConvSpec((2, 11, 4), (4, 3), (2, 13, 4), (0, 2, 1), 1, (0, 1), (0, 2, 1), 4, (1,), (1,), ((2, 2),), (True,)),
    "dilated asymmetric crop": ConvSpec((2, 3, 20), (5, 3, 3), (2, 5, 15), (0, 1, 2), 1, (0, 1, 2), (0, 1, 2), 1, (1,),
                                        (2,), ((1, -2),), (False,)),
    "single channel per-pixel": ConvSpec((1, 1, 7, 6), (1, 1, 3, 3), (1, 1, 7, 6), (0, 1, 2, 3), 2, (0, 1, 2, 3), (2, 3),
                                         1, (1, 1), (1, 1), ((1, 1), (1, 1)), (False, False)),
    "conv3d groups": ConvSpec((1, 4, 5, 5, 5), (4, 2, 2, 2, 2), (1, 4, 4, 4, 4), (0, 1, 2, 3, 4), 1, (0, 1, 2, 3, 4),
                              (0, 1, 2, 3, 4), 2, (1, 1, 1), (1, 1, 1), ((0, 0),) * 3, (False,) * 3, bias=True),
}


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-9), ("float32", 1e-4)])
@pytest.mark.parametrize("name", SPECS)
def test_every_form_equals_the_reference_conv(name, dtype, tol):
    spec = ConvSpec(**{**SPECS[name].__dict__, "dtype": dtype, "grad": True})
    x, w, b = spec.example_inputs(torch.Generator().manual_seed(0))
    want = reference(x, w, b, spec)
    grad_out = torch.randn(want.shape, dtype=want.dtype)
    want_grads = torch.autograd.grad(want, [t for t in (x, w, b) if t is not None], grad_out)
    forms = forms_for(spec)
    assert "conv_direct" in {f.name for f in forms} and len(forms) >= 2
    for form in forms:
        got = form(x, w, b, spec=spec)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=form.name)
        grads = torch.autograd.grad(got, [t for t in (x, w, b) if t is not None], grad_out)
        for g, r in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, r, atol=tol * 10, rtol=tol * 10, msg=form.name)


def test_unfold_is_offered_up_to_2d_and_fft_only_for_fft_dtypes():
    names = lambda spec: {f.name for f in forms_for(spec)}  # noqa: E731
    assert "conv_unfold" not in names(SPECS["conv3d groups"])
    assert "conv_fft" not in names(ConvSpec(**{**SPECS["conv2d stride pad bias"].__dict__, "dtype": "bfloat16"}))


def test_key_names_everything_that_changes_the_work():
    spec = SPECS["conv2d stride pad bias"]
    variants = [{"stride": (1, 1)}, {"pads": ((0, 0), (1, 1))}, {"bias": False}, {"flip": (True, False)},
                {"x_perm": (0, 1, 3, 2)}, {"grad": True}, {"dtype": "float64"}]
    keys = {ConvSpec(**{**spec.__dict__, **v}).key() for v in variants}
    assert len(keys | {spec.key()}) == len(variants) + 1
