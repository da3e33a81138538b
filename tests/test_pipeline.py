"""The pass: every site of every rule decided, rewritten where a form wins, with progress."""

import pytest
import torch
import torch.nn as nn

from convrewrite import pipeline, progress
from convrewrite.capture import annotate, capture
from convrewrite.options import Options
from convrewrite.pipeline import rewrite
from convrewrite.rules import find_sites


def test_chained_sites_are_all_rewritten(fake_table):
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 1))
    x = torch.randn(2, 4, 7)
    gm = capture(model)
    annotate(gm, (x,))
    table = fake_table([s.spec for s in find_sites(gm)], winner="linear")
    report = rewrite(gm, Options(table=table))
    assert [s.chosen for s in report] == ["linear"] * 3
    torch.testing.assert_close(gm(x), model(x))


def test_rewriting_a_rewritten_graph_changes_nothing(fake_table):
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 3))
    x = torch.randn(2, 4, 7)
    gm = capture(model)
    annotate(gm, (x,))
    table = fake_table([s.spec for s in find_sites(gm)], winner="linear")
    assert len(rewrite(gm, Options(table=table)).rewritten) == 1
    code = gm.code
    annotate(gm, (x,))
    assert len(rewrite(gm, Options(table=table))) == 0 and gm.code == code
    torch.testing.assert_close(gm(x), model(x))


class Terminal:
    """A stderr that is a terminal, where tqdm shows its bars."""

    def isatty(self):
        return True

    def write(self, text):
        pass

    def flush(self):
        pass


def as_terminal(monkeypatch):
    """Make stderr a terminal for this test's body (pytest sets its own between phases)."""
    monkeypatch.setattr(progress.sys, "stderr", Terminal())


@pytest.mark.parametrize("shown", [True, False])
def test_choosing_forms_counts_every_site_on_a_progress_bar(fake_table, monkeypatch, shown):
    as_terminal(monkeypatch)
    bars, make = [], progress.bar

    def recording_bar(**kwargs):
        bars.append((kwargs, make(**kwargs)))
        return bars[-1][1]

    monkeypatch.setattr(progress, "bar", recording_bar)
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 1))
    gm = capture(model)
    annotate(gm, (torch.randn(2, 4, 7),))
    rewrite(gm, Options(table=fake_table([s.spec for s in find_sites(gm)]), progress=shown))
    ((kwargs, bar),) = bars
    assert bar.total == 3 and bar.n == (3 if shown else 0)  # a disabled bar counts nothing
    assert kwargs["enabled"] is shown and kwargs["delay"] == pipeline.PROGRESS_AFTER_S
