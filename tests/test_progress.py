"""Progress bars: off where asked or where stderr is not a terminal, and no thread left behind."""

import threading

from convrewrite import progress
from tests.test_pipeline import as_terminal


def test_progress_bars_are_off_when_asked(monkeypatch):
    as_terminal(monkeypatch)
    assert not progress.bar(total=1).disable
    assert progress.bar(total=1, enabled=False).disable
    monkeypatch.setenv(progress.QUIET_ENV, "0")
    assert progress.bar(total=1).disable


def test_a_bar_starts_no_monitor_thread():
    before = set(threading.enumerate())
    with progress.bar(total=2) as bar:
        bar.update(2)
    assert [t.name for t in set(threading.enumerate()) - before] == []
