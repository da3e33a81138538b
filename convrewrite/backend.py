"""The dynamo backend: ``torch.compile(model, backend="convrewrite", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so the name resolves without
``import convrewrite``. Dynamo hands over a graph whose shapes live in
``node.meta["example_value"]``; :func:`annotate_from_meta` turns them into the annotations
the rules read, the pass rewrites the graph, and an inner compiler (inductor by default)
compiles the result. Sites with symbolic sizes are left alone, so the pass adds no guards.

Each site's choice comes from figures of the site alone, and inductor fuses across sites, so
where any site was rewritten, with ``check`` (the default) the graph as dynamo gave it is
compiled too, both are timed on copies of a call's inputs (with the cache flushed between
calls), and the rewritten one runs if it wins by the check's margin and by ``FRAME_S`` per
call; otherwise inductor's own compile runs. Where no site was rewritten, only the graph as
dynamo gave it compiles, as inductor alone would. (Inductor's ``conv_1x1_as_mm`` lowering of
the original is no longer a candidate: it was chosen on 1 of 25 bench rows and cost a whole
compile on every graph with a pointwise conv.)

Compile time: the rewritten graph compiles first. By default the original compiles right
after it, before the first call returns (reusing the kernels they share), and that call times
both. With ``options={"alternatives": "background"}`` only the rewritten graph compiles before
the first call, which costs about one compile as inductor's does; the original compiles on a
background thread while it runs, and the first call after it is ready times both and picks
(:func:`settle` waits for it). Opt-in, because a compile traces with fx, and fx patches
``nn.Module`` for the whole process while it traces: the background compile and convrewrite's
own captures take one lock, but an ``fx.symbolic_trace`` or ``torch.export`` of your own in
another thread at the same time would corrupt both traces. For inductor, each rewritten
site's call is inlined as its form's ATen ops, so AOTAutograd's and the FX graph cache key the
rewritten graph on its code (the table and rules that chose it included) and a warm cache
serves it as it does the original. The two compiled graphs' figures, where clean, are kept in
this machine's cost table (:class:`~convrewrite.check.GraphFigures`): a later process that
compiles the same graphs for the same inputs compiles the faster one alone, as inductor alone
would. Where the pass turned more than ``UNROLLED`` ops of unrolled loops into convolutions,
the graph as dynamo gave it is not compiled at all: that compile is what takes inductor minutes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import logging
import threading
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from . import distributed
from .capture import META, TRACING, TensorInfo
from .check import FRAME_S, ORIGINAL, REWRITTEN, GraphFigures, compiled_times, fastest, kept_because
from .emit import SiteCall, with_strides
from .kinds.conv import ConvSpec
from .measure import Timings
from .options import Options
from .pipeline import rewrite
from .report import Report
from .warn import warn_user

log = logging.getLogger(__name__)
INNER = ("inductor", "eager")
ALTERNATIVES = ("first_call", "background")
BACKEND_ONLY = ("inner", "alternatives")  # backend options that are not the pass's Options
# Loops that unrolled into more ops than this are not compiled as written: inductor took
# 17 s on a 148-op per-pixel loop and 130 s on a 1605-op one (2-core CPU).
UNROLLED = 256
_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_PENDING: set[concurrent.futures.Future] = set()
_PENDING_LOCK = threading.Lock()


def annotate_from_meta(gm: fx.GraphModule) -> None:
    """Annotate every node whose ``example_value`` is a plain tensor of concrete (non-symbolic) size."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor) and value.layout == torch.strided and _plain(value) and _concrete(value):
            node.meta[META] = TensorInfo.of(value)


def _concrete(t: torch.Tensor) -> bool:
    return all(isinstance(v, int) for v in (*t.shape, *t.stride()))


def _plain(t: torch.Tensor) -> bool:
    """Not a functorch wrapper (a value from inside ``vmap`` or ``grad``, as Mamba's scan makes):
    such a value cannot be read outside its transform."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def parse_options(options: dict | None) -> tuple[Options, Callable | str, bool]:
    """Split backend options into the pass's :class:`Options`, the inner compiler and whether
    alternatives compile in the background."""
    options = dict(options or {})
    inner = options.pop("inner", "inductor")
    alternatives = options.pop("alternatives", "first_call")
    valid = [*BACKEND_ONLY, *(f.name for f in dataclasses.fields(Options))]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown convrewrite backend option(s) {unknown}; valid options: {valid}")
    if not (callable(inner) or inner in INNER):
        raise ValueError(f"inner must be one of {INNER} or a callable (gm, example_inputs) -> callable, got {inner!r}")
    if alternatives not in ALTERNATIVES:
        raise ValueError(f"alternatives must be one of {ALTERNATIVES}, got {alternatives!r}")
    return Options(**options), inner, alternatives == "background" and inner != "eager"


def convrewrite_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Rewrite a dynamo graph, compile it with the inner compiler, and (with ``check``) run the
    faster of it and the graph as dynamo gave it."""
    pass_options, inner, background = parse_options(options)
    compiled = compile_graph(gm, example_inputs, pass_options, inner, mode, background)
    return compiled.only or compiled


