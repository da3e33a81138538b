import torch
import torch.nn as nn

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
