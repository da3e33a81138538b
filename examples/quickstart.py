"""Quickstart: optimize a model with pointwise convs, a transpose chain and a convolution
loop, and see what changed.

    python examples/quickstart.py

Builds a PointNet-style encoder (Conv1d(k=1) stacks), a Linear applied between
transposes (channels-first data through a channels-last layer), a smoothing filter written as a loop over its taps, and a 2D
pointwise block; lets ``convrewrite.optimize`` pick each site's fastest equal form from this
device's cost table, prints the report, checks the outputs agree, and times both models.
"""

import torch
import torch.nn as nn
from torch.utils import benchmark

import convrewrite


class Smoother(nn.Module):
    """A per-channel smoothing filter written the way people first write it: a loop over taps."""

    def __init__(self, channels, taps=5):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels, taps), 1 / taps))

    def forward(self, x):
        taps, length = self.weight.shape[1], x.shape[-1]
        padded = nn.functional.pad(x, (taps // 2, taps // 2))
        out = torch.zeros_like(x)
        for t in range(taps):
            out = out + self.weight[:, t:t + 1] * padded[..., t:t + length]
        return out


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.points = nn.Sequential(  # PointNet's shared per-point MLP, written as Conv1d(k=1)
            nn.Conv1d(8, 32, 1), nn.ReLU(), nn.Conv1d(32, 64, 1), nn.ReLU(), nn.Conv1d(64, 128, 1))
        self.smooth = Smoother(128)
        self.c2 = nn.Linear(128, 128)  # applied between transposes
        self.mix = nn.Conv2d(16, 32, 1)  # a 1x1 conv in a 2D branch

    def forward(self, points, image):
        features = self.smooth(self.points(points))
        features = self.c2(features.transpose(1, 2)).transpose(1, 2)
        return features.amax(dim=2), self.mix(image).mean(dim=(2, 3))


def main():
    torch.manual_seed(0)
    model = Model().eval()
    inputs = (torch.randn(128, 8, 256), torch.randn(8, 16, 32, 32))
    optimized = convrewrite.optimize(model)

    with torch.inference_mode():
        optimized(*inputs)  # the first call captures and rewrites for this input signature
        print(optimized.report)
        for got, want in zip(optimized(*inputs), model(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        print("\noutputs match the original model")

        threads = torch.get_num_threads()
        times = {name: benchmark.Timer("m(*inputs)", globals={"m": m, "inputs": inputs}, num_threads=threads)
                 .blocked_autorange(min_run_time=1.0).median
                 for name, m in (("original", model), ("optimized", optimized))}
    print(f"original {times['original'] * 1e3:.2f} ms, optimized {times['optimized'] * 1e3:.2f} ms: "
          f"{times['original'] / times['optimized']:.2f}x")


if __name__ == "__main__":
    main()
