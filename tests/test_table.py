"""Cost-table files: round trip, device isolation, damaged files, atomic merging writes, prediction."""

import contextlib
import json
import multiprocessing
import os

import pytest

from convrewrite import table as table_module
from convrewrite.forms import forms_for
from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.table import VERSION, CostTable, TableError, fingerprint, load_table, shipped_table_path, user_table_path

SPEC = ChannelMixSpec(8, 16, 32, (64,))
OTHER = ChannelMixSpec(8, 16, 32, (128,))


def table_with(entries, profiled=True, fp=None):
    t = CostTable(fp or fingerprint("cpu"), profiled=profiled)
    for spec, times in entries:
        t.add(spec.key(), times, {f.name: f.source_hash for f in forms_for(spec)})
    return t


def test_round_trip(tmp_path):
    t = table_with([(SPEC, {"conv": 2e-3, "matmul": 1e-3})])
    assert t.write(tmp_path / "t.json")
    back = CostTable.read(tmp_path / "t.json")
    assert back.lookup(SPEC) == {"conv": 2e-3, "matmul": 1e-3} and back.profiled


def test_user_table_path_honours_cache_dir(isolated_cache):
    path = user_table_path("cpu")
    assert path.parent == isolated_cache and path.name.startswith("cpu-")


def test_shipped_cpu_table_is_valid_and_current():
    shipped = CostTable.read(shipped_table_path("cpu"))
    assert len(shipped.entries) >= 100 and shipped.profiled
    assert all(ChannelMixSpec.from_key(key).key() == key for key in shipped.entries)
    current = {f.name: f.source_hash for f in forms_for(SPEC)}
    stale = {n for n, h in shipped.form_hashes.items() if n in current and current[n] != h}
    assert not stale, f"forms edited since the shipped table was profiled: {stale}; rerun the profile"


def test_user_table_wins_over_shipped(isolated_cache):
    table_with([(SPEC, {"conv": 1.0, "matmul": 0.5})]).write(user_table_path("cpu"))
    assert load_table("cpu").lookup(SPEC) == {"conv": 1.0, "matmul": 0.5}


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """``shipped(table)``: make ``table`` the shipped one for this test."""
    def ship(table):
        table.write(tmp_path / "shipped.json")
        monkeypatch.setattr(table_module, "shipped_table_path", lambda device="cpu": tmp_path / "shipped.json")
    return ship


def test_partial_user_table_is_stacked_on_the_shipped_one(isolated_cache, shipped):
    shipped(table_with([(SPEC, {"conv": 2.0}), (OTHER, {"conv": 3.0})]))
    table_with([(SPEC, {"conv": 1.0})], profiled=False).write(user_table_path("cpu"))
    table = load_table("cpu")
    assert table.lookup(SPEC) == {"conv": 1.0} and table.lookup(OTHER) == {"conv": 3.0}


def test_another_machines_table_is_a_prior_never_an_exact_hit(isolated_cache, shipped):
    foreign = dict(fingerprint("cpu"), threads=fingerprint("cpu")["threads"] + 1)
    shipped(table_with([(SPEC, {"conv": 2e-3, "matmul": 1e-3}), (OTHER, {"conv": 3e-3, "matmul": 1e-3})], fp=foreign))
    table = load_table("cpu")
    assert table.lookup(SPEC) is None and table.own_share(SPEC, "conv") == 0.0
    assert table.predict(SPEC, ["matmul"], "conv")["matmul"] < table.predict(SPEC, ["conv"], "conv")["conv"]


def test_an_entry_measured_here_outranks_the_prior(isolated_cache, shipped):
    foreign = dict(fingerprint("cpu"), torch="0.0")
    shipped(table_with([(OTHER, {"conv": 3e-3})], fp=foreign))
    table_with([(SPEC, {"conv": 1e-3})], profiled=False).write(user_table_path("cpu"))
    table = load_table("cpu")
    assert table.own_share(SPEC, "conv") > 0.5 and table.lookup(OTHER) is None


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"version": 999, "entries": {}}),
                                     json.dumps({"version": 1}), json.dumps([1, 2]),
                                     json.dumps({"version": 1, "fingerprint": {}, "entries": {"k": {"conv": "x"}}})])
