"""Rule: modules whose code computes a convolution (Python loops, unfold + multiply + sum,
unfold + matmul, ...) as sites lifted to one conv op. The package holds the rule's machinery:
:mod:`.lift` derives the convolution and proves it equal, :mod:`.regions` finds unrolled code.

Such code rarely traces (``range(x.shape[1])`` stops ``symbolic_trace``), so candidates are
the modules ``capture`` left opaque, the root included; this rule asks capture to keep whole
the modules that call ``unfold`` too (``UNFOLDS``; the root only if it reads few enough
tensors to be one convolution). Each is analysed as a function of its tensor inputs,
parameters and buffers at the input signature's sizes. Left as written, with the reason in
the report: modules with hooks, non-float or more than ``MAX_OPERANDS`` tensors, arguments
that are neither tensors nor fixed, and code that is not shown to be a convolution.

Code that did trace, unrolled (dynamo unrolls every loop), is found as :mod:`.regions` of
the graph and analysed at its fixed sizes; a region that is not a convolution is not a site.

The rule does not time anything: each lifted site carries a runner of its code
(``Site.source_runner``), which the decision times (:func:`convrewrite.decide.source_seconds`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import weakref

import torch
import torch.fx as fx

from ...capture import OPAQUE, ROOT, SECONDS, info, register_opaque, state_kept
from ...device import generator
from ...hooks import has_hooks
from ...kinds.conv.forms import ORIGINAL
from ...site import Site
from .._fx import FLOAT_DTYPES
from . import regions
from .lift import MAX_OPERANDS, Lifted, NotLiftable, Operand, lift

PATTERN, UNLIFTED = "conv loop", "untraced code"
UNFOLDS = "calls unfold: analysed as one call"


def _calls_unfold(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does ``node`` take sliding windows (``unfold``, ``nn.Unfold``)? Usually a convolution
    spelled out, lifted whole when its module is kept opaque."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), torch.nn.Unfold)
    return (node.op == "call_method" and node.target == "unfold") or \
        (node.op == "call_function" and node.target is torch.nn.functional.unfold)


def _reads_few_tensors(module: torch.nn.Module) -> bool:
    """Could ``module`` as a whole be one convolution (data, weight, bias and little more)?"""
    n_inputs = len(inspect.signature(module.forward).parameters)
    return n_inputs + len(list(module.parameters())) + len(list(module.buffers())) <= MAX_OPERANDS


register_opaque(_calls_unfold, UNFOLDS, root=_reads_few_tensors)


def find(gm: fx.GraphModule):
    """Yield a :class:`Site` for every opaque module call in ``gm`` (those that cannot be
    lifted have no spec, and a note that says why), and one for every region of unrolled
    code in ``gm`` that is shown to be a convolution."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and OPAQUE in node.meta:
            yield _module_site(gm, node)
    claimed = set()
    for region in regions.candidates(gm):
        site = None if claimed.intersection(region.nodes) else _region_site(gm, region)
        if site is not None:
            claimed.update(region.nodes)
            yield site


def _module_site(gm: fx.GraphModule, node: fx.Node) -> Site:
    path = "" if node.target == ROOT else node.target
    module, args = gm.get_submodule(node.target), dict(enumerate(node.args)) | node.kwargs
    try:
        if has_hooks(module):
            raise NotLiftable("has hooks")
        lifted, spec, source = _lift(module, args, info(node))
    except NotLiftable as e:
        return Site(node, None, (), None, ORIGINAL, UNLIFTED, path, note=f"left as written: {e}",
                    source_seconds=node.meta.get(SECONDS))
    tensors = _tensor_args(args)
    weights = tuple(None if n is None else tensors.get(n, f"{node.target}.{n}") for n in (lifted.w, lifted.b))
    return Site(node, tensors[lifted.x], weights, spec, ORIGINAL, PATTERN, path, note="lifted from Python code",
                source_seconds=node.meta.get(SECONDS), source_runner=source[0], source_key=source[1])


def _region_site(gm: fx.GraphModule, region: regions.Region) -> Site | None:
    """A site replacing the region's nodes, or None if they are not shown to be a convolution
    (code that is not a convolution is not reported: it is not a site)."""
    module, inputs = regions.as_module(gm, region)
    # the lift takes the first operand that works as data: parameters last, and the larger
    # first (of two inputs convolved with each other, the smaller is the cheaper kernel); the
    # order a region reads them in is no guide, it changes between torch versions
    args = {i: inputs[i] for i in sorted(range(len(inputs)), key=lambda i: _weight_likeness(inputs[i]))}
    try:
        lifted, spec, source = _lift(module, args, info(region.output), shrink=False)
    except Exception:  # NotLiftable, or the graph's ops failing on the analysis's float64 probes
        return None
    tensors = _tensor_args(args)
    rest = tuple(n for n in region.nodes if n is not region.output)
    return Site(region.output, tensors[lifted.x], (tensors.get(lifted.w), tensors.get(lifted.b)), spec, ORIGINAL,
                PATTERN, regions.path(region), rest, note=f"lifted from {len(region.nodes)} ops of unrolled code",
                source_runner=source[0], source_key=source[1])


