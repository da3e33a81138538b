"""Timing callables side by side: failures left out, a flush before every call that is not
charged to the callables, and (on a simulated clock) the protocol that load cannot fool."""

import itertools
import math
import time

import pytest

from convrewrite import measure
from convrewrite.measure import Timings, time_callables


def test_a_callable_that_raises_is_left_out_with_a_warning():
    def broken():
        raise RuntimeError("no kernel")

    with pytest.warns(UserWarning, match="'broken' failed and was not timed: RuntimeError: no kernel"):
        times = time_callables({"ok": lambda: None, "broken": broken}, rounds=2, block_s=0)
    assert set(times) == {"ok"}


def test_the_flush_runs_before_every_call():
    log = []
    time_callables({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, rounds=3, block_s=0,
                   flush=lambda: log.append("flush"))
    calls = [i for i, entry in enumerate(log) if entry != "flush"]
    assert len(calls) >= 2 * 3 and all(log[i - 1] == "flush" for i in calls)


def test_the_flush_is_not_charged_to_the_callables():
    """A flush of 2 ms before a call that costs nothing: the call's figure is far below 2 ms."""
    times = time_callables({"nothing": lambda: None}, rounds=3, block_s=0, flush=lambda: time.sleep(2e-3))
    assert set(times) == {"nothing"} and 0.0 <= times["nothing"] < 1e-3


@pytest.fixture
def simulated(monkeypatch):
    """Callables return the seconds a call "took"; the clock reads those, never real time.
    ``simulated.busy``: the seconds of CPU the rest of the machine used per reading;
    ``simulated.waited``: the seconds this process's threads waited for a CPU per reading."""
    monkeypatch.setattr(measure, "_timer", lambda fn: fn)
    monkeypatch.setattr(measure, "_block", lambda fn, number: fn())
    clock = type("Clock", (), {"busy": 0.0, "waited": 0.0})()
    machine, queue = iter(range(10**6)), iter(range(10**6))
    monkeypatch.setattr(measure, "_machine_busy_s", lambda: next(machine) * clock.busy)
    monkeypatch.setattr(measure, "_waited_s", lambda: next(queue) * clock.waited)
    return clock


def sequence(*seconds, then):
    values = iter(seconds)
    return lambda: next(values, then)


def test_the_figure_is_a_low_quantile_that_bursts_of_load_cannot_move(simulated):
    warm = [1e-3, 1e-3]  # two calls that agree end the warm-up
    bursts = itertools.chain(warm, itertools.cycle([1e-3, 40e-3, 1e-3, 8e-3, 30e-3]))  # median: 8 ms
    times = measure.time_callables({"op": lambda: next(bursts)}, rounds=15)
    assert times["op"] == pytest.approx(1e-3) and times.spread["op"] > measure.SPREAD_LIMIT and times.contended


def test_cold_calls_are_warmed_away_before_timing(simulated):
    """oneDNN's first calls of a shape build primitives: 50x the steady cost."""
    times = measure.time_callables({"op": sequence(50e-3, 20e-3, 1e-3, then=1e-3)}, rounds=3)
    assert times["op"] == 1e-3 and not times.contended


def test_figures_are_contended_when_other_processes_use_the_cpu(simulated, monkeypatch):
    monkeypatch.setattr(measure, "_own_cpu_s", lambda: 0.0)
    monkeypatch.setattr(measure.time, "perf_counter", itertools.count().__next__)  # 1 s per reading
    simulated.busy = 1.0  # each reading of /proc/stat finds one more second used: a busy core
    times = measure.time_callables({"op": lambda: 1e-3}, rounds=3)
    assert times.busy > measure.BUSY_CORES and times.contended
    assert times.blocks == 3 * (1 + measure.LOADED_ROUNDS)  # timed longer while contended
    simulated.busy = 0.0
    quiet = measure.time_callables({"op": lambda: 1e-3}, rounds=3)
    assert not quiet.contended and quiet.blocks == 3


def test_quiet_figures_of_one_round_decide_but_are_not_storable(simulated):
    """A window of a few blocks is too short for the load readings: a clear win settled in one
    round is never stored."""
    once = measure.time_callables({"op": lambda: 1e-3}, rounds=1)
    assert not once.contended and once.blocks == 1 and not once.storable
    assert measure.time_callables({"op": lambda: 1e-3}, rounds=measure.STORED_BLOCKS).storable


def test_figures_are_contended_when_our_threads_wait_for_a_cpu(simulated, monkeypatch):
    """Our spinning threads can starve a busy process to a quarter core: then we wait."""
    monkeypatch.setattr(measure, "_own_cpu_s", lambda: 0.0)
    monkeypatch.setattr(measure.time, "perf_counter", itertools.count().__next__)  # 1 s per reading
    simulated.waited = 0.5
    times = measure.time_callables({"op": lambda: 1e-3}, rounds=3)
    assert times.busy == 0.0 and times.waited > measure.WAITED_CORES and times.contended
    assert times.record()["waited"] == times.waited


def test_a_machine_without_proc_stat_reads_unknown_load_not_busy(simulated, monkeypatch):
    monkeypatch.setattr(measure, "_machine_busy_s", lambda: None)
    monkeypatch.setattr(measure, "_waited_s", lambda: None)
    times = measure.time_callables({"op": lambda: 1e-3}, rounds=3)
    assert math.isnan(times.busy) and math.isnan(times.waited) and not times.contended
    assert times.record()["busy"] is None and times.record()["waited"] is None


def test_noise_is_the_error_of_a_ratio_of_two_figures():
    assert Timings({"a": 1.0}, {"a": 0.05, "b": 0.02}).noise == pytest.approx(0.05 * math.sqrt(2))
    assert Timings({"a": 1.0}).noise == 0.0


def test_slow_blocks_above_the_quantile_do_not_widen_its_error(simulated):
    """A busy core makes some blocks 10x slow; the figure's error comes from the blocks around
    its quantile, so a 2x win stays clear."""
    steady = [1e-3, 1.01e-3, 0.99e-3, 1e-3, 1.02e-3, 0.98e-3, 1e-3, 1.01e-3]
    calls = itertools.chain([1e-3, 1e-3], itertools.cycle(steady + [10e-3] * 4))
    times = measure.time_callables({"op": lambda: next(calls)}, rounds=24)
    assert times.spread["op"] > 1.0 and times.error["op"] < 0.02


def test_user_code_is_timed_after_its_first_call():
    """A first call slowed by its allocations is not the figure: 100 ms, then 30 ms per call."""
    calls = itertools.count()
    assert measure.time_code(lambda: time.sleep(0.1 if next(calls) == 0 else 0.03)) < 0.08


@pytest.mark.parametrize("mode", ["infer", "train-w", "train"])
def test_forms_are_timed_on_operands_requiring_grad_as_a_models_do(mode):
    """Parameters require grad in inference too (``matmul`` takes another path for them), and
    an inference call records nothing; the data requires grad only where its gradient is needed."""
    import torch

    from convrewrite.forms import Form
    from convrewrite.kinds.channel_mix import ChannelMixSpec

    seen = set()

    def spy(x, w, b, *, spec):
        seen.add((torch.is_grad_enabled(), x.requires_grad, w.requires_grad, b.requires_grad))
        return (x * 2).mean(1, keepdim=True) + w.sum() + b.sum()

    spec = ChannelMixSpec(2, 4, 8, (5,), grad=mode != "infer", input_grad=mode == "train")
    measure.time_forms(spec, [Form("channel_mix", "spy", spy)], rounds=1, block_s=0)
    assert seen == {(mode != "infer", mode == "train", True, True)}
