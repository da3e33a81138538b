"""Assertions shared by the tests."""

from __future__ import annotations

import torch


def assert_same_outputs_and_grads(model, optimized, *inputs, atol=1e-5, rtol=1e-4):
    """Forward and backward of ``optimized`` equal those of ``model`` (they share parameters)."""
    params = list(model.parameters())
    ref = model(*inputs)
    ref_grads = torch.autograd.grad(ref.sum(), params) if params else ()
    for _ in range(2):  # the first call specialises; the second runs the rewritten graph
        out = optimized(*inputs)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
        grads = torch.autograd.grad(out.sum(), list(optimized.parameters())) if params else ()
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=atol * 10, rtol=rtol * 10)