def _weight_likeness(node: fx.Node) -> tuple[bool, int]:
    """Whether dynamo made ``node`` from a module's parameter, then its size, negated."""
    parameter = isinstance(getattr(node.meta.get("grapharg"), "example", None), torch.nn.Parameter)
    annotation = info(node)
    return parameter, -math.prod(annotation.shape if annotation is not None else ())


def _tensor_args(args: dict) -> dict:
    """Operand name -> node, for the arguments that are graph nodes."""
    return {f"arg:{k}": v for k, v in args.items() if isinstance(v, fx.Node)}


def _lift(module: torch.nn.Module, args: dict, out, *, shrink: bool = True):
    """(lifted roles, spec, (source runner, source key)) of ``module`` called on ``args``
    (graph nodes and constants) returning ``out``, or NotLiftable."""
    if out is None:
        raise NotLiftable("does not return one tensor")
    tensors = _tensor_args(args)
    if any(info(v) is None for v in tensors.values()):
        raise NotLiftable("takes an argument that is not a tensor")
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    shapes = {**{n: info(v).shape for n, v in tensors.items()}, **{n: tuple(t.shape) for n, t in state.items()}}
    dtypes = [info(v).dtype for v in tensors.values()] + [t.dtype for t in state.values()]
    if any(d not in FLOAT_DTYPES for d in dtypes) or out.dtype not in FLOAT_DTYPES:
        raise NotLiftable("reads a tensor that is not floating point")
    if len(shapes) > MAX_OPERANDS:
        raise NotLiftable(f"reads {len(shapes)} tensors (a convolution reads data, weight and bias)")
    operands = [Operand(n, tuple(s), n in tensors) for n, s in shapes.items()]
    run = _runner(module, args, state)
    lifted, key = _cached_lift(module, args, run, operands, out, shrink)
    if info(tensors[lifted.x]).dtype != out.dtype:
        raise NotLiftable("returns another dtype than its data")
    spec = dataclasses.replace(lifted.spec, input_grad=info(tensors[lifted.x]).requires_grad)
    with_grad = frozenset([n for n, v in tensors.items() if info(v).requires_grad]
                          + [n for n, t in state.items() if t.requires_grad])
    return lifted, spec, (functools.partial(_source_runner, module, run, operands, spec, with_grad), (key, spec.key()))


_ANALYSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {what it was analysed for: result}


def _cached_lift(module: torch.nn.Module, args: dict, run, operands: list[Operand], out,
                 shrink: bool) -> tuple[Lifted, tuple]:
    """``lift`` once per module, code, settings and signature (optimize() again does not repeat
    the analysis), and that key: what the code's time depends on besides the spec."""
    key = (_code_state(module), tuple(operands), out.shape, out.dtype, out.requires_grad,
           tuple((k, repr(v)) for k, v in args.items() if not isinstance(v, fx.Node)))
    results = _ANALYSED.setdefault(module, {})
    if key not in results:
        try:
            with state_kept(module):  # probes must leave nothing in the module
                results[key] = lift(run, operands, out.shape, shrink=shrink,
                                    dtype=str(out.dtype).removeprefix("torch."), device=out.device.type,
                                    grad=out.requires_grad)
        except NotLiftable as e:
            results[key] = e
    if isinstance(results[key], NotLiftable):
        raise results[key]
    return results[key], key


def _code_state(module: torch.nn.Module) -> tuple:
    """What the code's behaviour may depend on besides its tensors: each submodule's forward
    and plain attributes (a stride, a flag, the training mode)."""
    return tuple((name, getattr(m.forward, "__func__", m.forward), m.training,
                  tuple((k, repr(v)) for k, v in sorted(vars(m).items()) if not k.startswith("_")))
                 for name, m in module.named_modules())


@contextlib.contextmanager
def _source_runner(module: torch.nn.Module, run, operands: list[Operand], spec, with_grad: frozenset[str]):
    """A call that runs the code on random operands as its forms are timed: forward, and if
    ``spec.grad`` backward to the operands named in ``with_grad`` (a first layer's data gets
    no gradient). Those operands require grad in inference too, as the model's parameters do:
    ``matmul`` takes another path for them (an unfold + matmul loop ran 1.5x slower so).
    The module's attributes are put back when the block ends."""
    seeded = generator(spec.device, 0)
    values = {o.name: torch.randn(o.shape, generator=seeded, dtype=spec.torch_dtype, device=spec.device)
              .requires_grad_(o.name in with_grad) for o in operands}
    wrt = [v for v in values.values() if v.requires_grad]

    def call():
        with torch.set_grad_enabled(spec.grad):
            out = run(values)
        return torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True) if spec.grad and wrt else out
    with state_kept(module):  # timing runs must leave nothing in the module
        yield call


def _runner(module: torch.nn.Module, args: dict, state: dict):
    """Call ``module`` with operands (by name) in place of its tensor arguments and state."""
    def run(values: dict) -> torch.Tensor:
        call = {k: values.get(f"arg:{k}", v) for k, v in args.items()}
        positional = tuple(call[i] for i in range(len([k for k in call if isinstance(k, int)])))
        keywords = {k: v for k, v in call.items() if isinstance(k, str)}
        return torch.func.functional_call(module, {n: values[n] for n in state}, positional, keywords)
    return run
