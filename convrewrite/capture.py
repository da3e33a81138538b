"""Capture a module as an fx graph and annotate every tensor node with what it held on real inputs.

``symbolic_trace`` gives the graph. A submodule whose own Python cannot be traced (a loop over
``range(x.shape[1])``, say) or that a rule asked to see whole (:func:`register_opaque`: the
conv-loop rule asks for modules that call ``unfold``) becomes an opaque leaf, a ``call_module``
node marked ``OPAQUE``, and the rest is traced around it; if the root itself is such code, the
graph is one opaque call of it. :func:`annotate` runs the graph once through an fx Interpreter (as ``ShapeProp`` does)
and stores a :class:`TensorInfo` in ``node.meta["convrewrite"]``, including the device and
layout ShapeProp's ``TensorMetadata`` lacks, and the seconds each opaque call took. Finders read
shapes only from there, so they serve any graph that carries the same annotation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import inspect
import itertools
import math
import operator
import threading
import time
from typing import Callable

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from .spec import layout_of

META = "convrewrite"
OPAQUE = "convrewrite_opaque"  # node.meta key: why this module's forward was not traced through
SECONDS = "convrewrite_seconds"  # node.meta key: how long an opaque call took when annotated
SIZE = "convrewrite_size"  # node.meta key: the size (int or torch.Size) a size computation gave
ROOT = "convrewrite_root"  # the target of the one call in the graph of an untraceable root
SITE_LAYERS = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)  # the layers the rules rewrite


class CaptureError(RuntimeError):
    """The module could not be captured as an fx graph."""


@dataclasses.dataclass(frozen=True)
class KeepOpaque:
    """A rule's request to see some modules' code whole, as one opaque call: each module whose
    own code runs a node that ``runs(gm, node)`` holds for, and the root only where
    ``root(module)`` holds too. ``why`` is the note the call carries (``node.meta[OPAQUE]``)."""

    runs: Callable[[fx.GraphModule, fx.Node], bool]
    root: Callable[[torch.nn.Module], bool]
    why: str


_KEEP_OPAQUE: dict[str, KeepOpaque] = {}  # why -> request, in registration order


def register_opaque(runs: Callable[[fx.GraphModule, fx.Node], bool], why: str, *,
                    root: Callable[[torch.nn.Module], bool] = lambda module: True) -> None:
    """Keep opaque every module whose own code runs a node ``runs`` holds for (see
    :class:`KeepOpaque`). Rules register theirs when imported; registering ``why`` again
    replaces the earlier request."""
    _KEEP_OPAQUE[why] = KeepOpaque(runs, root, why)


def _kept_opaque() -> tuple[KeepOpaque, ...]:
    """The registered requests. The rules make theirs on import, so they are imported here:
    a capture keeps opaque what the rules will look for, whoever captures."""
    importlib.import_module(".rules", __package__)
    return tuple(_KEEP_OPAQUE.values())


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


@contextlib.contextmanager
def state_kept(module: torch.nn.Module):
    """Run the block, then put every submodule's attributes back as they were, containers'
    contents and buffers' values included. Tracing runs the user's forward on Proxies and
    lifting runs it on small float64 probes: a forward that caches what it computes (timm's
    LeViT keeps its attention bias in a dict keyed by device) would otherwise keep a Proxy or a
    probe, and the user's next call, or the next optimize(), would read it; a forward that
    counts its calls in a buffer (``self.count += 1``: fx runs it for real, as its operands are
    no Proxies) would count the trace. A parameter changed in place cannot be put back (it is
    not copied): :func:`tensors_changed` tells."""
    saved = [(m, dict(vars(m))) for m in module.modules()]
    contents = [(value, copy.copy(value)) for _, attrs in saved for value in attrs.values()
                if type(value) in (dict, list, set)]
    buffers = [(b, _version(b), b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        for m, attrs in saved:
            live = vars(m)
            for name in set(live) - set(attrs):
                del live[name]
            live.update(attrs)
        for container, before in contents:
            if isinstance(container, list):
                container[:] = before
            else:
                container.clear()
                container.update(before)
        with torch.no_grad():
            for buffer, version, value in buffers:
                if _version(buffer) != version:
                    buffer.copy_(value)


def tensor_state(module: torch.nn.Module, recurse: bool = True) -> dict:
    """Each parameter and buffer of ``module`` (its own only, unless ``recurse``) by name: the
    tensor and its in-place version, to tell later whether code changed them."""
    tensors = itertools.chain(module.named_parameters(recurse=recurse, remove_duplicate=False),
                              module.named_buffers(recurse=recurse, remove_duplicate=False))
    return {name: (t, _version(t)) for name, t in tensors}


def tensors_changed(module: torch.nn.Module, before: dict, recurse: bool = True) -> list[str]:
    """The names of ``module``'s parameters and buffers that were replaced or changed in
    place since ``before`` (:func:`tensor_state`)."""
    now = tensor_state(module, recurse)
    return [name for name in before.keys() | now.keys()
            if name not in now or name not in before or now[name][0] is not before[name][0]
            or now[name][1] != before[name][1]]


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot be changed outside inference mode)
        return None


AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def autocast_state() -> tuple:
    """The device types ``torch.autocast`` is on for, each with its dtype (empty where it is off)."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICES if torch.is_autocast_enabled(d))


