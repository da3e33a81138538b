"""The whole-graph check: what it keeps, what it reverts, and that it leaves no trace.

Times come from the ``check_times`` fixture (conftest), never from the clock."""

import pytest
import torch
import torch.nn as nn

import convrewrite
from convrewrite import check, device, table as cost_table
from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.measure import Timings

X = torch.randn(4, 8, 32)


def stack():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(8, 16, 1), nn.BatchNorm1d(16), nn.ReLU(inplace=True), nn.Dropout(0.3),
                         nn.Conv1d(16, 8, 1))


@pytest.fixture
def table(fake_table):
    specs = [ChannelMixSpec(4, 8, 16, (32,), grad=g) for g in (False, True)]
    specs += [ChannelMixSpec(4, 16, 8, (32,), grad=g) for g in (False, True)]
    return fake_table(specs, winner="matmul")


def test_a_rewrite_that_is_slower_in_place_is_reverted(table, check_times):
    check_times.result = {"original": 1e-3, "rewritten": 1.5e-3}
    model = stack().eval()
    opt = convrewrite.optimize(model, table=table)
    with torch.no_grad():
        report = opt.specialize(X)
        torch.testing.assert_close(opt(X), model(X))
        assert opt.graph_module(X) is None  # the original runs
    assert len(report) == 2 and not report.rewritten
    assert all("1.50x the time" in s.note for s in report)
    assert "1.500 ms rewritten, 1.000 ms as written" in report.note


def test_a_rewrite_that_is_faster_in_place_is_kept_and_reported(table):
    model = stack().eval()
    opt = convrewrite.optimize(model, table=table)
    with torch.no_grad():
        report = opt.specialize(X)
    assert [s.chosen for s in report] == ["matmul", "matmul"]
    assert "1.000 ms rewritten, 2.000 ms as written" in report.note


def test_a_tie_within_the_margin_keeps_the_original(table, check_times):
    check_times.result = {"original": 1e-3, "rewritten": 0.99e-3}
    with torch.no_grad():
        report = convrewrite.explain(stack().eval(), X, table=table)
    assert not report.rewritten and "0.99x the time" in report.sites[0].note


@pytest.mark.parametrize("times, why", [
    (Timings({"original": 1e-3, "rewritten": 1.2e-3}), "ran 1.20x the time"),
    (Timings({"original": 1e-3, "rewritten": 0.98e-3}), "ran 0.98x the time, less than the 5% margin"),
    (Timings({"original": 1e-3, "rewritten": 0.2e-3}, {"original": 2.0, "rewritten": 0.1}),
     "ran 0.20x the time, a lead inside the figures' noise (283% each way"),
    (Timings({"original": 1e-3, "rewritten": 0.9e-3}), "ran 0.90x the time, less than the margin and 200 us a call"),
], ids=["slower", "margin", "noise", "slack"])
def test_the_note_of_a_kept_original_names_what_outweighed_the_rewrite(times, why):
    assert check.fastest(times, slack_s=2e-4) == check.ORIGINAL
    assert why in check.kept_because(times, slack_s=2e-4)


def test_close_graphs_are_timed_again_with_more_rounds(table, check_times, monkeypatch, tmp_path):
    seen = []

    def timed(fns, rounds, **kwargs):
        seen.append(rounds)
        return check_times(fns, **kwargs)

    monkeypatch.setattr(check, "time_callables", timed)
    for result, expected in [({"original": 1.2e-3, "rewritten": 1e-3}, [1, check.ROUNDS]),
                             ({"original": 4e-3, "rewritten": 1e-3}, [1])]:  # a clear win after one round
        monkeypatch.setenv("CONVREWRITE_CACHE_DIR", str(tmp_path / str(result)))  # no figures kept from before
        check_times.result, seen[:] = result, []
        with torch.no_grad():
            assert convrewrite.explain(stack().eval(), X, table=table).rewritten
        assert seen == expected


