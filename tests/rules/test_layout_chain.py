"""The layout-chain rule: what it finds, in the spellings users write, and what it leaves."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convrewrite
from convrewrite.capture import annotate, capture
from convrewrite.rules import layout_chain


def chains_of(model, *inputs):
    gm = capture(model)
    annotate(gm, inputs)
    return list(layout_chain.find(gm))


class Seed000(nn.Module):
    """Seed 000's c2: a Linear between transposes over [N, C, L]."""

    def __init__(self, c=8):
        super().__init__()
        self.c2 = nn.Linear(c, c, bias=False)

    def forward(self, x):
        return self.c2(x.transpose(-2, -1)).transpose(-1, -2)


class ConvFFN(nn.Module):
    """FastSpeech's position-wise FFN: Conv1d(k=1) between transposes over [B, L, D]."""

    def __init__(self, d=8, h=16):
        super().__init__()
        self.w1, self.w2 = nn.Conv1d(d, h, 1), nn.Conv1d(h, d, 1)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x.transpose(1, 2)))).transpose(1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1, self.act, self.pw2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(self.act(self.pw1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def test_seed000_linear_between_transposes():
    (site,) = chains_of(Seed000(), torch.randn(4, 8, 5))
    assert site.spec.channel_axis == "first" and site.spec.ops == (("mix", 8, 8, False),)
    assert site.params == ("c2.weight", None) and site.original == "as_written" and "2 permutes" in site.note


def test_ffn_of_convs_on_channel_last_data():
    (site,) = chains_of(ConvFFN(), torch.randn(2, 7, 8))
    assert site.spec.channel_axis == "last"
    assert site.spec.ops == (("mix", 8, 16, True), ("act", "relu"), ("mix", 16, 8, True))
    assert site.path == "w1..w2"


def test_convnext_block_chain():
    (site,) = chains_of(ConvNeXtBlock(), torch.randn(2, 8, 6, 6))
    assert [op[0] for op in site.spec.ops] == ["ln", "mix", "act", "mix", "scale"]
    assert site.spec.ops[0] == ("ln", 8, 1e-6, True, True) and len(site.params) == 7


@pytest.mark.parametrize("enter, leave", [
    (lambda x: x.permute(0, 2, 1), lambda y: y.permute(0, 2, 1)),
    (lambda x: x.mT, lambda y: y.mT),
    (lambda x: torch.transpose(x, 1, 2), lambda y: y.movedim(2, 1)),
    (lambda x: x.movedim(1, -1).contiguous(), lambda y: y.transpose(1, 2)),
])
def test_spellings_of_the_permutation(enter, leave):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return leave(F.gelu(F.linear(enter(x), self.w)) * 2.0)

    (site,) = chains_of(M(), torch.randn(2, 4, 5))
    assert [op[0] for op in site.spec.ops if op[0] != "contiguous"] == ["mix", "act", "mul"]


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        t = x.transpose(1, 2)
        return self.lin(t).transpose(1, 2) + t.sum()


class NotInverse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x.permute(0, 2, 3, 1)).permute(0, 2, 1, 3)


class WithDropout(Seed000):
    def __init__(self):
        super().__init__(4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.c2(x.transpose(1, 2))).transpose(1, 2)


class LayerNormOverTwoDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm((5, 4))

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def test_leaves_other_chains_alone():
    assert chains_of(LayerNormOverTwoDims(), torch.randn(2, 4, 5)) == []


def test_a_permuted_tensor_read_twice_stays_for_its_other_reader():
    (site,) = chains_of(UsedTwice(), torch.randn(2, 4, 5))
    assert site.spec.permutes_back and [n.target for n in site.nodes] == ["lin"]
    assert site.x.name == "x" and site.note == "removes 1 permute"


@pytest.mark.parametrize("model, x", [(NotInverse(), torch.randn(2, 4, 3, 3)), (WithDropout(), torch.randn(2, 4, 5))])
def test_a_chain_that_does_not_reach_the_inverse_is_open_up_to_its_last_chain_op(model, x):
    (site,) = chains_of(model, x)
    assert not site.spec.permutes_back and [op.op for op in site.spec.ops] == ["mix"]
    assert site.node.target in ("lin", "c2") and site.note == "removes 1 permute; permutes the output instead"


def test_adjacent_chains_do_not_share_a_permutation():
    """Seed000 -> Conv1d(k=1) -> Seed000: the middle conv sits between the first chain's exit and
    the second's entry, a chain of its own only if those transposes were free."""
    model = nn.Sequential(Seed000(), nn.Conv1d(8, 8, 1), Seed000())
    first, second = chains_of(model, torch.randn(2, 8, 5))
    assert (first.path, second.path) == ("0.c2", "2.c2")
    assert not {first.node, *first.nodes} & {second.node, *second.nodes}


class DownsampleThenBlock(nn.Module):
    """timm's Sequencer2d on [N, H, W, C]: a conv between permutes, then a block whose norm
    reads the permuted value beside its residual (so that permute stays for the add)."""

    def __init__(self, c=8):
        super().__init__()
        self.down, self.norm, self.fc = nn.Conv2d(c, 2 * c, 1), nn.LayerNorm(2 * c), nn.Linear(2 * c, 2 * c)

    def forward(self, x):
        x = self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc(self.norm(x))


def test_a_chain_does_not_start_inside_the_chain_before_it():
    (down,) = chains_of(DownsampleThenBlock(), torch.randn(2, 5, 5, 8))  # the block's chain would read down's output
    assert down.path == "down"


def test_a_chain_after_a_chain_rewrites_with_every_rewrite_forced():
    model, x = DownsampleThenBlock(), torch.randn(2, 5, 5, 8)
    opt = convrewrite.optimize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it warned "rewriting failed (... used before it has been defined)"
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x))
    assert opt.report.rewritten


