"""Convolutions written as users write them, without conv ops (and near misses that are not
convolutions), for the lifting tests. Each takes data and reads its weight from a parameter
unless it says otherwise."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FullConvolve(nn.Module):
    """Seed 002: rows of ``a`` fully convolved with rows of ``v`` (both inputs), a double loop."""

    def forward(self, a, v):
        rows, taps = v.shape
        expanded = a.view(rows, a.shape[1], 1) * v.view(rows, 1, taps)
        out = torch.zeros(rows, a.shape[1] + taps - 1)
        for i in range(a.shape[1]):
            for j in range(taps):
                out[:, i + j] += expanded[:, i, j]
        return out


class PerPixel(nn.Module):
    """Seed 004: a per-pixel, single-channel 'same' cross-correlation."""

    def __init__(self, k=3, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, k, k))
        self.dtype = dtype

    def forward(self, x):
        kh, kw = self.weight.shape[2:]
        padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2))
        out = torch.zeros(1, 1, x.shape[2], x.shape[3], dtype=self.dtype)
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                out[0, 0, i, j] = torch.sum(padded[0, 0, i:i + kh, j:j + kw] * self.weight)
        return out


class UnfoldMulSum(nn.Module):
    """Seed 003: ``unfold`` twice, broadcast multiply, ``sum``; stride and padding; bias."""

    def __init__(self, cin=3, cout=4, k=3, stride=1, padding=0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.randn(cout))
        self.stride, self.padding = stride, padding

    def forward(self, x):
        p, s = self.padding, self.stride
        cout, _, kh, kw = self.weight.shape
        patches = F.pad(x, [p, p, p, p]).unfold(2, kh, s).unfold(3, kw, s)  # [B, C, H', W', kh, kw]
        patches = patches.unsqueeze(1) * self.weight[None, :, :, None, None]  # [B, O, C, H', W', kh, kw]
        return patches.sum((2, 5, 6)) + self.bias[:, None, None]


class UnfoldMatmul(nn.Module):
    """Seed 003's second version: ``nn.Unfold`` + matmul with ``weight.view(O, -1).t()``."""

    def __init__(self, cin=3, cout=4, k=3, stride=1, padding=1, dilation=1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.unfold = nn.Unfold(k, dilation=dilation, padding=padding, stride=stride)
        self.geometry = (k, stride, padding, dilation)

    def forward(self, x):
        k, s, p, d = self.geometry
        cols = self.unfold(x)
        out = cols.transpose(1, 2).matmul(self.weight.view(self.weight.size(0), -1).t()).transpose(1, 2)
        size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n in x.shape[2:]]
        return out.reshape(x.shape[0], -1, *size)


class TapLoop(nn.Module):
    """A depthwise conv over taps, ``y += w[:, t] * x[..., t:t+L]``: causal or centred."""

    def __init__(self, channels=4, k=5, causal=True):
        super().__init__()
        self.w = nn.Parameter(torch.randn(channels, k))
        self.left = k - 1 if causal else k // 2

    def forward(self, x):
        k, length = self.w.shape[1], x.shape[-1]
        xpad = F.pad(x, (self.left, k - 1 - self.left))
        y = torch.zeros_like(x)
        for t in range(k):
            y = y + self.w[:, t:t + 1] * xpad[..., t:t + length]
        return y


class ChannelsLastTaps(nn.Module):
    """A true (flipped) convolution over the time axis of [B, T, C] data, mixing channels."""

    def __init__(self, cin=3, cout=5, k=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, cin, cout))

    def forward(self, x):
        k = self.w.shape[0]
        out = x.new_zeros(x.shape[0], x.shape[1] + k - 1, self.w.shape[2])
        for t in range(k):
            out[:, t:t + x.shape[1]] += x @ self.w[t]
        return out


class WithRelu(PerPixel):
    """Not polynomial: a ReLU inside the loop."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class OuterProduct(nn.Module):
    """Polynomial but no convolution: ``out[:, i, j] = a[:, i] * w[j]``."""

    def __init__(self, n=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, a):
        out = a.new_zeros(a.shape[0], a.shape[1], self.w.shape[0])
        for i in range(a.shape[1]):
            out[:, i] = a[:, i:i + 1] * self.w
        return out


class Scaled(TapLoop):
    """A conv times a second parameter: not linear in one weight."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(1))

    def forward(self, x):
        return super().forward(x) * self.gain


class DataDependent(TapLoop):
    """Branches on the data."""

    def forward(self, x):
        y = super().forward(x)
        return y if x[0, 0, 0] > 0 else -y


class MultiChannelPerPixel(nn.Module):
    """A per-pixel loop over batch and channels at once, with a bias: a 3x3 'same' conv."""

    def __init__(self, cin=3, cout=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.randn(cout))

    def forward(self, x):
        n, _, h, w = x.shape
        padded = F.pad(x, (1, 1, 1, 1))
        out = x.new_zeros(n, self.weight.shape[0], h, w)
        for i in range(h):
            for j in range(w):
                out[:, :, i, j] = (padded[:, :, i:i + 3, j:j + 3].unsqueeze(1) * self.weight).sum((2, 3, 4)) + self.bias
        return out


class StackedWindows(nn.Module):
    """Windows stacked from slices, then one einsum: a 'valid' conv1d over [B, C, L]."""

    def __init__(self, cin=6, cout=4, k=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k))

    def forward(self, x):
        k = self.weight.shape[-1]
        length = x.shape[-1] - k + 1
        windows = torch.stack([x[..., t:t + length] for t in range(k)], -1)
        return torch.einsum("bclk,ock->bol", windows, self.weight)
