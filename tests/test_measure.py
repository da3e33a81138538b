"""Timing callables side by side: failures left out, and a flush before every call that is
not charged to the callables."""

import time

import pytest

from convrewrite.measure import time_callables


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