class Regrouped(nn.Module):
    """A Linear over pixels with the spatial dims merged inside the chain, in several spellings."""

    def __init__(self, enter, leave):
        super().__init__()
        self.lin, self.enter, self.leave = nn.Linear(4, 6), enter, leave

    def forward(self, x):
        n, c, h, w = x.shape
        return self.leave(self.lin(self.enter(x, n, h, w)), n, h, w)


@pytest.mark.parametrize("enter, leave", [
    (lambda x, n, h, w: x.permute(0, 2, 3, 1).reshape(n, h * w, -1),
     lambda y, n, h, w: y.reshape(n, h, w, -1).permute(0, 3, 1, 2)),
    (lambda x, n, h, w: x.permute(0, 2, 3, 1).flatten(1, 2),
     lambda y, n, h, w: y.unflatten(1, (h, w)).permute(0, 3, 1, 2)),
    (lambda x, n, h, w: torch.flatten(x.movedim(1, -1), 0, 2),
     lambda y, n, h, w: y.view(n, h, w, 6).movedim(-1, 1)),
])
def test_regrouping_the_other_dims_inside_the_chain(enter, leave):
    model, x = Regrouped(enter, leave), torch.randn(2, 4, 3, 5)
    (site,) = chains_of(model, x)
    assert site.spec.ops == (("mix", 4, 6, True),) and site.spec.shape == (2, 4, 3, 5)


def test_regroupings_that_do_not_cancel_are_left_alone():
    transposed_pixels = Regrouped(lambda x, n, h, w: x.permute(0, 2, 3, 1).reshape(n, h * w, -1),
                                  lambda y, n, h, w: y.reshape(n, w, h, -1).permute(0, 3, 1, 2))
    assert chains_of(transposed_pixels, torch.randn(2, 4, 3, 5)) == []  # back as [n, w, h]: other pixels
    width_into_channels = Regrouped(lambda x, n, h, w: x.permute(0, 2, 3, 1).reshape(n, h, -1),
                                    lambda y, n, h, w: y.reshape(n, h, w, -1).permute(0, 3, 1, 2))
    width_into_channels.lin = nn.Linear(20, 30)
    assert chains_of(width_into_channels, torch.randn(2, 4, 3, 5)) == []


def test_a_dtype_view_is_not_a_regrouping():
    model = Regrouped(lambda x, n, h, w: (x.permute(0, 2, 3, 1).view(torch.int32) + 1).view(torch.float32),
                      lambda y, n, h, w: y.permute(0, 3, 1, 2))
    assert chains_of(model, torch.randn(2, 4, 3, 5)) == []


def test_an_in_place_activation_writing_into_the_input_is_left_alone():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.lin = nn.ReLU(inplace=True), nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.act(x.permute(0, 2, 1))).permute(0, 2, 1) + x  # x itself is changed

    assert chains_of(InPlace(), torch.randn(2, 4, 5)) == []


class FeatureProjection(nn.Module):
    """Wav2Vec2's feature projection: channels to last, LayerNorm (its output used twice), Linear."""

    def __init__(self, c=8, d=12):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(c), nn.Linear(c, d)

    def forward(self, x):
        normed = self.norm(x.transpose(1, 2))
        return self.proj(normed) + normed.mean(-1, keepdim=True)


class PatchTokens(nn.Module):
    """Tokens from a feature map, as vision transformers write it: flatten, transpose, Linear."""

    def __init__(self, c=8, d=12):
        super().__init__()
        self.embed = nn.Linear(c, d)

    def forward(self, x):
        return F.gelu(self.embed(x.flatten(2).transpose(1, 2)))


def test_an_open_chain_ends_before_a_value_with_several_users():
    (site,) = chains_of(FeatureProjection(), torch.randn(2, 8, 6))
    assert not site.spec.permutes_back and [op.op for op in site.spec.ops] == ["ln"]
    assert site.node.target == "norm" and site.params == ("norm.weight", "norm.bias")


def test_tokens_from_a_feature_map_are_an_open_chain():
    (site,) = chains_of(PatchTokens(), torch.randn(2, 8, 3, 3))
    assert site.spec.shape == (2, 8, 9) and site.spec.channel_axis == "first" and not site.spec.permutes_back
    assert [getattr(op, "name", op.op) for op in site.spec.ops] == ["mix", "gelu"]


def test_an_open_chain_that_only_moves_values_is_left_alone():
    class Relu(nn.Module):
        def forward(self, x):
            return torch.relu(x.transpose(1, 2)) * 2.0

    assert chains_of(Relu(), torch.randn(2, 8, 6)) == []


def test_a_permute_after_a_reshape_to_more_dims_is_not_the_inverse():
    class TokensToMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            n, c, h, w = x.shape
            return self.lin(x.flatten(2).transpose(1, 2)).reshape(n, h, w, c).permute(0, 3, 1, 2)

    (site,) = chains_of(TokensToMap(), torch.randn(2, 8, 3, 3))
    assert not site.spec.permutes_back and site.node.target == "lin" and site.spec.shape == (2, 8, 9)
