"""Assertions shared by the tests."""

from __future__ import annotations

import torch


def assert_same_outputs_and_grads(model, optimized, *inputs, atol=1e-5, rtol=1e-4, calls=2):
    """Forward and backward of ``optimized`` equal those of ``model`` (they share parameters),
    gradients to the parameters and to floating-point inputs included."""
    inputs = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in inputs]
    wrt = [p for p in model.parameters() if p.requires_grad] + [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    ref = model(*inputs)
    ref_grads = torch.autograd.grad(ref.sum(), wrt)
    for _ in range(calls):  # the first call specialises; later calls run the rewritten graph
        out = optimized(*inputs)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
        grads = torch.autograd.grad(out.sum(), wrt)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, atol=atol * 10, rtol=rtol * 10)
