"""Shared fixtures: an isolated cache dir for every test, and fake cost tables so no test
depends on timing."""

from __future__ import annotations

import math

import pytest

from convrewrite import check
from convrewrite.forms import forms_for
from convrewrite.table import CostTable, fingerprint


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty user cache dir."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVREWRITE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(autouse=True)
def check_times(monkeypatch):
    """The whole-graph check runs both graphs once (so its care for inputs, buffers and RNG is
    exercised everywhere) and reads times from ``check_times.result``: the rewrite wins unless
    a test says otherwise."""

    def fake(fns, **_):
        for fn in fns.values():
            fn()
        return {name: t for name, t in fake.result.items() if name in fns}

    fake.result = {"original": 2e-3, "rewritten": 1e-3}
    monkeypatch.setattr(check, "time_callables", fake)
    monkeypatch.setattr(check, "CLEAR_WIN", math.inf)  # the annotating run's clock decides nothing here
    return fake


@pytest.fixture
def fake_table(tmp_path):
    """``fake_table(specs, winner)``: a profiled table file where ``winner`` is 4x faster than
    every other legal form of each spec (or the original wins if ``winner`` is None)."""

    def make(specs, winner=None, original_time=1e-3, ratio=4.0):
        table = CostTable(fingerprint("cpu"), profiled=True)
        for spec in specs:
            forms = forms_for(spec)
            times = {f.name: original_time for f in forms}
            if winner is not None and winner in times:
                times[winner] = original_time / ratio
            table.add(spec.key(), times, {f.name: f.source_hash for f in forms})
        path = tmp_path / f"table-{len(list(tmp_path.iterdir()))}.json"
        assert table.write(path)
        return path

    return make
