"""Time callables side by side with ``torch.utils.benchmark``, and forms on a spec's inputs.

Candidates are timed in interleaved rounds (the machine is shared and noisy, so a burst of
load hits every candidate alike), in a rotating order, and each one's figure is its median
round. The Timer synchronises CUDA itself and runs with torch's current thread count.
"""

from __future__ import annotations

import functools
import statistics
import warnings
from typing import Callable

import torch
from torch.utils import benchmark

from .forms import Form

_FLUSH = object()  # the flush's own entry among the timed callables: no user's name can equal it


def time_callables(fns: dict[str, Callable[[], object]], *, rounds: int = 5, block_s: float = 0.01,
                   flush: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, timed in interleaved rounds.

    A callable that raises on its warm-up call is reported with a warning and left out.
    ``flush``, if given, runs before every call (as triton's ``do_bench`` clears the L2 cache),
    and its own time, taken in the same rounds, is taken off.
    """
    if flush is not None:
        times = time_callables({**{name: _after(flush, fn) for name, fn in fns.items()}, _FLUSH: flush},
                               rounds=rounds, block_s=block_s)
        cost = times.pop(_FLUSH, 0.0)
        return {name: max(t - cost, 0.0) for name, t in times.items()}
    timers = {}
    for name, fn in fns.items():
        timer = _timer(fn)
        try:
            _block(timer, 1)  # warm-up; also finds candidates that fail
        except Exception as e:  # a broken candidate (a user's form, say) must not stop the rest
            warnings.warn(f"convrewrite: {name!r} failed and was not timed: {type(e).__name__}: {e}", stacklevel=2)
            continue
        timers[name] = (timer, max(1, int(block_s / max(_block(timer, 1), 1e-7))))
    names = list(timers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds if names else 0):
        for name in names[r % len(names):] + names[:r % len(names)]:
            timer, number = timers[name]
            samples[name].append(_block(timer, number))
    return {name: statistics.median(s) for name, s in samples.items()}


def _after(first: Callable[[], object], fn: Callable[[], object]) -> Callable[[], object]:
    def both():
        first()
        return fn()
    return both


def time_once(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn`` (CUDA-synchronised): enough for slow code already warm."""
    return _block(_timer(fn), 1)


def _timer(fn: Callable[[], object]) -> benchmark.Timer:
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def _block(timer: benchmark.Timer, number: int) -> float:
    """Seconds per call over ``number`` calls. ``Timer.timeit`` would first make two warm-up
    calls every time, tripling the cost of a round for a callable slower than the block
    (a whole model, say); the Timer's own block timing (CUDA-synchronised) skips them."""
    return timer._timeit(number) / number


def form_call(form: Form, spec, args: tuple) -> Callable[[], object]:
    """A zero-argument call of ``form`` on ``args`` (x, *params): forward, plus backward if
    ``spec.grad``; compiled by inductor first if that is the spec's executor."""
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


def time_forms(spec, forms: list[Form], *, rounds: int = 5, block_s: float = 0.01) -> dict[str, float]:
    """Median seconds per call of each form on random inputs shaped like ``spec`` (drawn from
    a private generator: measuring must not move the user's random number stream)."""
    args = spec.example_inputs(torch.Generator(spec.device).manual_seed(0))
    return time_callables({f.name: form_call(f, spec, args) for f in forms}, rounds=rounds, block_s=block_s)