@pytest.mark.parametrize("lead, seconds, error_after, expected, rewritten", [
    (1.15, 1e-3, 0.02, [1, check.ROUNDS, check.LONGER * check.ROUNDS], True),  # the longer figures settle it
    (1.15, 1e-3, 0.06, [1, check.ROUNDS, check.LONGER * check.ROUNDS], False),  # still noise: kept
    (1.03, 1e-3, 0.02, [1, check.ROUNDS], False),  # a lead below the margin is not worth timing again
    (1.15, 1.0, 0.02, [1, check.ROUNDS], False),  # a model this slow is not timed for a minute
], ids=["settled", "still-noise", "below-margin", "too-slow"])
def test_a_lead_inside_the_noise_is_timed_again_longer(table, check_times, monkeypatch, lead, seconds, error_after,
                                                       expected, rewritten):
    seen = []

    def timed(fns, rounds, **kwargs):
        seen.append(rounds)
        check_times(fns)
        error = 0.06 if rounds <= check.ROUNDS else error_after  # 2 x 6% each way: a 1.17x lead is noise
        return Timings({"original": lead * seconds, "rewritten": seconds},
                       dict.fromkeys(("original", "rewritten"), error), 0.0, rounds)

    monkeypatch.setattr(check, "time_callables", timed)
    with torch.no_grad():
        report = convrewrite.explain(stack().eval(), X, table=table)
    assert seen == expected and bool(report.rewritten) == rewritten


def test_a_graph_that_fails_to_run_keeps_the_original(table, check_times):
    check_times.result = {"original": 1e-3}  # what time_callables returns when a candidate raised
    with torch.no_grad():
        report = convrewrite.explain(stack().eval(), X, table=table)
    assert not report.rewritten and "could not run" in report.sites[0].note


def test_check_false_skips_it(table, check_times):
    check_times.result = {"original": 1e-3, "rewritten": 9.0}
    with torch.no_grad():
        assert len(convrewrite.explain(stack().eval(), X, table=table, check=False).rewritten) == 2


def test_checking_leaves_inputs_buffers_and_random_streams_as_one_call_would(table):
    """Training mode: BatchNorm updates its statistics, dropout draws, ReLU writes in place."""
    model, twin = stack(), stack()
    opt = convrewrite.optimize(model, table=table)
    x = X.clone().requires_grad_()
    torch.manual_seed(1)
    out = opt(x)  # specialises: captures, rewrites, checks (running both graphs), returns
    after = torch.rand(3)
    torch.manual_seed(1)
    ref = twin(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(after, torch.rand(3))
    for b, r in zip(model.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, r)
    assert all(p.grad is None for p in model.parameters())  # the check's backward accumulates nothing
    torch.autograd.grad(out.sum(), x)  # BatchNorm saved its running statistics: no version bumped since


class WritesItsInput(nn.Module):
    """A pointwise conv of ``prepare(input)``, which writes into the input."""

    def __init__(self, prepare):
        super().__init__()
        self.conv, self.prepare = nn.Conv1d(8, 16, 1), prepare

    def forward(self, x):
        return self.conv(self.prepare(x))


def test_inputs_written_in_place_are_copied_for_the_check(table):
    model, x = WritesItsInput(lambda x: x.mul_(2)).eval(), X.clone()
    with torch.no_grad():
        out = convrewrite.optimize(model, table=table)(x)
    torch.testing.assert_close(x, X * 2)  # written once, by the user's own call
    torch.testing.assert_close(out, model.conv(X * 2))


def test_a_win_within_the_noise_keeps_the_original(table, check_times, monkeypatch):
    """Figures 10% apart, each known to 6%: the difference is noise, not a win."""
    def noisy(fns, **_):
        for fn in fns.values():
            fn()
        return Timings({"original": 1.1e-3, "rewritten": 1e-3}, {"original": 0.06, "rewritten": 0.06}, 0.0, 9)

    monkeypatch.setattr(check, "time_callables", noisy)
    with torch.no_grad():
        report = convrewrite.explain(stack().eval(), X, table=table)
    assert not report.rewritten


def test_the_original_is_timed_warm_not_from_its_first_call(table, check_times, monkeypatch):
    """A cold first call (lazy init, a busy moment) never stands for the original's time: the
    check asks the clock for both graphs, every time."""
    asked = []

    def timed(fns, **kwargs):
        asked.append(sorted(fns))
        return check_times(fns, **kwargs)

    monkeypatch.setattr(check, "time_callables", timed)
    check_times.result = {"original": 9.0, "rewritten": 1e-9}
    with torch.no_grad():
        report = convrewrite.explain(stack().eval(), X, table=table)
    assert asked == [["original", "rewritten"]] and len(report.rewritten) == 2


def test_a_model_with_hooks_is_not_checked(table):
    model, calls = stack().eval(), []
    model[2].register_forward_hook(lambda *_: calls.append(1))
    opt = convrewrite.optimize(model, table=table)
    with torch.no_grad():
        opt(X)
    assert len(calls) == 1 and "not checked: the model has hooks" in opt.report.note
    assert len(opt.report.rewritten) == 2


def test_tensors_nested_in_arguments_are_copied_too(table):
    model, xs = WritesItsInput(lambda xs: xs[0].mul_(2) + xs[1]).eval(), [X.clone(), X.clone()]
    with torch.no_grad():
        convrewrite.optimize(model, table=table)(xs)
    torch.testing.assert_close(xs[0], X * 2)


def test_an_input_that_requires_grad_may_be_written_in_place(table):
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv1d(8, 16, 1), nn.Conv1d(16, 8, 1))
    opt = convrewrite.optimize(model, table=table)
    x = X.clone().requires_grad_()
    out = opt(x * 1)  # a non-leaf, as the output of an earlier layer is
    assert len(opt.report.rewritten) == 2
    torch.testing.assert_close(out, model(x * 1))


