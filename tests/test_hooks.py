"""Hooks on an optimized module, its original or every module run as they would without optimize()."""

import pytest
import torch
import torch.nn as nn
from torch.nn.modules import module as nn_module

import convrewrite

KINDS = {
    "forward": lambda m, calls: m.register_forward_hook(lambda *_: calls.append(1)),
    "forward pre": lambda m, calls: m.register_forward_pre_hook(lambda *_: calls.append(1)),
    "full backward": lambda m, calls: m.register_full_backward_hook(lambda *_: calls.append(1)),
    "full backward pre": lambda m, calls: m.register_full_backward_pre_hook(lambda *_: calls.append(1)),
}
GLOBAL = {
    "forward": lambda calls: nn_module.register_module_forward_hook(lambda *_: calls.append(1)),
    "forward pre": lambda calls: nn_module.register_module_forward_pre_hook(lambda *_: calls.append(1)),
    "full backward": lambda calls: nn_module.register_module_full_backward_hook(lambda *_: calls.append(1)),
    "full backward pre": lambda calls: nn_module.register_module_full_backward_pre_hook(lambda *_: calls.append(1)),
}


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.w


def call_and_backward(module, x):
    module(x).sum().backward()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("on", ["optimized", "original"])
def test_a_hook_added_after_the_first_call_runs_once_per_call(kind, on):
    model, x = Scale(), torch.randn(3, requires_grad=True)
    opt = convrewrite.optimize(model)
    call_and_backward(opt, x)  # specialised: later calls take the fast path
    calls = []
    KINDS[kind](opt if on == "optimized" else model, calls)
    call_and_backward(opt, x)
    assert calls == [1]


@pytest.mark.parametrize("kind", GLOBAL)
def test_a_global_hook_added_after_the_first_call_runs(kind):
    model, x = Scale(), torch.randn(3, requires_grad=True)
    opt = convrewrite.optimize(model)
    call_and_backward(opt, x)
    calls = []
    handle = GLOBAL[kind](calls)
    try:
        call_and_backward(opt, x)
    finally:
        handle.remove()
    assert calls  # once for the optimized module, and once more for the original it calls
