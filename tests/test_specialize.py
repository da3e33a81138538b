"""Specialisations: one decided from figures taken under load is decided again later.

Times come from the ``check_times`` and ``clock`` fixtures (conftest), never from the clock."""

import pytest
import torch
import torch.nn as nn

import convrewrite
from convrewrite import specialize
from convrewrite.kinds.channel_mix import ChannelMixSpec

X = torch.randn(4, 8, 32)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(8, 16, 1), nn.ReLU(), nn.Conv1d(16, 8, 1)).eval()


@pytest.fixture
def table(fake_table):
    return fake_table([ChannelMixSpec(4, 8, 16, (32,)), ChannelMixSpec(4, 16, 8, (32,))], winner="matmul")


@pytest.fixture
def now(monkeypatch):
    """The clock the specialisations read: ``now.s`` seconds."""
    clock = type("Clock", (), {"s": 0.0})()
    monkeypatch.setattr(specialize, "_now", lambda: clock.s)
    return clock


def test_a_decision_under_load_is_taken_again_once_the_load_is_gone(table, check_times, now):
    plain, opt = model(), convrewrite.optimize(model(), table=table)
    check_times.result, check_times.busy = {"original": 1e-3, "rewritten": 1.5e-3}, 1.0  # a busy core: it lost
    with torch.no_grad():
        torch.testing.assert_close(opt(X), plain(X))
        first = opt.report
        assert not first.rewritten and "decided again in 2 s" in first.note
        check_times.result, check_times.busy = {"original": 2e-3, "rewritten": 1e-3}, 0.0  # quiet now
        now.s = 1.9
        torch.testing.assert_close(opt(X), plain(X))
        assert opt.report is first  # not yet
        now.s = 2.1
        torch.testing.assert_close(opt(X), plain(X))
        torch.testing.assert_close(opt(X), plain(X))
        again = opt.report
        assert [s.chosen for s in again] == ["matmul", "matmul"] and "decided again" not in again.note
        assert opt.graph_module(X) is not None and len(opt.reports) == 1


def test_decisions_under_load_are_taken_again_at_doubling_delays_then_stand(table, check_times, now):
    check_times.busy = 1.0
    opt = convrewrite.optimize(model(), table=table)
    decisions = []
    with torch.no_grad():
        for _ in range(60):
            opt(X)
            if not decisions or opt.report is not decisions[-1][1]:
                decisions.append((now.s, opt.report))
            now.s += 1.0
    assert [round(t) for t, _ in decisions] == [0, 3, 8, 17, 34]  # after 2, 4, 8 and 16 s (each on the next call)
    assert all("decided again" in r.note for _, r in decisions[:-1])
    last = decisions[-1][1]
    assert "decided again" not in last.note and last.rewritten  # the last decision stands, still under load


def test_a_quiet_decision_is_final_and_costs_the_hot_path_nothing(table):
    opt = convrewrite.optimize(model(), table=table)
    with torch.no_grad():
        opt(X)
    (spec,) = opt._state.specs.values()
    assert spec.retry_at is None and "decided again" not in opt.report.note
    assert spec.guarded  # rewritten modules are watched for hooks
    kept = convrewrite.optimize(model(), forms=())
    with torch.no_grad():
        kept(X)
    (spec,) = kept._state.specs.values()
    assert spec.retry_at is None and not spec.guarded


class Branches(nn.Module):
    """A branch on a tensor's value: fx cannot trace it, so it is captured through dynamo."""

    def __init__(self):
        super().__init__()
        self.body = model()

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else -self.body(x)


def test_a_decision_under_load_through_dynamo_says_it_stands(table, check_times, now):
    torch._dynamo.reset()
    check_times.busy = 1.0
    opt = convrewrite.optimize(Branches(), table=table)
    with torch.no_grad():
        opt(X.abs())
        first = opt.report
        now.s = 100.0
        opt(X.abs())
    assert first.rewritten and "through dynamo, not decided again" in first.note
    assert opt.report is first
    torch._dynamo.reset()