def _modes() -> tuple:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast_state()


# fx patches torch.nn.Module process-wide while it traces, so two traces in two threads at once
# (this capture, and the make_fx inside a compile on the backend's background thread) corrupt
# each other's graphs and can leave the patch in place. Ours and the backend's take this lock.
TRACING = threading.RLock()


def capture(module: torch.nn.Module, concrete_args: dict | None = None) -> fx.GraphModule:
    """Symbolically trace ``module`` with ``concrete_args`` fixed (fx asserts them at run time);
    the graph shares the module's submodules and parameters. Submodules that cannot be traced
    are left opaque; an untraceable root gives a graph of one opaque call (target ``ROOT``)."""
    opaque: dict[str, str] = {}
    with TRACING:
        while True:
            tracer = _Tracer(opaque)
            try:
                with state_kept(module):
                    before = tensor_state(module)
                    graph = tracer.trace(module, concrete_args=concrete_args or None)
                    # before the module's state is put back: the tensor constants fx met (a
                    # torch.tensor(...) in forward) are attributes it set on the root
                    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
                    _not_recorded(tensors_changed(module, before))
            except Exception as e:  # symbolic_trace raises many types for untraceable Python
                why = (str(e) if isinstance(e, CaptureError)
                       else f"torch.fx.symbolic_trace failed: {type(e).__name__}: {e}".splitlines()[0])
                if not tracer.failed_in or tracer.failed_in in opaque:
                    return _opaque_root(module, why)
                opaque[tracer.failed_in] = why
                continue
            wanted = _wanted_opaque(gm, module, set(opaque))
            if "" in wanted:
                return _opaque_root(module, wanted[""])
            if wanted:
                opaque.update(wanted)
                continue
            for node in gm.graph.nodes:
                if node.op == "call_module" and node.target in opaque:
                    node.meta[OPAQUE] = opaque[node.target]
            return gm


def _not_recorded(changed: list[str]) -> None:
    """Raise where the traced code replaced or changed parameters or buffers: fx ran that code
    once, for real (its operands were no Proxies), and the graph does not do it again."""
    if changed:
        raise CaptureError(f"forward replaces or changes {', '.join(sorted(changed))} in place, which fx does not "
                           "record")


def _wanted_opaque(gm: fx.GraphModule, module: torch.nn.Module, already: set[str]) -> dict[str, str]:
    """The modules of traced ``gm`` that a registered request wants kept whole and are not
    yet, path -> why; just {"": why} where that is the root ``module``."""
    wanted = {}
    for request in _kept_opaque():
        owners = _owners(gm, request.runs) - already - set(wanted)
        if "" in owners and request.root(module):
            return {"": request.why}
        wanted.update(dict.fromkeys(owners - {""}, request.why))
    return wanted


def _owners(gm: fx.GraphModule, runs: Callable[[fx.GraphModule, fx.Node], bool]) -> set[str]:
    """Paths of the modules whose own code runs a node ``runs`` holds for; "" is the root. The
    module stack of a ``call_module`` node ends in the module it calls: its owner is the one before."""
    owners = set()
    for node in gm.graph.nodes:
        if runs(gm, node):
            stack = list(node.meta.get("nn_module_stack", {}))[:-1 if node.op == "call_module" else None]
            owners.add(stack[-1] if stack else "")
    return owners