def test_damaged_user_table_warns_and_falls_back_to_shipped(isolated_cache, content):
    path = user_table_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="falling back"):
        table = load_table("cpu")
    shipped = load_table("cpu", shipped_table_path("cpu"))
    assert (table.entries, table.prior) == (shipped.entries, shipped.prior) and table.entries | table.prior


def test_a_table_of_an_older_version_says_so_and_is_replaced_at_the_next_write(isolated_cache):
    path = user_table_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": VERSION - 1, "fingerprint": fingerprint("cpu"), "entries": {}}))
    with pytest.warns(UserWarning, match="older convrewrite .* replaced when this machine's next figure is stored"):
        load_table("cpu")
    table_with([(SPEC, {"conv": 1e-3})], profiled=False).write(path)
    assert CostTable.read(path).entries == {SPEC.key(): {"conv": 1e-3}}


def test_foreign_device_table_is_ignored(tmp_path):
    foreign = table_with([(SPEC, {"conv": 1.0})], fp={"device": "cuda", "name": "X"})
    foreign.write(tmp_path / "gpu.json")
    with pytest.warns(UserWarning, match="is for 'cuda'"):
        table = load_table("cpu", tmp_path / "gpu.json")
    assert table.lookup(SPEC) != {"conv": 1.0}


def test_read_raises_table_error_on_truncation(tmp_path):
    table_with([(SPEC, {"conv": 1.0})]).write(tmp_path / "t.json")
    data = (tmp_path / "t.json").read_text()
    (tmp_path / "t.json").write_text(data[: len(data) // 2])
    with pytest.raises(TableError):
        CostTable.read(tmp_path / "t.json")


def test_write_merges_with_what_is_on_disk(tmp_path):
    other = ChannelMixSpec(1, 4, 4, (4,))
    table_with([(SPEC, {"conv": 1.0})]).write(tmp_path / "t.json")
    table_with([(other, {"conv": 2.0})]).write(tmp_path / "t.json")
    assert set(CostTable.read(tmp_path / "t.json").entries) == {SPEC.key(), other.key()}


def test_unwritable_dir_warns_and_keeps_going(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="could not write"):
        assert not table_with([(SPEC, {"conv": 1.0})]).write(tmp_path / "file" / "t.json")


def _write_many(path, worker):
    for i in range(20):
        table_with([(ChannelMixSpec(1 + worker, 4, 4, (i + 1,)), {"conv": 1.0})]).write(path)


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "t.json"
    procs = [multiprocessing.get_context("fork").Process(target=_write_many, args=(path, w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(CostTable.read(path).entries) == 40
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def _write_many_unlocked(path, worker):
    table_module._locked = lambda path: contextlib.nullcontext()  # this (forked) process only
    _write_many(path, worker)


def test_writers_whose_lock_excludes_nothing_never_leave_a_partial_file(tmp_path):
    # machines sharing a cache dir over a network file system: flock may exclude nothing
    path = tmp_path / "t.json"
    table_with([]).write(path)
    procs = [multiprocessing.get_context("fork").Process(target=_write_many_unlocked, args=(path, w))
             for w in range(2)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        CostTable.read(path)  # a partial or corrupt file raises TableError
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert {ChannelMixSpec.from_key(k).batch for k in CostTable.read(path).entries} == {1, 2}


def test_a_write_overtaken_between_its_read_and_its_move_merges_again(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    monkeypatch.setattr(table_module, "_locked", lambda path: contextlib.nullcontext())
    read = CostTable._merged_with_disk
    overtaken = []

    def read_then_overtaken(self, file):
        merged = read(self, file)
        if not overtaken:  # another machine's write lands after our read
            overtaken.append(file)
            table_with([(OTHER, {"conv": 2.0})]).write(file)
        return merged
    monkeypatch.setattr(CostTable, "_merged_with_disk", read_then_overtaken)
    assert table_with([(SPEC, {"conv": 1.0})]).write(path)
    assert overtaken == [path] and set(CostTable.read(path).entries) == {SPEC.key(), OTHER.key()}


def test_stale_form_timings_are_dropped(tmp_path):
    t = table_with([(SPEC, {"conv": 1.0, "matmul": 0.5})])
    t.form_hashes["matmul"] = "0" * 12  # as if matmul's source had changed since
    t.write(tmp_path / "t.json")
    assert load_table("cpu", tmp_path / "t.json").lookup(SPEC) == {"conv": 1.0}


def test_prediction_follows_the_nearest_entries():
    near = ChannelMixSpec(8, 16, 32, (60,))
    far = ChannelMixSpec(8, 1024, 1024, (4,))
    t = table_with([(near, {"conv": 1.0, "matmul": 0.25}), (far, {"conv": 1.0, "matmul": 4.0})])
    pred = t.predict(SPEC, ["conv", "matmul"], "conv")
    assert pred["matmul"] < pred["conv"] / 2


def test_prediction_is_empty_without_entries():
    assert CostTable(fingerprint("cpu")).predict(SPEC, ["conv"], "conv") == {}


def grid(times_of, sizes=(16, 32, 64, 128, 256, 512)):
    """A table of one row of specs that differ only in positions, timed by ``times_of(spec)``."""
    return table_with([(s, times_of(s)) for s in (ChannelMixSpec(8, 16, 32, (n,)) for n in sizes)])


def test_loading_drops_a_figure_its_neighbours_contradict(tmp_path):
    def times(spec):
        n = spec.out_spatial[0]
        return {"conv": n * 1e-6, "matmul": (40e-3 if n == 64 else n * 0.5e-6)}  # read under load

    grid(times).write(tmp_path / "t.json")
    table = load_table("cpu", tmp_path / "t.json")
    inflated = ChannelMixSpec(8, 16, 32, (64,))
    assert table.lookup(inflated) == {"conv": 64e-6}
    assert all(len(t) == 2 for k, t in table.entries.items() if k != inflated.key())


def test_an_entry_whose_original_is_contradicted_is_dropped_whole(tmp_path):
    grid(lambda s: {"conv": 40e-3 if s.out_spatial[0] == 64 else s.out_spatial[0] * 1e-6, "matmul": 1e-6}
         ).write(tmp_path / "t.json")
    table = load_table("cpu", tmp_path / "t.json")
    assert table.lookup(ChannelMixSpec(8, 16, 32, (64,))) is None and len(table.entries) == 5


def test_consistent_figures_are_all_kept(tmp_path):
    grid(lambda s: {"conv": s.out_spatial[0] * 1e-6, "matmul": 3e-5}).write(tmp_path / "t.json")
    assert len(load_table("cpu", tmp_path / "t.json").entries) == 6


def test_how_an_entry_was_measured_survives_the_round_trip(tmp_path):
    t = table_with([])
    t.add(SPEC.key(), {"conv": 1e-3}, {}, {"blocks": 15, "spread": 0.03, "busy": 0.0})
    t.write(tmp_path / "t.json")
    assert CostTable.read(tmp_path / "t.json").meta == {SPEC.key(): {"blocks": 15, "spread": 0.03, "busy": 0.0}}


def test_a_new_measurement_replaces_the_entry(tmp_path):
    t = table_with([(SPEC, {"conv": 40e-3, "matmul": 1e-3})])
    t.write(tmp_path / "t.json")
    again = CostTable(fingerprint("cpu"))
    again.add(SPEC.key(), {"conv": 2e-3, "matmul": 1e-3}, {})
    again.write(tmp_path / "t.json")
    assert CostTable.read(tmp_path / "t.json").lookup(SPEC) == {"conv": 2e-3, "matmul": 1e-3}


def test_figures_of_different_measurements_are_not_mixed_in_one_entry(tmp_path):
    t = table_with([(SPEC, {"conv": 4e-3, "matmul": 2e-3, "linear": 3e-3})])
    t.add(SPEC.key(), {"conv": 2e-3, "matmul": 1e-3}, {})  # a later measurement without linear
    assert t.lookup(SPEC) == {"conv": 2e-3, "matmul": 1e-3}


def test_a_written_table_has_the_mode_of_any_file_this_process_creates(tmp_path):
    path = tmp_path / "t.json"
    table_with([(SPEC, {"conv": 1e-3})]).write(path)
    plain = tmp_path / "plain"
    plain.write_text("")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == table_module.FILE_MODE
