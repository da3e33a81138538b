"""Choices made from fake tables: the margin, the source of the figures, allowed forms."""

import contextlib

import pytest

from convrewrite import decide
from convrewrite.decide import CONTENDED, MEASURED, NONE, PREDICTED, TABLE, beats, choose
from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.options import Options
from convrewrite.site import Site
from convrewrite.table import CostTable, fingerprint, user_table_path

SPEC = ChannelMixSpec(4, 8, 16, (32,))


def table(times, spec=SPEC):
    t = CostTable(fingerprint("cpu"))
    t.add(spec.key(), times, {})
    return t


ALL = {"conv": 3.0, "matmul": 1.0, "linear": 2.0, "baddbmm": 2.5, "addmm": 2.5}


def test_exact_entry_picks_the_fastest():
    c = choose(SPEC, "conv", table(ALL), Options())
    assert (c.form, c.source, c.t_original, c.t_chosen) == ("matmul", TABLE, 3.0, 1.0)


def test_entry_missing_a_legal_form_is_not_an_exact_hit():
    c = choose(SPEC, "conv", table({"conv": 3.0, "matmul": 1.0}), Options(measure=False))
    assert c.source == PREDICTED


@pytest.mark.parametrize("margin, expected", [(1.1, "conv"), (1.01, "matmul")])
def test_margin_keeps_the_original_unless_clearly_faster(margin, expected):
    c = choose(SPEC, "conv", table({**ALL, "conv": 1.05, "matmul": 1.0}), Options(margin=margin))
    assert c.form == expected


def test_unseen_spec_is_predicted_from_neighbours():
    near = ChannelMixSpec(4, 8, 16, (30,))
    c = choose(SPEC, "conv", table({"conv": 3.0, "baddbmm": 1.0}, near), Options())
    assert (c.form, c.source) == ("baddbmm", PREDICTED)


def test_no_figures_keeps_the_original():
    c = choose(SPEC, "conv", CostTable(fingerprint("cpu")), Options(measure=False))
    assert (c.form, c.source, c.rewritten) == ("conv", NONE, False)


def test_forms_option_restricts_the_choice():
    c = choose(SPEC, "conv", table(ALL), Options(forms=("linear",)))
    assert c.form == "linear"


def test_auto_measures_where_the_table_has_nothing(isolated_cache):
    c = choose(SPEC, "conv", CostTable(fingerprint("cpu")), Options())
    assert c.source == MEASURED


def test_measure_on_miss_times_and_remembers(isolated_cache):
    t = CostTable(fingerprint("cpu"))
    c = choose(SPEC, "conv", t, Options(measure=True))
    assert c.source == MEASURED and set(c.times) >= {"conv", "matmul", "linear"}
    assert t.lookup(SPEC) == c.times
    assert CostTable.read(user_table_path("cpu")).lookup(SPEC) == c.times


@pytest.mark.parametrize("bad", [dict(margin=0.5), dict(margin="2"), dict(measure=1), dict(verify="yes")])
def test_options_are_validated(bad):
    with pytest.raises((ValueError, TypeError)):
        Options(**bad)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="valid options: .*margin"):
        Options.from_kwargs(margn=1.2)


def test_inductor_specs_are_never_measured_here(isolated_cache):
    spec = ChannelMixSpec(4, 8, 16, (32,), executor="inductor")
    for measure in (True, "auto"):
        c = choose(spec, "conv", CostTable(fingerprint("cpu")), Options(measure=measure))
        assert (c.form, c.source) == ("conv", NONE)  # left to inductor


def test_predictions_never_cross_executors():
    eager = ChannelMixSpec(4, 8, 16, (30,))
    c = choose(ChannelMixSpec(4, 8, 16, (32,), executor="inductor"), "conv",
               table({**ALL, "conv": 9.0}, eager), Options(measure=False))
    assert c.source == NONE


def test_a_measurement_under_load_decides_but_is_never_stored(isolated_cache, clock):
    clock.busy = 1.0  # another process kept a core busy while the forms were timed
    t = CostTable(fingerprint("cpu"))
    c = choose(SPEC, "conv", t, Options(measure=True))
    assert c.source == CONTENDED and c.rewritten
    assert t.lookup(SPEC) is None and not user_table_path("cpu").exists()
    clock.busy = 0.0  # a later specialisation, on a quiet machine, measures again and keeps it
    assert choose(SPEC, "conv", t, Options(measure=True)).source == MEASURED and t.lookup(SPEC) is not None


def test_a_clean_measurement_is_stored_with_how_it_was_taken(isolated_cache):
    t = CostTable(fingerprint("cpu"))
    choose(SPEC, "conv", t, Options(measure=True))
    meta = CostTable.read(user_table_path("cpu")).meta[SPEC.key()]
    assert meta["blocks"] == 15 and meta["busy"] == 0.0 and "when" in meta and "threads" in meta


def test_auto_measures_where_only_another_machines_figures_exist(isolated_cache, clock):
    near = ChannelMixSpec(4, 8, 16, (30,))
    t = CostTable(fingerprint("cpu"), prior={near.key(): {**ALL, "conv": 9.0}})
    assert choose(SPEC, "conv", t, Options(measure=False)).source == PREDICTED  # the prior still predicts
    assert clock.calls == 0
    assert choose(SPEC, "conv", t, Options()).source == MEASURED and clock.calls == 1


@pytest.mark.parametrize("neighbour, measured", [(ChannelMixSpec(4, 8, 16, (30,)), False),
                                                  (ChannelMixSpec(1, 768, 768, (128,)), True)])
def test_auto_measures_where_a_prediction_would_extrapolate(isolated_cache, clock, neighbour, measured):
    t = table({**ALL, "conv": 9.0}, neighbour)  # agreeing figures, near or far from SPEC
    assert (t.reach(SPEC, "conv") > decide.AUTO_REACH) is measured
    assert (choose(SPEC, "conv", t, Options()).source == MEASURED) is measured and clock.calls == int(measured)


@pytest.mark.parametrize("noise, expected", [(0.0, True), (0.1, False)])
def test_a_win_must_exceed_the_noise_as_well_as_the_margin(noise, expected):
    assert beats(0.9, 1.0, margin=1.05, noise=noise) is expected


def test_ties_keep_the_original():
    assert not beats(1.0, 1.0, margin=1.0)


def _code_site(first_call_s, runs, key="loop"):
    @contextlib.contextmanager
    def runner():
        runs.append(key)
        yield lambda: sum(range(100))

    return Site(None, None, (), None, decide.AS_WRITTEN, "conv loop", "p", source_seconds=first_call_s,
                source_runner=runner, source_key=key)


def test_code_is_timed_once_per_key_unless_its_first_call_was_long(monkeypatch):
    monkeypatch.setattr(decide, "time_code", lambda call: (call(), 0.01)[1])
    monkeypatch.setattr(decide, "_source_seconds", decide._source_seconds.__class__())
    runs = []
    assert decide.source_seconds(_code_site(5.0, runs)) == 5.0 and runs == []  # long: its own figure
    assert decide.source_seconds(_code_site(1e-4, runs)) == 0.01 and runs == ["loop"]  # short: cold, retimed
    assert decide.source_seconds(_code_site(None, runs)) == 0.01 and runs == ["loop"]  # the same code: remembered
    assert decide.source_seconds(_code_site(None, runs, key="other")) == 0.01 and runs == ["loop", "other"]
