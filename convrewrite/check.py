"""The whole-graph check: is the rewritten graph faster than the captured one, on these inputs?

Each site's form is chosen from figures of the site alone. Inside a model its neighbours
change the picture (what stays in cache, the layout the next op reads), so a choice that
wins alone can lose in place: a specialisation keeps its rewrites only if the whole rewritten
graph, timed against the graph as captured, is faster by a margin (graphs within noise of
each other are timed again, longer). The backend does the same with compiled graphs
(:func:`compiled_times`). Both run on copies of the real inputs (a model may write into its
input), forward and, when autograd records, backward to the parameters; buffers (BatchNorm's
running statistics) are swapped for copies and the random number streams restored
afterwards, so checking leaves no trace on the user's model (not even a version bump on a
buffer the user's own first output saved for its backward).

Both candidates are always timed warm and interleaved (a cold first call, lazy
initialisation or a busy moment must not stand for either's steady state), and the original
is what the optimized module would otherwise run: the model's own ``forward``. A first short
round settles a clear win (``CLEAR_WIN``; a loop lifted to one conv is not run five more
times); anything closer is timed for ``ROUNDS`` (``LONGER`` times that where the rewrite leads
inside the noise), and the rewrite must win by :data:`MARGIN` and by more than the figures'
noise (:func:`convrewrite.decide.beats`).

A check's clean figures are kept in this machine's cost table (:class:`GraphFigures`), and a
later process checking the same graphs on inputs of the same signature decides on them
(:func:`judged_once`): the same model on the same machine gets the same decision in every
run, and its first call does not time both graphs again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .decide import NOISE_SIGMAS, beats
from .device import cache_flush, rng_kept
from .forms import source_hashes
from .measure import Timings, time_callables
from .options import Options
from .report import Report
from .table import GRAPH_KEY, table_for

ROUNDS = 9
BLOCK_S = 0.002
CLEAR_WIN = 3.0  # after one warm round, a candidate this much faster (or slower) needs no more rounds
# A lead inside the noise is timed again for this many times ROUNDS (its error shrinks by the
# square root), where that takes at most LONGER_S: on a noisy host, 9 rounds of a model
# spread enough to hide a 1.5x win, and one process kept the original where others rewrote.
LONGER, LONGER_S = 3, 2.0
MARGIN = 1.05  # a candidate must beat the original by this much: whole-graph timings here vary by about 5%
ORIGINAL, REWRITTEN = "original", "rewritten"  # candidate names: the graph as written, and rewritten
# Per call, dynamo's frame around a compiled graph cost 16-80 us on the bench's CPU, differing
# by up to 40 us between compiled forms of one graph (seed 002: 26 us around inductor's loop
# kernel, 47 us around the grouped conv), which timing the graphs directly cannot see. A
# compiled graph must beat the original by this much besides the margin.
FRAME_S = 25e-6


@dataclasses.dataclass(frozen=True)
class GraphFigures:
    """Where the figures of one check (the rewritten graph against the original, on inputs of
    one signature) are kept: an entry of this machine's cost table under a key that covers
    what the times depend on (the graphs' code, the forms chosen and their source, the
    inputs' sizes, strides, dtypes and grad, the grad mode, and the route; the table's
    fingerprint covers the machine, its threads and torch). A later process that finds clean
    figures there decides as this one did, without timing again: a decision on the same
    model and machine does not flip between runs, and the backend compiles the graph that
    won alone."""

    key: str
    device: str

    @classmethod
    def of(cls, route: str, inputs, report: Report, code: str, module: nn.Module | None = None) -> GraphFigures:
        """The place for the figures of ``route``'s check of ``code`` (the graphs, original and
        rewritten), run on ``inputs`` with ``report``'s forms; ``module``: the model whose own
        forward is the original, by its class and its modules' training flags (which an fx
        graph does not show: BatchNorm and Dropout are the same call in both modes)."""
        tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
        shapes = [(tuple(t.shape), tuple(t.stride()), str(t.dtype), t.requires_grad) for t in tensors]
        hashes = source_hashes()
        forms = sorted((s.path, s.key, s.chosen, hashes.get(s.chosen, "")) for s in report.rewritten)
        modes = "" if module is None else \
            f"{type(module).__qualname__} {''.join('1' if m.training else '0' for m in module.modules())}"
        text = f"{route} {modes} {torch.is_grad_enabled()} {shapes} {forms}\n{code}"
        device = tensors[0].device.type if tensors else "cpu"
        return cls(f"{GRAPH_KEY}|{hashlib.sha256(text.encode()).hexdigest()[:32]}", device)

    def recalled(self) -> Timings | None:
        """The figures a process on this machine kept for this check, if any, with their
        errors (so they decide as they did when taken)."""
        table = self._table()
        times = table.entries.get(self.key)
        if not times or not {ORIGINAL, REWRITTEN} <= set(times):
            return None
        return Timings(dict(times), dict(table.meta.get(self.key, {}).get("error", {})))

    def keep(self, times: Timings) -> None:
        """Keep clean figures (never those taken under load, or in one round: see
        :attr:`Timings.storable`)."""
        if times.storable and {ORIGINAL, REWRITTEN} <= set(times):
            meta = {**times.record(), "error": times.error}
            self._table().remember(self.key, dict(times), {}, meta)

    def _table(self):
        return table_for(self.device, Options())  # this machine's own (a table= file is the pass's)


def judged_once(report: Report, figures: GraphFigures, time_both: Callable[[], Timings], what: str,
                original: str = "as written") -> Report:
    """:func:`judged` on the figures kept for this check if there are, else on ``time_both()``
    (kept where clean)."""
    kept = figures.recalled()
    if kept is not None:
        return judged(report, kept, f"{what} (as timed before on this machine)", original)
    times = time_both()
    figures.keep(times)
    return judged(report, times, what, original)


def whole_graph_times(original: Callable, rewritten: Callable, model: nn.Module, args: tuple,
                      kwargs: dict | None = None) -> Timings:
    """Seconds per call of ``original`` (the model's own forward) and ``rewritten`` (a graph,
    or a compiled forward, over ``model``'s parameters) on copies of the arguments, timed warm
    and side by side; the model's buffers and RNG state are kept."""
    leaves = pytree.tree_map_only(torch.Tensor, _copy, (args, kwargs or {}))
    params = [p for p in model.parameters() if p.requires_grad]
    fns = {name: _step(lambda a, k, fn=fn: fn(*a, **k), leaves, params)
           for name, fn in ((ORIGINAL, original), (REWRITTEN, rewritten))}
    with _buffers_swapped(model), rng_kept(args):
        return _side_by_side(fns)


def compiled_times(fns: dict[str, Callable], example_inputs: list, params: list[torch.Tensor]) -> Timings:
    """Seconds per call of each compiled graph on ``example_inputs`` (dynamo's flat list:
    parameters, buffers and the user's inputs), timed side by side with the cache flushed
    before every call. Parameters are only read, so they are shared; every other tensor is
    copied, so buffers and inputs written in place (BatchNorm's statistics) are left as they
    were; the RNG state is restored."""
    leaves = [t if isinstance(t, nn.Parameter) or not isinstance(t, torch.Tensor) else _copy(t) for t in example_inputs]
    with rng_kept(example_inputs):
        return _side_by_side({name: _step(fn, leaves, params) for name, fn in fns.items()},
                             flush=cache_flush(example_inputs))


def judged(report: Report, times: Timings, what: str, original: str = "as written") -> Report:
    """``report`` with the whole-``what`` times noted, and its sites back on their originals
    unless the rewritten one clearly won (:func:`rewrite_wins`)."""
    if len(times) < 2:
        return report.kept_original("kept original: the whole-graph check could not run both graphs")
    old, new = times[ORIGINAL], times[REWRITTEN]
    load = " (under load from other processes)" if times.contended else ""
    report = dataclasses.replace(report, under_load=times.contended)
    line = f"{what}, warm, on these inputs: {new * 1e3:.3f} ms rewritten, {old * 1e3:.3f} ms {original}{load}"
    if not rewrite_wins(times):
        return report.kept_original(kept_because(times)).noted(line)
    return report.noted(line)


def kept_because(times: Mapping[str, float], slack_s: float = 0.0, when: str = "") -> str:
    """Why :func:`fastest` kept the original on ``times``: the rewrite was slower, or faster
    by less than the margin, the figures' noise or ``slack_s`` seconds a call demand."""
    ratio = times[REWRITTEN] / times[ORIGINAL]
    why = f"kept original: the rewritten graph ran {ratio:.2f}x the time{when}"
    if ratio >= 1:
        return why
    noise = times.noise if isinstance(times, Timings) else 0.0
    if NOISE_SIGMAS * noise > MARGIN - 1:
        return f"{why}, a lead inside the figures' noise ({noise:.0%} each way, {NOISE_SIGMAS:g} times that needed)"
    if ratio * MARGIN >= 1:
        return f"{why}, less than the {MARGIN - 1:.0%} margin"
    return f"{why}, less than the margin and {slack_s * 1e6:.0f} us a call"


def rewrite_wins(times: Mapping[str, float]) -> bool:
    """Whether the rewritten graph clearly beat the original (see :func:`fastest`)."""
    return fastest(times) == REWRITTEN


def fastest(times: Mapping[str, float], slack_s: float = 0.0) -> str:
    """The fastest candidate if it :func:`~convrewrite.decide.beats` :data:`ORIGINAL` by
    :data:`MARGIN`, the figures' noise and ``slack_s`` seconds (or the original did not run),
    else :data:`ORIGINAL` (also when nothing ran)."""
    best = min(times, key=times.get, default=ORIGINAL)
    if best == ORIGINAL or ORIGINAL not in times:
        return best
    noise = times.noise if isinstance(times, Timings) else 0.0
    return best if beats(times[best], times[ORIGINAL], MARGIN, noise, slack_s) else ORIGINAL


def _side_by_side(fns: dict[str, Callable], flush: Callable | None = None) -> Timings:
    """One warm round settles a clear win or loss; anything closer is timed for ``ROUNDS``,
    and a lead inside the figures' noise for ``LONGER`` times as many where that is short
    (:func:`_worth_longer`)."""
    times = time_callables(fns, rounds=1, block_s=BLOCK_S, flush=flush)
    if len(times) > 1 and max(times.values()) > CLEAR_WIN * min(times.values()):
        return times
    times = time_callables(fns, rounds=ROUNDS, block_s=BLOCK_S, flush=flush)
    if _worth_longer(times):
        return time_callables(fns, rounds=LONGER * ROUNDS, block_s=BLOCK_S, flush=flush)
    return times


def _worth_longer(times: Timings) -> bool:
    """Whether a candidate leads the original by the margin but not by the figures' noise,
    and timing ``LONGER`` times the rounds takes at most ``LONGER_S`` (each round times a
    block of at least ``BLOCK_S``, or one call, of every candidate)."""
    best = min(times, key=times.get, default=ORIGINAL)
    if best == ORIGINAL or ORIGINAL not in times or times[best] * MARGIN >= times[ORIGINAL]:
        return False
    cost = LONGER * ROUNDS * sum(max(t, BLOCK_S) for t in times.values())
    return fastest(times) == ORIGINAL and cost <= LONGER_S



def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_(t.requires_grad)


def _step(run: Callable, leaves, params: list[torch.Tensor]):
    """One call as the user's is made: forward, plus backward to what requires grad if
    autograd records (gradients returned, never accumulated into ``.grad``). An input that
    requires grad reaches the graph as a non-leaf (as the user's usually is), so the
    model may write into it."""
    if not torch.is_grad_enabled():
        return lambda: run(*leaves)
    wrt = params + [t for t in pytree.tree_leaves(leaves) if _input_with_grad(t)]

    def forward_backward():
        inputs = pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if _input_with_grad(t) else t, leaves)
        outs = [o for o in pytree.tree_leaves(run(*inputs)) if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs and wrt:
            torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
    return forward_backward


def _input_with_grad(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and not isinstance(t, nn.Parameter)


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