def test_compiled_graphs_are_timed_with_the_cache_flushed_between_calls(check_times, monkeypatch):
    seen = {}

    def timed(fns, **kwargs):
        seen.update(kwargs)
        return check_times(fns, **kwargs)

    monkeypatch.setattr(check, "time_callables", timed)
    check_times.result = {"original": 2e-3, "rewritten": 1e-3}
    times = check.compiled_times({"original": lambda x: x + 1, "rewritten": lambda x: x + 2}, [X], [])
    assert dict(times) == check_times.result and callable(seen["flush"])
    assert seen["flush"]().numel() * 4 >= device.CPU_CACHE_BYTES  # it writes a buffer that large


@pytest.mark.parametrize("rewritten, slack_s, expected", [(0.9e-3, 0.0, "rewritten"), (0.9e-3, 5e-5, "rewritten"),
                                                         (0.9e-3, 6e-5, "original"), (0.97e-3, 0.0, "original")])
def test_a_candidate_must_win_by_the_margin_and_the_slack(rewritten, slack_s, expected):
    assert check.fastest({"original": 1e-3, "rewritten": rewritten}, slack_s=slack_s) == expected


def test_figures_taken_under_load_or_in_one_round_are_not_kept():
    figures = check.GraphFigures("graph|test", "cpu")
    figures.keep(Timings({"original": 2e-3, "rewritten": 1e-3}, busy=1.0, blocks=9))
    figures.keep(Timings({"original": 8e-3, "rewritten": 1e-3}, busy=0.0, blocks=1))  # a clear win, settled at once
    cost_table._loaded.cache_clear()
    assert figures.recalled() is None
    figures.keep(Timings({"original": 2e-3, "rewritten": 1e-3}, {"original": 0.1, "rewritten": 0.2}, busy=0.0,
                         blocks=9))
    cost_table._loaded.cache_clear()
    recalled = figures.recalled()
    assert dict(recalled) == {"original": 2e-3, "rewritten": 1e-3} and recalled.error == {"original": 0.1, "rewritten": 0.2}


@pytest.mark.parametrize("result", [{"original": 2e-3, "rewritten": 1e-3}, {"original": 1e-3, "rewritten": 1.5e-3}])
def test_a_later_process_decides_as_the_first_did_without_timing_again(table, check_times, monkeypatch, result):
    check_times.result = result
    with torch.no_grad():
        first = convrewrite.explain(stack().eval(), X, table=table)
    cost_table._loaded.cache_clear()  # as a later process: the figures come from the file
    monkeypatch.setattr(check, "time_callables", lambda *a, **k: pytest.fail("timed again"))
    with torch.no_grad():
        later = convrewrite.explain(stack().eval(), X, table=table)
    assert [s.chosen for s in later] == [s.chosen for s in first] and len(later) == 2
    assert "as timed before on this machine" in later.note


def test_figures_kept_for_a_model_in_one_mode_do_not_decide_for_another(table, check_times, monkeypatch):
    with torch.no_grad():
        convrewrite.explain(stack().eval(), X, table=table)
        timed = []
        monkeypatch.setattr(check, "time_callables", lambda fns, **k: timed.append(1) or check_times(fns, **k))
        convrewrite.explain(stack().train(), X, table=table)  # BatchNorm and Dropout: the same fx graph
    assert timed
