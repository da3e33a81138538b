"""Whether calling a module runs hooks: rewriting or skipping its ``__call__`` would drop them."""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules import module as nn_module


def own_hooks(m: nn.Module) -> bool:
    """Hooks registered on ``m`` itself."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def hooks_on_either(a: nn.Module, b: nn.Module) -> bool:
    """Whether calling ``a`` or ``b`` runs any hook: :func:`has_hooks` of both in one call, read
    straight from ``__dict__`` (it runs on every call of an optimized module, where three calls
    and attribute lookups through each class's MRO cost about 0.3 us more)."""
    da, db = a.__dict__, b.__dict__
    return bool(da["_forward_hooks"] or da["_forward_pre_hooks"] or da["_backward_hooks"] or da["_backward_pre_hooks"]
                or db["_forward_hooks"] or db["_forward_pre_hooks"] or db["_backward_hooks"]
                or db["_backward_pre_hooks"] or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def global_hooks() -> bool:
    """Hooks registered for every module (``nn.modules.module.register_module_forward_hook`` etc.)."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` runs any hook."""
    return global_hooks() or own_hooks(m)
