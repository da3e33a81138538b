"""Quickstart: optimize a model full of pointwise convolutions and see what changed.

    python examples/quickstart.py

Builds a PointNet-style encoder (Conv1d(k=1) stacks, as in seed 001) plus a 2D pointwise
block, lets ``convrewrite.optimize`` pick each conv's fastest equal form from this device's
cost table, prints the report, checks the outputs agree, and times both models side by side.
"""

import torch
import torch.nn as nn
from torch.utils import benchmark

import convrewrite


class PointwiseModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.points = nn.Sequential(  # PointNet's shared per-point MLP, written as Conv1d(k=1)
            nn.Conv1d(8, 32, 1), nn.ReLU(), nn.Conv1d(32, 64, 1), nn.ReLU(), nn.Conv1d(64, 128, 1))
        self.mix = nn.Conv2d(16, 32, 1)  # a 1x1 conv in a 2D branch

    def forward(self, points, image):
        return self.points(points).amax(dim=2), self.mix(image).mean(dim=(2, 3))


def main():
    torch.manual_seed(0)
    model = PointwiseModel().eval()
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
