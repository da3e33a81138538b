"""Cost-table files: round trip, device isolation, damaged files, atomic merging writes, prediction."""

import json
import multiprocessing
import os

import pytest

from convrewrite.forms import forms_for
from convrewrite.spec import ChannelMixSpec
from convrewrite.table import (CostTable, TableError, fingerprint, load_table, shipped_table_path,
                               user_table_path)

SPEC = ChannelMixSpec(8, 16, 32, (64,))


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


def test_partial_user_table_is_stacked_on_the_shipped_one(isolated_cache):
    table_with([(SPEC, {"conv": 1.0})], profiled=False).write(user_table_path("cpu"))
    table = load_table("cpu")
    assert table.lookup(SPEC) == {"conv": 1.0}
    assert len(table.entries) > 1


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"version": 999, "entries": {}}),
                                     json.dumps({"version": 1}), json.dumps([1, 2]),
                                     json.dumps({"version": 1, "fingerprint": {}, "entries": {"k": {"conv": "x"}}})])
def test_damaged_user_table_warns_and_falls_back_to_shipped(isolated_cache, content):
    path = user_table_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="falling back"):
        table = load_table("cpu")
    assert table.entries == load_table("cpu", shipped_table_path("cpu")).entries


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