def compile_graph(gm: fx.GraphModule, example_inputs, pass_options: Options, inner, mode: str | None = None,
                  background: bool = False) -> "FastestCompiled":
    """The backend's work on one dynamo graph: rewrite it, compile it and its variants with
    ``inner`` (the one the figures favour now, the others now or, with ``background``, in a
    background thread); the result runs the fastest of them and holds the report."""
    params = list({id(p): p for p in (*example_inputs, *gm.parameters())
                   if isinstance(p, nn.Parameter) and p.requires_grad}.values())
    coordinated = distributed.training(params)
    as_given = _graph_copy(gm)
    original = as_given if pass_options.check else None
    compile_one = functools.partial(_compile, inner, example_inputs=example_inputs, mode=mode)
    topic = _topic(gm, example_inputs, pass_options, inner) if coordinated else None
    try:
        annotate_from_meta(gm)
        report = _rewritten(gm, pass_options, "inductor" if inner == "inductor" else "eager", topic)
    except Exception as e:  # a failure of the pass never reaches the user: the graph compiles as given
        warn_user(f"convrewrite: rewriting a graph failed ({type(e).__name__}: {e}); it compiles as dynamo gave it")
        report = None
    if report is None:  # here or (in a job of several processes) on rank 0: no rank rewrites this graph
        return FastestCompiled({ORIGINAL: as_given}, compile_one, Report(note="not rewritten: the pass failed"),
                               params)
    lifted = _lifted_ops(original, gm, report) if original is not None else 0
    if lifted > UNROLLED:
        report = report.noted(f"the graph as dynamo gave it is not compiled: {lifted} ops of unrolled loops "
                              "became convolutions")
        original = None
    variants = _variants(original, gm, report, inner)
    # every rank of a job must compile what rank 0 chooses from: their cache dirs may differ
    memory = _figures(variants, example_inputs, inner, mode, report) if not coordinated else None
    if memory is not None and (times := memory.recalled()) is not None:
        chosen = fastest(times, slack_s=FRAME_S)
        report = _as_timed_before(report, times, chosen, _graphs(inner))
        variants, memory = {chosen: variants[chosen]}, None
    # ranks would be ready at different calls: one waiting in its forward for rank 0's choice,
    # while rank 0, not ready yet, waits in DDP's all-reduce for it
    return FastestCompiled(variants, compile_one, report, params, background and not coordinated,
                           topic and f"{topic}\nfastest of {sorted(variants)}", memory, _graphs(inner))


def _graphs(inner) -> str:
    """What a report calls the graphs it times: optimize()'s dynamo route runs them eagerly."""
    return "dynamo's graphs, run eagerly," if inner == "eager" else "compiled graphs"


def _figures(variants: dict, example_inputs, inner, mode: str | None, report: Report) -> GraphFigures | None:
    """Where these compiled variants' figures are kept (None where there is no choice to
    remember, or the inner compiler is the user's own, which no key can name)."""
    if len(variants) < 2 or not isinstance(inner, str):
        return None
    code = "\n".join(variants[name].code for name in sorted(variants))
    return GraphFigures.of(f"backend {inner} {mode}", example_inputs, report, code)


def _as_timed_before(report: Report, times: Timings, chosen: str, graphs: str) -> Report:
    report = report.noted(_times_line(times, graphs, ", as timed before on this machine") + f"; only {chosen} compiled")
    if chosen != REWRITTEN and report.rewritten:
        report = report.kept_original(kept_because(times, FRAME_S, " when timed before"))
    return report


def _topic(gm: fx.GraphModule, example_inputs, options: Options, inner) -> str:
    """What a decision on ``gm`` is about, the same on every rank that compiles this graph."""
    inputs = [(tuple(t.shape), tuple(t.stride()), str(t.dtype)) if isinstance(t, torch.Tensor) else repr(t)
              for t in example_inputs]
    return f"backend {inner} {options} {inputs}\n{gm.code}"


def _rewritten(gm: fx.GraphModule, options: Options, executor: str, topic: str | None):
    """:func:`~convrewrite.pipeline.rewrite` of ``gm``; in a job of several processes that
    trains (``topic`` set), as rank 0 decided it (None where rank 0 failed; see
    :mod:`convrewrite.distributed`)."""
    if topic is None:
        return rewrite(gm, options, executor=executor)
    decided = distributed.decided_once(topic, lambda: rewrite(gm, options, executor=executor))
    if distributed.deciding() or decided is None:
        return decided
    return rewrite(gm, options, executor=executor, decided=decided).noted(
        f"forms as decided by rank {distributed.DECIDING_RANK}")


