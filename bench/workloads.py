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


WORKLOADS = [
    Workload("seed000-conv2d", "000: Conv2d(64,64,1) on [10,64,128,128]", _seed000_2d),
    Workload("seed000-conv1d", "000: Conv1d(32,32,1) on [128,32,5]", _seed000_1d),
    Workload("seed001-conv1d", "001: Conv1d(8,32,1) on [128,8,256] (permuted copy)", _seed001_contiguous),
    Workload("seed001-transposed", "001: Conv1d(8,32,1) on [128,256,8].transpose(1,2)", _seed001_transposed),
]
