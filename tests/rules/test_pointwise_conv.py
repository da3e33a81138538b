"""The pointwise-conv rule: what it finds, and what it must leave alone."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convrewrite.capture import annotate, capture
from convrewrite.rules import find_sites
from convrewrite.spec import CHANNELS_LAST


def sites_of(model, *inputs):
    gm = capture(model)
    annotate(gm, inputs)
    return find_sites(gm)


class Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("conv, x", [
    (nn.Conv1d(4, 6, 1), torch.randn(2, 4, 9)),
    (nn.Conv2d(4, 6, (1, 1), stride=2, groups=2), torch.randn(2, 4, 9, 9)),
    (nn.Conv3d(4, 6, 1, padding=1, bias=False), torch.randn(2, 4, 3, 4, 5)),
    (nn.Conv2d(4, 6, 1, padding="same", dilation=3), torch.randn(2, 4, 5, 5)),
])
def test_finds_pointwise_conv_modules(conv, x):
    (site,) = sites_of(Wrap(conv), x)
    spec = site.spec
    assert site.path == "layer" and site.pattern == "pointwise conv" and site.original == "conv"
    assert (spec.batch, spec.in_channels, spec.out_channels, spec.spatial) == (2, 4, 6, tuple(x.shape[2:]))
    assert spec.groups == conv.groups and spec.stride == conv.stride and spec.bias == (conv.bias is not None)
    assert spec.padding == ((0,) * (x.dim() - 2) if isinstance(conv.padding, str) else conv.padding)
    assert site.params == ("layer.weight", "layer.bias" if conv.bias is not None else None)


def test_finds_functional_convs_with_their_arguments():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 2, 1, 1))
            self.b = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return F.conv2d(x, self.w, self.b, 2, 1, 1, 2) + torch.conv2d(x, self.w, stride=(2, 2), padding=1, groups=2)

    sites = sites_of(M(), torch.randn(1, 4, 6, 6))
    assert len(sites) == 2
    assert all(s.spec.stride == (2, 2) and s.spec.padding == (1, 1) and s.spec.groups == 2 for s in sites)
    assert sites[0].spec.bias and not sites[1].spec.bias


def test_records_layouts_and_grad_mode():
    x = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last)
    (site,) = sites_of(Wrap(nn.Conv2d(4, 6, 1)), x)
    assert site.spec.in_layout == CHANNELS_LAST and site.spec.grad
    with torch.no_grad():
        (site,) = sites_of(Wrap(nn.Conv2d(4, 6, 1)), x)
    assert not site.spec.grad


class Standardized(nn.Conv2d):
    def forward(self, x):
        w = self.weight - self.weight.mean()
        return F.conv2d(x, w, self.bias)


@pytest.mark.parametrize("layer, x", [
    (nn.Conv2d(4, 6, 3), torch.randn(1, 4, 5, 5)),
    (nn.Conv2d(4, 6, (1, 3)), torch.randn(1, 4, 5, 5)),
    (nn.Conv2d(4, 6, 1, padding=1, padding_mode="reflect"), torch.randn(1, 4, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 1), torch.randn(1, 4, 5, 5)),
    (nn.Conv2d(4, 6, 1), torch.randn(4, 5, 5)),  # unbatched
    (nn.Conv2d(4, 6, 1), torch.randn(0, 4, 5, 5)),  # empty batch
])
def test_leaves_non_pointwise_or_unusual_convs_alone(layer, x):
    assert sites_of(Wrap(layer), x) == []


def test_conv_subclass_with_its_own_forward_is_traced_through():
    (site,) = sites_of(Wrap(Standardized(4, 6, 1)), torch.randn(1, 4, 5, 5))
    assert site.params[0].op == "call_function"  # the computed weight, not the module's parameter


def test_leaves_convs_with_hooks_alone():
    conv = nn.Conv2d(4, 6, 1)
    conv.register_forward_hook(lambda m, i, o: o * 2)
    assert sites_of(Wrap(conv), torch.randn(1, 4, 3, 3)) == []


def test_finds_every_conv_of_a_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(4, 4, 1)

        def forward(self, x):
            return self.c(self.c(x))

    assert [s.path for s in sites_of(Twice(), torch.randn(2, 4, 5))] == ["c", "c"]