def settle(timeout: float | None = None) -> bool:
    """Wait until every alternative graph the backend is compiling in the background is
    compiled (the next call of each compiled model then times them and picks the fastest);
    False if ``timeout`` seconds passed first."""
    with _PENDING_LOCK:
        pending = list(_PENDING)
    _, not_done = concurrent.futures.wait(pending, timeout=timeout)
    return not not_done


class FastestCompiled:
    """Runs the fastest of several compiled graphs of one dynamo graph, timed side by side on
    (copies of) a call's inputs: at run time, not inside dynamo's compile, where a backward
    that aot_autograd compiles on first use cannot be compiled. The graph as dynamo gave it
    runs unless another is faster by the check's margin and by ``FRAME_S`` per call.

    The graph the figures favour (rewritten if any site was, else as dynamo gave it) is
    compiled first. The others compile right after it, and the first call picks; or, with
    ``background``, on a background thread while the favoured graph runs, and the first call
    after they are ready picks. ``report``: the pass's report, with the times and the choice
    once made; ``only``: the one compiled graph, where there is nothing to choose between (it
    is returned to dynamo itself, with no wrapper around its calls)."""

    def __init__(self, variants: dict, compile_one: Callable, report, params: list, background: bool = False,
                 topic: str | None = None, memory: GraphFigures | None = None, graphs: str = "compiled graphs"):
        self.report, self._params, self._topic, self._memory, self._graphs = report, params, topic, memory, graphs
        first = REWRITTEN if REWRITTEN in variants else ORIGINAL
        self.compiled = {first: compile_one(variants[first])}
        rest = {name: v for name, v in variants.items() if name != first}
        self._run = self.only = self._times = None
        self._first = self.compiled[first]
        self._lock = threading.Lock()
        self._pending = None
        if not rest:  # nothing to choose between: this graph runs
            self._run = self.only = self._first
            self.report = report.running(first)
            log.info("%s", self.report)
        elif background:
            self._pending = _submit(_in_callers_state(functools.partial(_compile_all, rest, compile_one)))
        else:
            self.compiled.update(_compile_all(rest, compile_one))

    def __call__(self, *args):
        if self._run is None and (self._pending is None or self._pending.done()):
            with self._lock:
                if self._run is None:
                    self._run = self.compiled[self._choose(args)]
        return (self._run or self._first)(*args)

    def _choose(self, args) -> str:
        if self._pending is not None:
            self.compiled.update(self._pending.result())
            self._pending = None
        # one candidate left where the others failed to compile: nothing to time
        chosen = self._timed(args) if len(self.compiled) > 1 else next(iter(self.compiled))
        self.report = self.report.running(chosen)
        if chosen != REWRITTEN and self.report.rewritten:
            self.report = self.report.kept_original(self._why_kept())
        log.info("%s", self.report)
        return chosen

    def _why_kept(self) -> str:
        if self._times is None:  # another rank timed them
            return f"kept original: as rank {distributed.DECIDING_RANK} chose"
        return kept_because(self._times, FRAME_S)

    def _timed(self, args) -> str:
        """The fastest compiled graph; in a job that trains (``topic`` set), rank 0's (the
        others time nothing)."""
        if self._topic is None:
            return self._fastest(args)
        chosen = distributed.decided_once(self._topic, lambda: self._fastest(args))
        return chosen if chosen in self.compiled else ORIGINAL

    def _fastest(self, args) -> str:
        times = self._times = compiled_times(self.compiled, list(args), self._params)
        if self._memory is not None:
            self._memory.keep(times)
        self.report = self.report.noted(_times_line(times, self._graphs))
        return fastest(times, slack_s=FRAME_S)


def _times_line(times: Timings, graphs: str, how: str = "") -> str:
    return f"{graphs} on these inputs{how}: " + ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in times.items())


def _compile_all(variants: dict, compile_one: Callable) -> dict[str, Callable]:
    """Each variant compiled (one that fails to compile is left out, with a warning), under
    :data:`~convrewrite.capture.TRACING` and dynamo's compile lock: a compile traces with fx,
    which patches ``nn.Module`` process-wide; inductor's config patches (``mode``) are too;
    and dynamo's own compiles of other frames take the same lock."""
    from torch._dynamo.convert_frame import compile_lock  # imports inductor: only when compiling
    compiled = {}
    with TRACING, compile_lock:
        for name, graph in variants.items():
            try:
                compiled[name] = compile_one(graph)
            except Exception as e:  # noqa: BLE001 (the graph that runs already compiled)
                log.warning("convrewrite: the %s graph did not compile (%s: %s); it is not a candidate",
                            name, type(e).__name__, e)
    return compiled


