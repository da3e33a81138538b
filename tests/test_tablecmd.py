"""``python -m convrewrite.table``: show, check, prune, reset, export, import and merge, on fake tables."""

import subprocess
import sys

import pytest

from convrewrite import tablecmd
from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.table import CostTable, fingerprint, user_table_path

SPECS = [ChannelMixSpec(2 ** (i % 5), 8 + i, 16, (16 + i,)) for i in range(12)]


@pytest.fixture
def table(fake_table):
    """This machine's user table: baddbmm 4x faster than every other form on 12 specs."""
    path = user_table_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text(open(fake_table(SPECS, "baddbmm")).read())
    return path


def test_show_lists_entries_winners_and_flags(table, capsys):
    entries = CostTable.read(table).entries
    entries[SPECS[5].key()]["conv"] = 1.0  # 1000x its neighbours': contradicted
    t = CostTable.read(table)
    t.entries = entries
    t.write(table, merge=False)
    assert tablecmd.main(["show"]) == 0
    out = capsys.readouterr().out
    assert "12 entries" in out and "baddbmm" in out and "4.00x" in out
    assert "1 contradicted" in out and "contradicted by neighbours" in out


def test_show_lists_the_backends_compiled_graph_figures(table, capsys):
    t = CostTable.read(table)
    t.add("graph|0123", {"original": 3e-3, "rewritten": 1e-3}, {}, {"when": "2026-12-03"})
    t.write(table, merge=False)
    assert tablecmd.main(["show"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("graph|0123"))
    assert row.split()[1:4] == ["compiled", "rewritten", "3.00x"]


def test_prune_drops_what_show_flags(table):
    t = CostTable.read(table)
    t.entries[SPECS[5].key()]["conv"] = 1.0
    t.write(table, merge=False)
    assert tablecmd.main(["prune"]) == 0
    assert SPECS[5].key() not in CostTable.read(table).entries and len(CostTable.read(table).entries) == 11


def test_check_reports_moved_levels_and_rankings_and_update_stores_clean_figures(table, clock, capsys):
    clock.seconds = lambda spec, name: 4e-3  # every form now 4 ms: stored 1 ms (baddbmm 0.25 ms)
    assert tablecmd.main(["check", "--sample", "3", "--update"]) == 0
    out = capsys.readouterr().out
    assert "3 of 12 entries re-timed: 3 moved by more than 1.25x, 0 changed their fastest form" in out
    assert "3 updated" in out
    assert sum(set(t.values()) == {4e-3} for t in CostTable.read(table).entries.values()) == 3


def test_check_reports_a_changed_ranking(table, clock, capsys):
    clock.seconds = lambda spec, name: 0.5e-3 if name == "conv" else 1e-3  # baddbmm no longer fastest
    assert tablecmd.main(["check", "--sample", "2"]) == 0
    assert "2 changed their fastest form by more than 1.1x" in capsys.readouterr().out


def test_check_never_stores_figures_taken_under_load(table, clock, capsys):
    clock.busy = 1.0
    assert tablecmd.main(["check", "--sample", "2", "--update"]) == 0
    assert "under load: not stored" in capsys.readouterr().out
    assert all(t["baddbmm"] == 0.25e-3 for t in CostTable.read(table).entries.values())


def test_export_import_round_trip_and_reset(table, tmp_path):
    exported = tmp_path / "exported.json"
    assert tablecmd.main(["export", str(exported)]) == 0
    assert tablecmd.main(["reset"]) == 0 and not table.exists()
    assert tablecmd.main(["import", str(exported)]) == 0
    assert CostTable.read(table).entries == CostTable.read(exported).entries


def test_export_to_a_missing_folder_is_a_one_line_error(table, tmp_path):
    with pytest.raises(SystemExit, match="could not write .*No such file or directory"):
        tablecmd.main(["export", str(tmp_path / "missing" / "exported.json")])


def test_import_refuses_another_machines_table_unless_forced(table, tmp_path):
    foreign = CostTable.read(table)
    foreign.fingerprint = {**fingerprint("cpu"), "threads": fingerprint("cpu")["threads"] + 7}
    path = tmp_path / "foreign.json"
    foreign.write(path)
    with pytest.raises(SystemExit, match="would not hold here"):
        tablecmd.main(["import", str(path)])
    assert tablecmd.main(["import", "--force", str(path)]) == 0
    assert CostTable.read(table).fingerprint == fingerprint("cpu")


def test_merge_writes_every_files_entries_and_later_files_win(fake_table, tmp_path, capsys):
    first, second = fake_table(SPECS[:8], "baddbmm"), fake_table(SPECS[4:], "addmm")
    out = tmp_path / "fleet.json"
    assert tablecmd.main(["merge", str(out), str(first), str(second)]) == 0
    assert "12 entries from 2 file(s)" in capsys.readouterr().out
    merged = CostTable.read(out)
    assert merged.entries.keys() == {s.key() for s in SPECS} and merged.fingerprint == fingerprint("cpu")
    fastest = {key: min(times, key=times.get) for key, times in merged.entries.items()}
    assert [fastest[s.key()] for s in SPECS] == ["baddbmm"] * 4 + ["addmm"] * 8


def test_merge_refuses_a_file_of_another_fingerprint_unless_forced(fake_table, tmp_path):
    first, foreign = fake_table(SPECS[:6], "baddbmm"), tmp_path / "foreign.json"
    table = CostTable.read(fake_table(SPECS[6:], "baddbmm"))
    table.fingerprint = {**fingerprint("cpu"), "threads": fingerprint("cpu")["threads"] + 7}
    table.write(foreign)
    out = tmp_path / "fleet.json"
    with pytest.raises(SystemExit, match=f"{foreign} was made on .*'threads': {table.fingerprint['threads']}.*but {first} on"):
        tablecmd.main(["merge", str(out), str(first), str(foreign)])
    assert not out.exists()
    assert tablecmd.main(["merge", "--force", str(out), str(first), str(foreign)]) == 0
    merged = CostTable.read(out)
    assert len(merged.entries) == 12 and merged.fingerprint == fingerprint("cpu")


def test_merge_of_a_corrupt_file_is_a_clear_error_and_writes_nothing(fake_table, tmp_path):
    corrupt, out = tmp_path / "corrupt.json", tmp_path / "fleet.json"
    corrupt.write_text('{"version": 4, "entries": {"channel_mix|')
    with pytest.raises(SystemExit, match=f"cannot read cost table {corrupt}"):
        tablecmd.main(["merge", str(out), str(fake_table(SPECS, "baddbmm")), str(corrupt)])
    assert not out.exists()


def test_no_table_yet_says_how_to_make_one(capsys):
    assert tablecmd.main(["show"]) == 0
    assert "no table for this machine yet" in capsys.readouterr().out


def test_runs_as_python_dash_m_convrewrite_table():
    out = subprocess.run([sys.executable, "-m", "convrewrite.table", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("show", "check", "prune", "reset", "export", "import", "merge"):
        assert command in out
