"""Capture a module as an fx graph and annotate every tensor node with what it held on real inputs.

``symbolic_trace`` gives the graph; :func:`annotate` runs it once through an fx Interpreter
(as ``ShapeProp`` does) and stores a :class:`TensorInfo` in ``node.meta["convrewrite"]``,
including the device and layout ShapeProp's ``TensorMetadata`` lacks. Finders read shapes
only from there, so they serve any graph that carries the same annotation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .spec import layout_of

META = "convrewrite"


class CaptureError(RuntimeError):
    """The module could not be captured as an fx graph."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What the pass needs to know of a tensor value."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    layout: str

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorInfo":
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t.requires_grad, layout_of(t))


def info(node) -> TensorInfo | None:
    """The annotation of a node (None for non-nodes and non-tensor values)."""
    return node.meta.get(META) if isinstance(node, fx.Node) else None


def capture(module: torch.nn.Module, concrete_args: dict | None = None) -> fx.GraphModule:
    """Symbolically trace ``module`` with ``concrete_args`` fixed (fx asserts them at run time);
    the graph shares the module's submodules and parameters."""
    try:
        return fx.symbolic_trace(module, concrete_args=concrete_args or None)
    except Exception as e:  # symbolic_trace raises many types for untraceable Python
        raise CaptureError(f"torch.fx.symbolic_trace failed: {type(e).__name__}: {e}".splitlines()[0]) from e


class _Annotator(fx.Interpreter):
    def run_node(self, node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor) and result.layout == torch.strided:
            node.meta[META] = TensorInfo.of(result)
        return result


def annotate(gm: fx.GraphModule, args: tuple):
    """Run ``gm`` on real inputs (one per placeholder, in order), annotating its nodes;
    return the graph's output."""
    return _Annotator(gm).run(*args)
