"""Workloads of the bench: the seeds' pointwise convolutions at the sizes they quote.

Each workload builds ``(model, inputs)``; the bench times the model as written, as
``convrewrite.optimize`` rewrites it, with every form forced at its sites, and under
``torch.compile``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    source: str
    make: Callable[[], tuple[nn.Module, tuple]]


class Seed000Linear(nn.Module):
    """Seed 000's ``c2``: ``Linear`` between transposes, over channels-first [N, C, L] data."""

    def __init__(self, c):
        super().__init__()
        self.c2 = nn.Linear(c, c, bias=False)

    def forward(self, x):
        return self.c2(x.transpose(-2, -1)).transpose(-1, -2)


class TransposedFFN(nn.Module):
    """FastSpeech's position-wise FFN: Conv1d(k=1) + ReLU + Conv1d(k=1) between transposes, on [B, L, D]."""

    def __init__(self, d=256, hidden=1024):
        super().__init__()
        self.w1, self.w2 = nn.Conv1d(d, hidden, 1), nn.Conv1d(hidden, d, 1)

    def forward(self, x):
        return x + self.w2(torch.relu(self.w1(x.transpose(1, 2)))).transpose(1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, then a channels-last chain between two permutes."""

    def __init__(self, c=96):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(1e-6 * torch.ones(c))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class SharedTranspose(nn.Module):
    """A transposed tensor used twice: by a Linear chain and by a residual in the channel-last world."""

    def __init__(self, c=64):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        t = x.transpose(1, 2)
        return (self.lin(t) + t).transpose(1, 2)


class OnTransposed(nn.Module):
    """Seed 001: a Conv1d(k=1) applied to a [N, L, C] tensor through a transpose."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, 1)

    def forward(self, x):
        return self.conv(x.transpose(1, 2))


def _seed000_2d():
    return nn.Conv2d(64, 64, 1), (torch.randn(10, 64, 128, 128),)


def _seed000_1d():
    return nn.Conv1d(32, 32, 1, bias=False), (torch.randn(128, 32, 5),)


def _seed001_contiguous():
    return nn.Conv1d(8, 32, 1), (torch.randn(128, 256, 8).permute(0, 2, 1).contiguous(),)


def _seed001_transposed():
    return OnTransposed(8, 32), (torch.randn(128, 256, 8),)


class PointNetEncoder(nn.Module):
    """PointNet's shared MLP over points: Conv1d(k=1) + BatchNorm + ReLU, then a max pool."""

    def __init__(self):
        super().__init__()
        dims = (3, 64, 128, 1024)
        self.layers = nn.Sequential(*[m for cin, cout in zip(dims, dims[1:])
                                      for m in (nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout), nn.ReLU())])

    def forward(self, x):
        return self.layers(x).amax(dim=2)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project, residual."""

    def __init__(self, c=32, expand=6):
        super().__init__()
        h = c * expand
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


class Bottleneck(nn.Module):
    """ResNet's bottleneck: 1x1 reduce, 3x3, 1x1 expand, residual."""

    def __init__(self, c=256, mid=64):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.block(x))


class ConvFFN(nn.Module):
    """A Transformer FFN written with Conv1d(k=1) over [B, D, L] (FastSpeech style)."""

    def __init__(self, d=256, hidden=1024):
        super().__init__()
        self.w1, self.w2 = nn.Conv1d(d, hidden, 1), nn.Conv1d(hidden, d, 1)

    def forward(self, x):
        return x + self.w2(torch.relu(self.w1(x)))


class ConformerConv(nn.Module):
    """Conformer's convolution module: pointwise conv + GLU, depthwise conv, BN, SiLU, pointwise conv."""

    def __init__(self, d=144, kernel=31):
        super().__init__()
        self.pw1 = nn.Conv1d(d, 2 * d, 1)
        self.dw = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pw2 = nn.Conv1d(d, d, 1)

    def forward(self, x):
        y = nn.functional.glu(self.pw1(x), dim=1)
        return x + self.pw2(nn.functional.silu(self.bn(self.dw(y))))


class AudioStack(nn.Module):
    """A 1D audio stack: strided conv front end, then dilated k=3 convs with pointwise mixes."""

    def __init__(self, c=64):
        super().__init__()
        self.front = nn.Conv1d(1, c, 16, stride=8)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"dil": nn.Conv1d(c, c, 3, padding=d, dilation=d), "mix": nn.Conv1d(c, c, 1)})
            for d in (1, 2, 4, 8))

    def forward(self, x):
        y = self.front(x)
        for block in self.blocks:
            y = y + block["mix"](torch.tanh(block["dil"](y)))
        return y


WORKLOADS = [
    Workload("seed000-conv2d", "000: Conv2d(64,64,1) on [10,64,128,128]", _seed000_2d),
    Workload("seed000-conv1d", "000: Conv1d(32,32,1) on [128,32,5]", _seed000_1d),
    Workload("seed001-conv1d", "001: Conv1d(8,32,1) on [128,8,256] (permuted copy)", _seed001_contiguous),
    Workload("seed001-transposed", "001: Conv1d(8,32,1) on [128,256,8].transpose(1,2)", _seed001_transposed),
    Workload("seed000-c2", "000: c2 = Linear(32,32) between transposes on [128,32,5]",
             lambda: (Seed000Linear(32), (torch.randn(128, 32, 5),))),
    Workload("seed000-c2-long", "000: c2 = Linear(64,64) between transposes on [10,64,16384]",
             lambda: (Seed000Linear(64), (torch.randn(10, 64, 16384),))),
    Workload("ffn-transposed", "FFN as Conv1d(k=1) between transposes, [16,128,256]",
             lambda: (TransposedFFN(), (torch.randn(16, 128, 256),))),
    Workload("convnext-block", "ConvNeXt block, [8,96,28,28]", lambda: (ConvNeXtBlock(), (torch.randn(8, 96, 28, 28),))),
    Workload("shared-transpose", "transposed tensor used twice, [32,64,256]",
             lambda: (SharedTranspose(), (torch.randn(32, 64, 256),))),
    Workload("pointnet", "PointNet encoder, [32,3,1024] points", lambda: (PointNetEncoder(), (torch.randn(32, 3, 1024),))),
    Workload("mobilenetv2-block", "MobileNetV2 inverted residual, [8,32,56,56]",
             lambda: (InvertedResidual(), (torch.randn(8, 32, 56, 56),))),
    Workload("resnet-bottleneck", "ResNet bottleneck, [8,256,28,28]", lambda: (Bottleneck(), (torch.randn(8, 256, 28, 28),))),
    Workload("ffn-conv1d", "Transformer FFN as Conv1d(k=1), [16,256,128]", lambda: (ConvFFN(), (torch.randn(16, 256, 128),))),
    Workload("conformer-conv", "Conformer convolution module, [8,144,256]", lambda: (ConformerConv(), (torch.randn(8, 144, 256),))),
    Workload("audio-stack", "1D audio stack, [8,1,16000]", lambda: (AudioStack(), (torch.randn(8, 1, 16000),))),
]
