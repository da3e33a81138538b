"""Shared fixtures: an isolated cache dir for every test, and fake cost tables so no test
depends on timing."""

from __future__ import annotations

import pytest
import torch

from convrewrite import check, decide, profile, tablecmd
from convrewrite.forms import forms_for
from convrewrite.kinds import kinds
from convrewrite.measure import Timings
from convrewrite.table import CostTable, fingerprint

ORIGINALS = {kind.name: kind.original for kind in kinds()}


def pytest_configure(config):
    """No tqdm monitor thread: torch.fx's Interpreter makes tqdm bars, and tqdm then starts a
    daemon thread that is still waiting when the interpreter shuts down (a known source of
    crashes at exit, after the summary)."""
    try:
        import tqdm
    except ImportError:
        return
    tqdm.tqdm.monitor_interval = 0


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
    a test says otherwise; ``check_times.busy``: other load, in cores."""

    def fake(fns, rounds=1, **_):
        for fn in fns.values():
            fn()
        return Timings({name: t for name, t in fake.result.items() if name in fns}, busy=fake.busy, blocks=rounds)

    fake.result, fake.busy = {"original": 2e-3, "rewritten": 1e-3}, 0.0
    monkeypatch.setattr(check, "time_callables", fake)
    return fake


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """Forms measured at specialisation, by the profile or by the table command read their
    figures from here, never from the clock: ``clock.seconds(spec, form_name)`` (every form
    1 ms, the original 2 ms: a rewrite wins unless a test says otherwise) and ``clock.busy``
    (other load, in cores)."""

    def fake(spec, forms, **_):
        args = spec.example_inputs(torch.Generator(spec.device).manual_seed(0))
        for form in forms:  # run each once, as real timing would
            form.fn(*args, spec=spec)
        fake.calls += 1
        return Timings({f.name: fake.seconds(spec, f.name) for f in forms},
                       dict.fromkeys((f.name for f in forms), 0.01), fake.busy, 15)

    fake.seconds = lambda spec, name: 2e-3 if name == ORIGINALS.get(spec.kind) else 1e-3
    fake.busy, fake.calls = 0.0, 0
    monkeypatch.setattr(decide, "time_forms", fake)
    monkeypatch.setattr(profile, "time_forms", fake)
    monkeypatch.setattr(tablecmd, "time_forms", fake)
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
