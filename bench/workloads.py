"""Workloads of the bench: convolutions as users post them on the PyTorch forums, at the sizes
they quote, and real blocks.

Each workload builds ``(model, inputs)``; the bench times the model as written, as
``convrewrite.optimize`` rewrites it, with every form forced at its sites, and under
``torch.compile``. Convolutions written as Python code also carry the forum's hand-written
answer (``reference``), timed in the same run. The forum code is copied as the users wrote it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


COMPILED = ("inductor", "inductor-1x1mm", "compile-convrewrite")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    source: str
    make: Callable[[], tuple[nn.Module, tuple]]
    reference: Callable[[nn.Module], nn.Module] | None = None  # the hand-written best form
    train: bool = True  # also timed as a training step
    compiled: tuple[str, ...] = COMPILED  # the torch.compile anchors it is timed under


class Reference(nn.Module):
    """A hand-written answer: ``fn(model, *inputs)``, reading the model's own parameters."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


class LinearBetweenTransposes(nn.Module):
    """``Linear`` between transposes, over channels-first [N, C, L] data."""

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
    """A Conv1d(k=1) applied to a [N, L, C] tensor through a transpose."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, 1)

    def forward(self, x):
        return self.conv(x.transpose(1, 2))


class PatchTokens(nn.Module):
    """Tokens from a feature map (``flatten(2).transpose(1, 2)``) into a Linear, as vision
    transformers embed them: a chain with no permute back."""

    def __init__(self, cin, cout):
        super().__init__()
        self.embed = nn.Linear(cin, cout)

    def forward(self, x):
        return self.embed(x.flatten(2).transpose(1, 2))


class FeatureProjection(nn.Module):
    """Wav2Vec2's feature projection on [N, C, T] features: transpose, LayerNorm (whose output
    is also returned), Linear: a chain with no permute back."""

    def __init__(self, c=512, d=768):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(c), nn.Linear(c, d)

    def forward(self, x):
        normed = self.norm(x.transpose(1, 2))
        return self.proj(normed), normed


def _conv2d_large():
    return nn.Conv2d(64, 64, 1), (torch.randn(10, 64, 128, 128),)


def _conv1d_short():
    return nn.Conv1d(32, 32, 1, bias=False), (torch.randn(128, 32, 5),)


def _conv1d_permuted():
    return nn.Conv1d(8, 32, 1), (torch.randn(128, 256, 8).permute(0, 2, 1).contiguous(),)


def _conv1d_transposed():
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


def convolve(a, v):
    """Rows of ``a`` fully convolved with rows of ``v`` by a double loop."""
    if a.ndim == 1:
        a = a.view(1, -1)
        v = v.view(1, -1)
    nrows, vcols = v.shape
    acols = a.shape[1]
    expanded = a.view((nrows, acols, 1)) * v.view((nrows, 1, vcols))
    noutdim = vcols + acols - 1
    out = torch.zeros((nrows, noutdim))
    for i in range(acols):
        for j in range(vcols):
            out[:, i+j] += expanded[:, i, j]
    return out.squeeze()


class Convolve(nn.Module):
    def forward(self, a, v):
        return convolve(a, v)


def myconv2d(input, weight, bias=None, stride=(1,1), padding=(0,0), dilation=(1,1), groups=1):
    """A convolution by unfold twice, expand, multiply, sum."""
    input = F.pad(input=input, pad= [padding[0], padding[0], padding[1], padding[1]], mode='constant', value=0)
    dh, dw = stride
    out_channels, in_channels, kh, kw = weight.shape
    batch_size = input.shape[0]
    patches = input.unfold(2, kh, dh).unfold(3, kw, dw)
    h_windows = patches.shape[2]
    w_windows = patches.shape[3]
    patches = patches.expand(out_channels, *patches.shape)
    patches = patches.permute(1, 3, 4, 0, 2, 5, 6)
    patches = patches.contiguous()
    patches = patches * weight
    patches = patches.sum(-1).sum(-1).sum(-1)
    if bias is not None:
        bias = bias.expand(batch_size, h_windows, w_windows, out_channels)
        patches = patches + bias
    patches = patches.permute(0, 3, 1, 2)
    return patches


def myconv2d_unfold(input, weight, stride=1, padding=0, dilation=1):
    """A convolution by ``nn.Unfold`` + matmul."""
    batch_size, in_channels, in_h, in_w = input.shape
    out_channels, in_channels, kh, kw = weight.shape
    unfold = torch.nn.Unfold(kernel_size=(kh, kw), dilation=dilation, padding=padding, stride=stride)
    inp_unf = unfold(input)
    out_unf = inp_unf.transpose(1, 2).matmul(weight.view(weight.size(0), -1).t()).transpose(1, 2)
    out_h = (in_h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out_w = (in_w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = out_unf.view(batch_size, out_channels, out_h, out_w)
    return out


class MyConv2d(nn.Module):
    """A custom Conv2d layer over these unfold functions."""

    def __init__(self, cin=16, cout=32, k=3, unfold_matmul=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5)
        self.bias = None if unfold_matmul else nn.Parameter(torch.zeros(cout))
        self.unfold_matmul = unfold_matmul

    def forward(self, x):
        if self.unfold_matmul:
            return myconv2d_unfold(x, self.weight, padding=1)
        return myconv2d(x, self.weight, self.bias)


def manual_conv2d(input_tensor, weight):
    """A single-channel convolution by a Python loop over output pixels."""
    pad_height = weight.shape[2] // 2
    pad_width = weight.shape[3] // 2
    padded_input = F.pad(input_tensor, (pad_width, pad_width, pad_height, pad_height), mode='constant', value=0)
    output_height = input_tensor.shape[2]
    output_width = input_tensor.shape[3]
    output_tensor = torch.zeros((1, 1, output_height, output_width), dtype=torch.float32)
    for i in range(output_height):
        for j in range(output_width):
            output_tensor[0, 0, i, j] = torch.sum(padded_input[0, 0, i:i + weight.shape[2], j:j + weight.shape[3]] * weight)
    return output_tensor


class PerPixel(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, k, k))

    def forward(self, x):
        return manual_conv2d(x, self.weight)


class CausalTaps(nn.Module):
    """A depthwise causal conv written as a loop over its taps (WaveNet / Mamba style)."""

    def __init__(self, channels=64, taps=9):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, taps) / taps ** 0.5)

    def forward(self, x):
        k, length = self.weight.shape[1], x.shape[-1]
        xpad = F.pad(x, (k - 1, 0))
        y = torch.zeros_like(x)
        for t in range(k):
            y = y + self.weight[:, t:t + 1] * xpad[..., t:t + length]
        return y


LOOP_WORKLOADS = [
    Workload("convolve-loop", "batched full 1D convolution, double loop, 1000 rows x 9 x 5",
             lambda: (Convolve(), (torch.randn(1000, 9), torch.randn(1000, 5))),
             lambda m: Reference(m, lambda _, a, v: torch.conv1d(a.unsqueeze(0), v.unsqueeze(1).flip(2),
                                                                 padding=v.size(1) - 1, groups=a.size(0)).squeeze(0)),
             train=False),
    Workload("unfold-mul-sum", "unfold + expand + mul + sum conv, [8,16,64,64] * 32x16x3x3",
             lambda: (MyConv2d(), (torch.randn(8, 16, 64, 64),)),
             lambda m: Reference(m, lambda m, x: F.conv2d(x, m.weight, m.bias))),
    Workload("unfold-matmul", "nn.Unfold + matmul conv, [8,16,64,64] * 32x16x3x3, padding 1",
             lambda: (MyConv2d(unfold_matmul=True), (torch.randn(8, 16, 64, 64),)),
             lambda m: Reference(m, lambda m, x: F.conv2d(x, m.weight, padding=1))),
    # inductor compiled a 20x20 per-pixel loop in 130 s (1605 ops); at 100x100 (40005 ops) it
    # would take hours: only our backend is timed here, inductor on per-pixel-16
    Workload("per-pixel-loop", "per-pixel loop, [1,1,100,100] * 3x3",
             lambda: (PerPixel(), (torch.randn(1, 1, 100, 100),)),
             lambda m: Reference(m, lambda m, x: F.conv2d(x, m.weight, padding=1)), compiled=("compile-convrewrite",)),
    # inductor takes 80 s to compile it for inference (for training at 12x12: 400 s)
    Workload("per-pixel-16", "the per-pixel loop on [1,1,16,16]: small enough for inductor to compile",
             lambda: (PerPixel(), (torch.randn(1, 1, 16, 16),)),
             lambda m: Reference(m, lambda m, x: F.conv2d(x, m.weight, padding=1)), train=False),
    Workload("tap-loop", "loop over 9 taps: depthwise causal conv, [16,64,4000]",
             lambda: (CausalTaps(), (torch.randn(16, 64, 4000),)),
             lambda m: Reference(m, lambda m, x: F.conv1d(F.pad(x, (m.weight.shape[1] - 1, 0)), m.weight.unsqueeze(1),
                                                          groups=x.shape[1]))),
]

WORKLOADS = [
    Workload("conv2d-1x1-large", "Conv2d(64,64,1) on [10,64,128,128]", _conv2d_large),
    Workload("conv1d-1x1-short", "Conv1d(32,32,1) on [128,32,5]", _conv1d_short),
    Workload("conv1d-1x1-permuted", "Conv1d(8,32,1) on [128,8,256] (permuted copy)", _conv1d_permuted),
    Workload("conv1d-on-transposed", "Conv1d(8,32,1) on [128,256,8].transpose(1,2)", _conv1d_transposed),
    Workload("linear-transposes", "c2 = Linear(32,32) between transposes on [128,32,5]",
             lambda: (LinearBetweenTransposes(32), (torch.randn(128, 32, 5),))),
    Workload("linear-transposes-long", "c2 = Linear(64,64) between transposes on [10,64,16384]",
             lambda: (LinearBetweenTransposes(64), (torch.randn(10, 64, 16384),))),
    Workload("ffn-transposed", "FFN as Conv1d(k=1) between transposes, [16,128,256]",
             lambda: (TransposedFFN(), (torch.randn(16, 128, 256),))),
    Workload("convnext-block", "ConvNeXt block, [8,96,28,28]", lambda: (ConvNeXtBlock(), (torch.randn(8, 96, 28, 28),))),
    Workload("shared-transpose", "transposed tensor used twice, [32,64,256]",
             lambda: (SharedTranspose(), (torch.randn(32, 64, 256),))),
    Workload("tokens-linear", "Linear(64,128) on [32,64,8,8].flatten(2).transpose(1,2)",
             lambda: (PatchTokens(64, 128), (torch.randn(32, 64, 8, 8),))),
    Workload("feature-projection", "Wav2Vec2 feature projection (LayerNorm, Linear) on [4,512,200]",
             lambda: (FeatureProjection(), (torch.randn(4, 512, 200),)), train=False),  # two outputs
    Workload("pointnet", "PointNet encoder, [8,3,1024] points", lambda: (PointNetEncoder(), (torch.randn(8, 3, 1024),))),
    Workload("mobilenetv2-block", "MobileNetV2 inverted residual, [8,32,56,56]",
             lambda: (InvertedResidual(), (torch.randn(8, 32, 56, 56),))),
    Workload("resnet-bottleneck", "ResNet bottleneck, [8,256,28,28]", lambda: (Bottleneck(), (torch.randn(8, 256, 28, 28),))),
    Workload("ffn-conv1d", "Transformer FFN as Conv1d(k=1), [16,256,128]", lambda: (ConvFFN(), (torch.randn(16, 256, 128),))),
    Workload("conformer-conv", "Conformer convolution module, [8,144,256]", lambda: (ConformerConv(), (torch.randn(8, 144, 256),))),
    Workload("audio-stack", "1D audio stack, [8,1,16000]", lambda: (AudioStack(), (torch.randn(8, 1, 16000),))),
]
WORKLOADS += LOOP_WORKLOADS
