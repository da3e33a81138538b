"""Regions of a graph that may compute a convolution spelled out in ops: unrolled loops.

Dynamo unrolls Python loops (and ``symbolic_trace`` unrolls loops over Python ints), so a
per-pixel or per-tap convolution reaches a graph as hundreds of slices, products and sums
rather than as one module call. ``torch.fx``'s ``CapabilityBasedPartitioner`` groups the
polynomial ops into maximal acyclic partitions; a partition is a candidate when it slices,
multiplies, reads 2 to ``MAX_OPERANDS`` tensors of concrete size and yields one, and all
its in-place writes go to tensors it allocated itself. :func:`as_module` gives a candidate
as a ``GraphModule`` of its inputs, for :mod:`convrewrite.rules.conv_loop.lift` to run.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import create_op_support
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule, validate_partition

from ...capture import info
from .._fx import module_path
from .lift import MAX_OPERANDS, POLYNOMIAL_OPS

MAX_ELEMENTS = 2 ** 24  # larger tensors are not probed: lift runs the region in float64 at its real size
_PRODUCTS = frozenset({"mul", "mul_", "imul", "matmul", "mm", "bmm", "einsum", "tensordot", "baddbmm", "addmm"})
_WINDOWS = frozenset({"getitem", "setitem", "narrow", "unfold", "roll", "as_strided", "index_select", "gather"})
_IN_PLACE = frozenset({"setitem", "iadd", "isub", "imul"})  # besides methods ending in "_"
_VIEWS = frozenset({"getitem", "view", "reshape", "transpose", "permute", "expand", "narrow", "select",
                    "squeeze", "unsqueeze", "flatten", "unflatten", "t", "movedim", "unfold", "as_strided",
                    "detach", "alias", "diagonal", "split", "chunk", "unbind"})
_OPS = POLYNOMIAL_OPS | _PRODUCTS | _WINDOWS | _IN_PLACE


@dataclasses.dataclass(frozen=True)
class Region:
    """Nodes in graph order, the outside nodes they read, and the one node read outside."""

    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    output: fx.Node


def candidates(gm: fx.GraphModule) -> list[Region]:
    """The regions of ``gm`` that could be a convolution: each partition of polynomial ops,
    followed by its parts that ran inside one submodule, outermost first (a loop module
    under a residual add or a scale is a convolution, the partition with them is not)."""
    sequence = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(sequence)}
    found = []
    for partition in sorted(_partitions(gm), key=lambda p: min(map(order.__getitem__, p))):
        for part in (set(partition), *_module_parts(partition)):
            region = _region(sorted(_with_feeders(part), key=order.__getitem__), order, sequence)
            if region is not None and region.nodes not in (r.nodes for r in found):
                found.append(region)
    return found


def _partitions(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """``CapabilityBasedPartitioner``'s partitions of the polynomial ops of ``gm``. Where a
    ``getitem`` reads two nodes (``weight[positions]``, as Whisper's decoder does), they are
    found on a copy of the graph in which such a read is a call of :func:`index` (polynomial,
    as ``getitem`` is): the partitioner's last pass moves each ``getitem`` into the partition
    of the node it reads, and loops forever when the two it reads lie in different partitions
    (seen with torch 2.13)."""
    support = create_op_support(lambda _, node: _name(node) in _OPS)
    copied: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, copied))  # graph_copy leaves the output out: a graph without it has no code
    for node in copied.values():
        if _indexes(node):
            node.target = index
    original = {new: old for old, new in copied.items()}
    partitioner = CapabilityBasedPartitioner(fx.GraphModule(gm, graph), support, allows_single_node_partition=True)
    return [[original[n] for n in p.nodes] for p in partitioner.propose_partitions()]


def _indexes(node: fx.Node) -> bool:
    """A ``getitem`` that reads more than one node: indexing by a tensor, not a tuple's item."""
    return node.op == "call_function" and node.target is operator.getitem and len(node.all_input_nodes) > 1


def index(tensor, indices):
    """``tensor[indices]``: what :func:`_partitions` calls a ``getitem`` that reads two nodes."""
    return tensor[indices]


def as_module(gm: fx.GraphModule, region: Region) -> tuple[fx.GraphModule, tuple[fx.Node, ...]]:
    """The region as a module, and the nodes to call it on; ``gm`` is unchanged."""
    sub, inputs, _ = fuse_as_graphmodule(gm, list(region.nodes), "Region")
    return sub, inputs


def path(region: Region) -> str:
    """Where the region is, for reports: its output's module path (as dynamo or fx names it)
    and node name."""
    module = module_path(region.output)
    return f"{module}:{region.output.name}" if module else region.output.name


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _module_parts(nodes) -> list[set]:
    """The nodes of ``nodes`` that ran inside each submodule (``nn_module_stack``), outermost first."""
    parts: dict[str, set] = {}
    for node in nodes:
        for scope in node.meta.get("nn_module_stack", {}):
            parts.setdefault(scope, set()).add(node)
    return sorted(parts.values(), key=len, reverse=True)


def _with_feeders(inside: set) -> set:
    """``inside`` with the polynomial ops that only it reads: the partitioner leaves out the
    ``getitem`` s of a tensor read only through them (it takes them for a tuple's), such as
    the per-tap slices of a weight. Still acyclic: a feeder of an acyclic partition does not
    depend on it."""
    while True:
        feeders = {i for n in inside for i in n.all_input_nodes
                   if i not in inside and _name(i) in _OPS and all(u in inside for u in i.users)}
        if not feeders:
            return inside
        inside |= feeders


def _region(nodes: list[fx.Node], order: dict, sequence: list) -> Region | None:
    inside = set(nodes)
    names = {_name(n) for n in nodes}
    if not names & _PRODUCTS or not names & _WINDOWS:
        return None
    if not validate_partition(nodes):  # a submodule's part may not be acyclic
        return None
    inputs = tuple(dict.fromkeys(i for n in nodes for i in n.all_input_nodes if i not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if not 2 <= len(inputs) <= MAX_OPERANDS or len(outputs) != 1:
        return None
    (output,) = outputs
    if not all(_small_float(info(v)) for v in (*inputs, output)):
        return None
    first, last = order[nodes[0]], order[nodes[-1]]
    if any(order[u] < last for u in output.users if u not in inside):  # read before all writes are done
        return None
    if any(_writes(n) and _root(n.args[0]) not in inside for n in nodes):  # writes to a tensor it did not make
        return None
    if any(_writes(n) for n in sequence[first:last] if n not in inside):  # its inputs may change meanwhile
        return None
    return Region(tuple(nodes), inputs, output)


def _small_float(t) -> bool:
    return t is not None and t.dtype.is_floating_point and math.prod(t.shape) <= MAX_ELEMENTS


def _writes(node: fx.Node) -> bool:
    name = _name(node)
    return name in _IN_PLACE or (node.op == "call_method" and name.endswith("_") and not name.startswith("_"))


def _root(value):
    """The node a tensor value is a view of (through view ops), or the value itself."""
    while isinstance(value, fx.Node) and _name(value) in _VIEWS and value.args:
        value = value.args[0]
    return value