class _Tracer(fx.Tracer):
    """A tracer that keeps ``opaque`` submodules as leaves and notes where tracing failed."""

    def __init__(self, opaque: dict[str, str]):
        super().__init__()
        self.opaque, self.failed_in = opaque, ""
        self.dict_types: dict[int, tuple] = {}  # id of a dict create_arg made -> (the traced dict's type, it)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        self.modes = _modes()
        return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):  # its forward does not run: its call is a node, and the caller's
            return super().call_module(m, forward, args, kwargs)  # code is to blame for what goes wrong
        before = tensor_state(m, recurse=False)
        try:
            out = super().call_module(m, forward, args, kwargs)
            _not_recorded(tensors_changed(m, before, recurse=False))
            return out
        except Exception:
            self.failed_in = self.failed_in or path  # the innermost module raised first
            raise

    def create_arg(self, a):
        arg = super().create_arg(a)
        if isinstance(a, dict) and isinstance(arg, dict):
            self.dict_types[id(arg)] = (type(a), arg)  # arg kept alive: its id stays its own
        return arg

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if kind != "output" and _modes() != self.modes:
            raise CaptureError("forward changes grad mode or autocast (torch.no_grad, torch.autocast, ...) "
                               "around tensor code, which fx does not record")
        # a graph gives its outputs back as plain dicts (generated code) or fx's immutable
        # containers (an Interpreter run, as annotate's): a model returning a dict subclass such
        # as transformers' ModelOutput, or a list, would get another type back. So outputs, and
        # the arguments fx builds a namedtuple from, are rebuilt by calls to their own types.
        if kind == "output" or kind == "call_function" and _is_namedtuple(target):
            args = tuple(self._containers_rebuilt(a) for a in args)
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def _containers_rebuilt(self, value):
        if isinstance(value, dict):
            items = {k: self._containers_rebuilt(v) for k, v in value.items()}
            kind, _ = self.dict_types.get(id(value), (dict, None))
            return super().create_node("call_function", rebuilder(kind), (items,), {})
        if isinstance(value, list):
            items = [self._containers_rebuilt(v) for v in value]
            return super().create_node("call_function", rebuilder(type(value)), (items,), {})
        if isinstance(value, tuple):
            items = [self._containers_rebuilt(v) for v in value]
            return type(value)(*items) if _is_namedtuple(type(value)) else type(value)(items)
        return value


def _is_namedtuple(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields")


@functools.lru_cache(maxsize=None)
def rebuilder(kind: type):
    """A graph function building a ``kind`` (a dict or list type) from its items: a dict by
    keywords where every key is a string (dataclass mappings such as ``ModelOutput`` take only
    that)."""

    def rebuild(items):
        if isinstance(items, dict) and all(isinstance(k, str) for k in items):
            return kind(**items)
        return kind(items)

    rebuild.__name__ = rebuild.__qualname__ = f"rebuild_{kind.__name__}"
    rebuild.rebuilds = kind
    return rebuild


def rebuilds_container(node: fx.Node) -> bool:
    """Whether ``node`` builds a container from its items: a dict, list, namedtuple or dataclass."""
    target = node.target
    return node.op == "call_function" and (hasattr(target, "rebuilds") or _is_namedtuple(target)
                                           or isinstance(target, type) and dataclasses.is_dataclass(target))


def _opaque_root(module: torch.nn.Module, why: str) -> fx.GraphModule:
    """A graph of one call of ``module`` (as submodule ``ROOT``) on forward's parameters."""
    graph, args, kwargs = fx.Graph(), [], {}
    for name, p in inspect.signature(module.forward).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise CaptureError(f"{why} (and forward takes *args or **kwargs)")
        node = graph.placeholder(name)
        if p.kind == p.KEYWORD_ONLY:
            kwargs[name] = node
        else:
            args.append(node)
    call = graph.call_module(ROOT, tuple(args), kwargs)
    call.meta[OPAQUE] = why
    graph.output(call)
    return fx.GraphModule({ROOT: module}, graph, type(module).__name__)


def hidden_sites(gm: fx.GraphModule) -> dict[str, str]:
    """The modules fx could not trace through that hold a conv or linear layer, path -> why:
    sites only a capture that sees into Python (dynamo) can find. Modules kept opaque on
    purpose (:func:`register_opaque`) are not counted."""
    not_hidden = (None, *(request.why for request in _kept_opaque()))
    return {n.target: n.meta[OPAQUE] for n in gm.graph.nodes
            if n.op == "call_module" and n.meta.get(OPAQUE) not in not_hidden
            and any(isinstance(m, SITE_LAYERS) for m in gm.get_submodule(n.target).modules())}


def opaque_root(gm: fx.GraphModule) -> str | None:
    """Why ``gm``'s root could not be traced (its graph is one opaque call), or None."""
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == ROOT), None)
    return None if node is None else node.meta[OPAQUE]