def _in_callers_state(fn: Callable) -> Callable:
    """``fn`` to run in another thread under this thread's grad mode and autocast state
    (thread-local, and what aot_autograd traces under)."""
    grad = torch.is_grad_enabled()
    autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]

    def run():
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(grad))
            for device, dtype in autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            return fn()
    return run


def _submit(fn: Callable) -> concurrent.futures.Future:
    """Run ``fn`` on the one background compile thread (compiles queue: the machine's cores
    are the compiler's already)."""
    global _EXECUTOR
    with _PENDING_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="convrewrite-compile")
        future = _EXECUTOR.submit(fn)
        _PENDING.add(future)
    future.add_done_callback(_forget)
    return future


def _forget(future: concurrent.futures.Future) -> None:
    with _PENDING_LOCK:
        _PENDING.discard(future)


def _lifted_ops(original: fx.GraphModule, rewritten: fx.GraphModule, report) -> int:
    """How many ops fewer the rewritten graph has for its lifted loops (0 if none was lifted:
    a lifted loop is a site that computes a :class:`ConvSpec`)."""
    if not any(s.kind == ConvSpec.kind for s in report.rewritten):
        return 0
    added = sum(n.target is with_strides for n in rewritten.graph.nodes)  # outputs given their strides back
    return len(original.graph.nodes) - len(rewritten.graph.nodes) + added


def _variants(original: fx.GraphModule | None, rewritten: fx.GraphModule, report, inner) -> dict:
    """The graphs to compile, by name: the graph as dynamo gave it (``original``, unless None)
    and the rewritten graph where a site was rewritten (or there is no original)."""
    if report.rewritten and inner == "inductor":
        inline_site_calls(rewritten)
    variants = {} if original is None else {ORIGINAL: original}
    if report.rewritten or original is None:
        variants[REWRITTEN] = rewritten
    return variants


def inline_site_calls(gm: fx.GraphModule) -> None:
    """Each rewritten site's call replaced by its form's ATen ops, traced with ``make_fx`` on
    the site's example values: AOTAutograd's cache keys only graphs of torch ops, and a call of
    a Python object (:class:`~convrewrite.emit.SiteCall`) made it bypass the cache, so a warm
    cache compiled the rewritten graph again. A form that does not trace keeps its call."""
    graph, traces = gm.graph, {}
    for node in [n for n in graph.nodes if isinstance(n.target, SiteCall)]:
        nodes = [a for a in node.args if isinstance(a, fx.Node)]
        values = [a.meta.get("example_value", a.meta.get("val")) for a in nodes]
        if not all(isinstance(v, torch.Tensor) for v in values):
            continue
        # repeated layers share a trace: one make_fx per form, spec and argument layout
        key = (node.target.form.name, node.target.spec.key(),
               tuple(None if isinstance(a, fx.Node) else a for a in node.args),
               tuple((v.shape, v.stride(), v.dtype, v.requires_grad) for v in values))
        if key not in traces:
            traces[key] = _traced(node, values)
        traced = traces[key]
        if traced is None:
            continue
        env = dict(zip([n for n in traced.graph.nodes if n.op == "placeholder"], nodes, strict=True))
        with graph.inserting_before(node):
            out = graph.graph_copy(traced.graph, env)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    gm.recompile()


def _traced(node: fx.Node, values: list) -> fx.GraphModule | None:
    """The ATen graph of ``node``'s call on ``values``, or None where it does not trace or
    needs constants the graph would have to own."""
    from torch.fx.experimental.proxy_tensor import make_fx
    try:
        traced = make_fx(_over_nodes(node), tracing_mode="real")(*values)
    except Exception:  # noqa: BLE001 (the call stays, as verified)
        return None
    if any(n.op == "get_attr" for n in traced.graph.nodes):
        return None
    for n in traced.graph.nodes:
        # make_fx on real values turns a reshape into a view where their strides allow it; the
        # compiler's own trace may lay the site's input out otherwise (after an interpolate and
        # a cat, say), where only a reshape is legal
        if n.target is torch.ops.aten.view.default:
            n.target = torch.ops.aten.reshape.default
        if isinstance(n.meta.get("val"), torch.Tensor):  # AOTAutograd's cache keys a call on this meta
            n.meta["example_value"] = n.meta["val"]
    return traced


def _over_nodes(node: fx.Node) -> Callable:
    """``node``'s call as a function of its node arguments alone (None and constants bound)."""
    def call(*tensors):
        it = iter(tensors)
        return node.target(*(next(it) if isinstance(a, fx.Node) else a for a in node.args))
    return call


def _compile(inner, gm: fx.GraphModule, *, example_inputs, mode: str | None) -> Callable:
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else {})
    return inner(gm, example_inputs)


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph (compilers may change the graph they get)."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))
