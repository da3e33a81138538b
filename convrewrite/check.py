"""The whole-graph check: is the rewritten graph faster than the captured one, on these inputs?

Each site's form is chosen from figures of the site alone. Inside a model its neighbours
change the picture (what stays in cache, the layout the next op reads), so a choice that
wins alone can lose in place: a specialisation keeps its rewrites only if the whole rewritten
graph, timed against the graph as captured, is faster by a margin (graphs within noise of
each other are timed again, longer). Both run on copies of the real
inputs (a model may write into its input), forward and, when autograd records, backward to
the parameters; buffers (BatchNorm's running statistics) are swapped for copies and the
random number streams restored afterwards, so checking leaves no trace on the user's model
(not even a version bump on a buffer the user's own first output saved for its backward).

Where the captured graph's annotating run alone (forward only, less a generous allowance per
node for the interpreter) took ``CLEAR_WIN`` times longer than one call of the rewritten
graph, the rewrite has won without a contest: a loop lifted to one conv is not run again.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .measure import time_callables

ROUNDS = 3
BLOCK_S = 0.005
CLEAR_WIN = 3.0
MARGIN = 1.02  # the rewrite must win by this much: a tie within the noise keeps the graph as written
CLOSE = 1.15  # two graphs closer than this are timed again, with more rounds, before one is picked
INTERPRETER_S = 1e-4  # per node: more than fx.Interpreter adds to a node's own time


def whole_graph_times(original: fx.GraphModule, rewritten: fx.GraphModule, model: nn.Module,
                      flat: tuple, annotated_s: float) -> dict[str, float]:
    """Seconds per call of ``original`` and ``rewritten`` (graphs over ``model``'s parameters)
    on copies of ``flat``, timed side by side; the model's buffers and RNG state are kept.
    ``annotated_s``: how long annotating ``original`` on ``flat`` took."""
    leaves = pytree.tree_map_only(torch.Tensor, _copy, flat)
    params = [p for p in model.parameters() if p.requires_grad]
    devices = sorted({t.device.index or 0 for t in pytree.tree_leaves(flat)
                      if isinstance(t, torch.Tensor) and t.is_cuda})
    fns = {"original": _step(original, leaves, params), "rewritten": _step(rewritten, leaves, params)}
    floor = annotated_s - INTERPRETER_S * len(original.graph.nodes)  # the original takes at least this
    with _buffers_swapped(model), torch.random.fork_rng(devices=devices):
        once = time_callables({"rewritten": fns["rewritten"]}, rounds=1, block_s=0)
        if once and floor > CLEAR_WIN * once["rewritten"]:
            return {"original": floor, **once}
        times = time_callables(fns, rounds=ROUNDS, block_s=BLOCK_S)
        if len(times) == 2 and max(times.values()) < CLOSE * min(times.values()):
            times = time_callables(fns, rounds=3 * ROUNDS, block_s=BLOCK_S)
        return times


def rewrite_wins(times: dict[str, float]) -> bool:
    """Whether the rewritten graph beat the original by :data:`MARGIN`."""
    return times["rewritten"] * MARGIN <= times["original"]


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_(t.requires_grad)


def _step(gm: fx.GraphModule, leaves: tuple, params: list[torch.Tensor]):
    """One call as the user's is made: forward, plus backward to what requires grad if
    autograd records (gradients returned, never accumulated into ``.grad``). An input that
    requires grad reaches the graph as a non-leaf (as the user's usually is), so the
    model may write into it."""
    if not torch.is_grad_enabled():
        return lambda: gm.forward(*leaves)
    wrt = params + [t for t in pytree.tree_leaves(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]

    def forward_backward():
        inputs = pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t.requires_grad else t, leaves)
        outs = [o for o in pytree.tree_leaves(gm.forward(*inputs)) if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs and wrt:
            torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
    return forward_backward


@contextlib.contextmanager
def _buffers_swapped(model: nn.Module):
    """Every buffer replaced by a copy (one per tensor, so tied buffers stay tied) for the
    duration; the user's own buffer tensors are put back untouched."""
    slots = [(m._buffers, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    copies = {}
    for buffers, name, b in slots:
        buffers[name] = copies.setdefault(id(b), b.detach().clone())
    try:
        yield
    finally:
        for buffers, name, b in slots:
            buffers[name] = b