class _DataDependence(TorchDispatchMode):
    """Notes whether an op ran whose output's shape or value depends on tensor data
    (``nonzero``, boolean indexing, ``unique``, ``.item()``: torch tags them)."""

    TAGS = frozenset({torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output})

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen = self.seen or not self.TAGS.isdisjoint(func.tags)
        return func(*args, **(kwargs or {}))


class _Annotator(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        # Entering a dispatch mode imports dynamo: only graphs that read sizes pay for it.
        self._sizes_read = any(_reads_sizes(n) for n in gm.graph.nodes)
        self._data_shaped: set[fx.Node] = set()  # nodes whose sizes may change with the data

    def run_node(self, node):
        if OPAQUE in node.meta:  # timed as it runs for the user; what it does inside is unseen
            start = time.perf_counter()
            result = super().run_node(node)
            node.meta[SECONDS] = time.perf_counter() - start
            self._data_shaped.add(node)
        elif self._sizes_read:
            with _DataDependence() as mode:
                result = super().run_node(node)
            if mode.seen or not self._data_shaped.isdisjoint(node.all_input_nodes):
                self._data_shaped.add(node)
        else:
            result = super().run_node(node)
        if isinstance(result, torch.Tensor) and result.layout == torch.strided:
            node.meta[META] = TensorInfo.of(result)
        elif self._sizes_read and node not in self._data_shaped and _computes_size(node, result):
            node.meta[SIZE] = result
        return result


_SIZE_METHODS = frozenset({"size", "dim", "numel"})
_SIZE_ARITHMETIC = frozenset({operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                              operator.mod, operator.neg, math.ceil, math.floor, max, min})


def _reads_sizes(node: fx.Node) -> bool:
    """Whether ``node`` reads a tensor's sizes: ``x.shape``, ``x.size(1)``, ``x.dim()``."""
    if node.op == "call_method":
        return node.target in _SIZE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def _computes_size(node: fx.Node, result) -> bool:
    """Whether ``node`` reads a tensor's sizes, or does integer arithmetic on nothing but
    such sizes and constants."""
    if not isinstance(result, (int, torch.Size)) or isinstance(result, bool):
        return False
    if _reads_sizes(node):
        return True
    return (node.op == "call_function" and node.target in _SIZE_ARITHMETIC
            and all(SIZE in n.meta for n in node.all_input_nodes))


def fold_sizes(gm: fx.GraphModule) -> None:
    """Put the sizes :func:`annotate` saw in place of the nodes that computed them, in a graph
    specialised to one input signature (whose sizes are therefore fixed): a loop over kernel
    taps sliced ``x[..., k:k + T]`` with ``T = x.shape[-1]`` then reads as fixed slices, as it
    does when dynamo captures it, and the rules can analyse it."""
    sizes = [n for n in gm.graph.nodes if SIZE in n.meta]
    fixed = lambda n: n.meta[SIZE] if SIZE in n.meta else n  # noqa: E731
    for node in sizes:
        for user in list(node.users):
            user.args, user.kwargs = fx.node.map_arg(user.args, fixed), fx.node.map_arg(user.kwargs, fixed)
    for node in reversed(sizes):
        if not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def annotate(gm: fx.GraphModule, args: tuple):
    """Run ``gm`` on real inputs (one per placeholder, in order), annotating its nodes;
    return the graph's output."""
    return _Annotator(gm).run(*args)
