"""Time callables side by side, and forms on a spec's inputs, so that load cannot fool the figures.

The protocol (each step answers a way figures went wrong on a shared machine):

- **Warm first.** Each callable runs until two calls in a row agree within ``WARM_AGREE``
  (at most ``WARM_CALLS``): the first calls of a new shape pay for oneDNN primitive creation,
  weight reorders and allocations, and a cold call must never stand for the steady state.
- **Short interleaved blocks.** Each round times a short block (``block_s``) of every
  callable, in a rotating order, so a burst of load hits every candidate alike, and a block is
  short enough to fit between the scheduler's preemptions of a busy core.
- **A low quantile.** Interference only ever adds time, so each figure is the ``QUANTILE``
  of its blocks, not their median or mean: with 2 intra-op threads and another process on a
  core, a parallel region can wait a whole scheduler quantum (a 0.35 ms op read 4-48 ms),
  and the blocks that escaped are the ones that tell the op's own cost.
- **A contention signal.** While timing, the CPU time the *rest of the machine* used is read
  from ``/proc/stat`` (less this process's own, and counting a hypervisor's steal). A figure
  taken while others used more than ``BUSY_CORES`` of a core, while this process's threads
  waited for a CPU more than ``WAITED_CORES`` of the time (``/proc/self/task/*/schedstat``),
  or whose blocks spread by more than ``SPREAD_LIMIT``, is :attr:`Timings.contended`: usable
  for a decision now, never stored as if it were clean (see :mod:`convrewrite.table`). Nor
  are figures of fewer than ``STORED_BLOCKS`` blocks (a clear win settled in one round): too
  short a window for either signal to see load.
- **More blocks under load, and an error that load does not widen.** Contended figures are
  timed for up to ``LOADED_ROUNDS`` times more rounds. Each figure's standard error
  (:attr:`Timings.error`) comes from the blocks near its quantile only, so the slow blocks a
  busy machine adds do not turn a clear win into noise; decisions widen their margin by it
  (:func:`convrewrite.decide.beats`).

Threads: the Timer runs with torch's current thread count (``torch.utils.benchmark.Timer``
defaults to one thread, which is not what a model runs with).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import math
import os
import resource
import time
import warnings
from collections.abc import Mapping
from typing import Callable

import torch
from torch.utils import benchmark

from .device import generator
from .forms import Form

QUANTILE = 0.25  # the figure of a callable: this quantile of its blocks' per-call times
# blocks' interquartile range over their lower quartile above which a figure is contended: a
# quiet machine's small 2-thread ops spread by up to 0.7 (thread wake-ups); other threads of
# this very process, which /proc/stat cannot tell from ours, show up here
SPREAD_LIMIT = 1.0
BUSY_CORES = 0.25  # other processes' CPU use, in cores, above which a figure is contended
WAITED_CORES = 0.1  # our threads' run-queue wait, in cores, above which too (quiet here: 0.005-0.015)
LOADED_ROUNDS = 2  # contended figures are timed for this many more times the rounds asked for
# blocks per callable below which figures decide but are never stored: too few for their spread
# to show a burst, and over a window of a few milliseconds /proc/stat (counted in 10 ms ticks)
# cannot show other load either (a conv timed 3.4x slow in one round under a busy core was stored)
STORED_BLOCKS = 4
WARM_CALLS = 8  # at most this many warm-up calls per callable
WARM_AGREE = 0.25  # warm once two calls in a row agree within this (relative)
ONE_CALL_ENOUGH = 0.02  # seconds: one warm call of user code this slow is figure enough
_FLUSH = object()  # the flush's own entry among the timed callables: no user's name can equal it


@dataclasses.dataclass(frozen=True)
class Timings(Mapping):
    """Seconds per call of each callable timed together, and how far to trust them.

    Reads as a mapping from name to seconds. ``error``: each figure's standard error,
    relative to it. ``busy``: the CPU the rest of the machine used while timing, in cores
    (``nan`` where unknown). ``blocks``: blocks timed per callable. ``spread``: each
    callable's interquartile range over its blocks, relative to its lower quartile.
    ``waited``: the time this process's threads waited for a CPU, in cores.
    """

    seconds: dict[str, float]
    error: dict[str, float] = dataclasses.field(default_factory=dict)
    busy: float = float("nan")
    blocks: int = 0
    spread: dict[str, float] = dataclasses.field(default_factory=dict)
    waited: float = float("nan")

    def __getitem__(self, name: str) -> float:
        return self.seconds[name]

    def __iter__(self):
        return iter(self.seconds)

    def __len__(self) -> int:
        return len(self.seconds)

    @property
    def contended(self) -> bool:
        """Whether other load may have moved these figures (they decide now, but are never
        stored as clean)."""
        bursts = any(s > SPREAD_LIMIT for s in self.spread.values())
        return bursts or _over(self.busy, BUSY_CORES) or _over(self.waited, WAITED_CORES)

    @property
    def storable(self) -> bool:
        """Whether these figures may be stored for later processes: not contended, and from at
        least ``STORED_BLOCKS`` blocks each."""
        return not self.contended and self.blocks >= STORED_BLOCKS

    @property
    def noise(self) -> float:
        """Relative standard error of the ratio of two of these figures (0 if unknown)."""
        return math.sqrt(2.0) * max(self.error.values(), default=0.0)

    def record(self) -> dict:
        """How these figures were taken, as a cost-table entry keeps it."""
        return {"blocks": self.blocks, "spread": round(max(self.spread.values(), default=0.0), 4),
                "busy": None if math.isnan(self.busy) else round(self.busy, 3),
                "waited": None if math.isnan(self.waited) else round(self.waited, 3),
                "threads": torch.get_num_threads(), "when": datetime.date.today().isoformat()}

    def without(self, name) -> "Timings":
        drop = lambda d: {k: v for k, v in d.items() if k != name}  # noqa: E731
        return dataclasses.replace(self, seconds=drop(self.seconds), error=drop(self.error), spread=drop(self.spread))


def time_callables(fns: dict[str, Callable[[], object]], *, rounds: int = 15, block_s: float = 0.001,
                   flush: Callable[[], object] | None = None) -> Timings:
    """Seconds per call of each zero-argument callable, timed in interleaved rounds of short
    blocks after a warm-up (see the module docstring for the protocol).

    A callable that raises on its warm-up call is reported with a warning and left out.
    ``flush``, if given, runs before every call (as triton's ``do_bench`` clears the L2 cache),
    and its own time, taken in the same rounds, is taken off.
    """
    if flush is not None:
        timed = time_callables({**{name: _after(flush, fn) for name, fn in fns.items()}, _FLUSH: flush},
                               rounds=rounds, block_s=block_s)
        cost = timed.seconds.get(_FLUSH, 0.0)
        rest = timed.without(_FLUSH)
        return dataclasses.replace(rest, seconds={n: max(t - cost, 0.0) for n, t in rest.seconds.items()})
    timers = {}
    for name, fn in fns.items():
        timer = _timer(fn)
        try:
            warm = _warm_up(timer)
        except Exception as e:  # a broken candidate (a user's form, say) must not stop the rest
            warnings.warn(f"convrewrite: {name!r} failed and was not timed: {type(e).__name__}: {e}", stacklevel=2)
            continue
        timers[name] = (timer, max(1, int(block_s / max(warm, 1e-7))))
    return _timed_while_it_takes(timers, rounds)


def _timed_while_it_takes(timers: dict, rounds: int) -> Timings:
    """``rounds`` interleaved rounds, and while the figures are contended up to
    ``LOADED_ROUNDS`` times more: each figure's error shrinks with the blocks it has, so a
    busy machine costs time, not a wrong or indecisive figure. ``busy`` and ``waited``: the
    most seen in any of those runs."""
    samples: dict[str, list[float]] = {name: [] for name in timers}
    busy = waited = float("nan")
    for _ in range(1 + LOADED_ROUNDS):
        with _CpuWatch() as watch:
            for name, blocks in _interleaved(timers, rounds).items():
                samples[name] += blocks
        busy, waited = _most(busy, watch.busy_cores), _most(waited, watch.waited_cores)
        timings = Timings({n: _quantile(s, QUANTILE) for n, s in samples.items()},
                          {n: _relative_error(s, QUANTILE) for n, s in samples.items()}, busy,
                          len(next(iter(samples.values()), ())), {n: _relative_iqr(s) for n, s in samples.items()},
                          waited)
        if not timings.contended:
            break
    return timings


def _most(a: float, b: float) -> float:
    """The larger reading, ``nan`` only where both are unknown."""
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


def _over(reading: float, limit: float) -> bool:
    return not math.isnan(reading) and reading > limit


def _warm_up(timer: benchmark.Timer) -> float:
    """Call until two calls in a row agree (at most ``WARM_CALLS``); the last call's seconds."""
    last = _block(timer, 1)
    for _ in range(WARM_CALLS - 1):
        now = _block(timer, 1)
        if abs(now - last) <= WARM_AGREE * max(now, last):
            return min(now, last)
        last = now
    return last


def _interleaved(timers: dict, rounds: int) -> dict[str, list[float]]:
    names = list(timers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds if names else 0):
        for name in names[r % len(names):] + names[:r % len(names)]:
            timer, number = timers[name]
            samples[name].append(_block(timer, number))
    return samples


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _relative_error(values: list[float], q: float) -> float:
    """Standard error of the ``q``-quantile of ``values``, relative to it: sqrt(q(1-q)/n)
    over the density of the values around that quantile. Only the blocks near the quantile
    count, so the slow blocks a busy machine adds above it do not widen it."""
    figure = _quantile(values, q)
    if len(values) < 4 or figure <= 0:
        return 0.0
    width = _quantile(values, min(q + 0.1, 1.0)) - _quantile(values, max(q - 0.1, 0.0))
    return math.sqrt(q * (1 - q) / len(values)) * (width / 0.2) / figure


def _relative_iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q1 = _quantile(values, 0.25)
    return (_quantile(values, 0.75) - q1) / q1 if q1 > 0 else 0.0


class _CpuWatch:
    """Contention during a ``with`` block, in cores: the CPU the rest of the machine used
    (``busy_cores``) and the time this process's threads waited for a CPU (``waited_cores``).

    ``busy_cores``: ``/proc/stat``'s busy time of all CPUs (steal included: a hypervisor
    running other guests on our cores is load too), less this process's own user and system
    time. ``waited_cores``: the run-queue wait of this process's threads
    (``/proc/self/task/*/schedstat``): our spinning OpenMP threads can starve another
    process to a quarter of a core, and then it is our threads that wait. Each reads ``nan``
    where its source is missing (not Linux).
    """

    busy_cores = waited_cores = float("nan")

    def __enter__(self) -> "_CpuWatch":
        self._start = (_machine_busy_s(), _own_cpu_s(), _waited_s(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        machine, own, waited, wall = _machine_busy_s(), _own_cpu_s(), _waited_s(), time.perf_counter()
        elapsed = wall - self._start[3]
        if elapsed <= 0:
            return
        if machine is not None and self._start[0] is not None:
            others = (machine - self._start[0]) - (own - self._start[1])
            self.busy_cores = max(others, 0.0) / elapsed
        if waited is not None and self._start[2] is not None:
            self.waited_cores = max(waited - self._start[2], 0.0) / elapsed


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _machine_busy_s() -> float | None:
    """Seconds every CPU together spent busy since boot (user, nice, system, irq, softirq,
    steal), or None where ``/proc/stat`` cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) * _TICK_S


def _waited_s() -> float | None:
    """Seconds this process's threads have waited on a run queue (their schedstat's second
    field), or None where it cannot be read."""
    total = 0
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in threads:
        with contextlib.suppress(OSError, IndexError, ValueError):  # a thread may end meanwhile
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
    return total / 1e9


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _after(first: Callable[[], object], fn: Callable[[], object]) -> Callable[[], object]:
    def both():
        first()
        return fn()
    return both


def time_code(fn: Callable[[], object]) -> float:
    """Seconds per call of user code (a loop a form may replace): one call after a first
    where that takes ``ONE_CALL_ENOUGH`` or more (its noise is small beside its time), else
    three rounds. The first call allocates and first touches its memory: a 9-tap loop's
    training step took 1.6x its warm time there."""
    timer = _timer(fn)
    _block(timer, 1)
    once = _block(timer, 1)
    return once if once >= ONE_CALL_ENOUGH else time_callables({"code": fn}, rounds=3)["code"]


def _timer(fn: Callable[[], object]) -> benchmark.Timer:
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def _block(timer: benchmark.Timer, number: int) -> float:
    """Seconds per call over ``number`` calls. ``Timer.timeit`` would first make two warm-up
    calls every time, tripling the cost of a round for a callable slower than the block
    (a whole model, say); the Timer's own block timing (CUDA-synchronised) skips them."""
    return timer._timeit(number) / number


def form_call(form: Form, spec, args: tuple) -> Callable[[], object]:
    """A zero-argument call of ``form`` on ``args`` (x, *params): forward, plus backward if
    ``spec.grad``; compiled by inductor first if that is the spec's executor. Call it with
    grad mode as ``spec.grad`` says (:func:`time_forms` does): the parameters require grad
    as a model's do, so an inference call must not record."""
    fn = functools.partial(form.fn, spec=spec)
    if spec.executor == "inductor":
        fn = torch.compile(fn, dynamic=False)
    if not spec.grad:
        return lambda: fn(*args)
    inputs = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_out = []  # made on the first call, shaped and laid out like the form's output

    def forward_backward():
        out = fn(*args)
        if not grad_out:
            grad_out.append(torch.ones_like(out))
        return torch.autograd.grad(out, inputs, grad_out[0])
    return forward_backward


def time_forms(spec, forms: list[Form], *, rounds: int = 15, block_s: float = 0.001) -> Timings:
    """Seconds per call of each form on random inputs shaped like ``spec`` (drawn from a
    private generator: measuring must not move the user's random number stream)."""
    args = spec.example_inputs(generator(spec.device, 0))
    with torch.set_grad_enabled(spec.grad):  # around the timing: 2 us a call inside it
        return time_callables({f.name: form_call(f, spec, args) for f in forms}, rounds=rounds, block_s=block_s)
