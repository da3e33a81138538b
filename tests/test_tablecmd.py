"""``python -m convrewrite.table``: show, check, prune, reset, export and import, on fake tables."""

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


def test_import_refuses_another_machines_table_unless_forced(table, tmp_path):
    foreign = CostTable.read(table)
    foreign.fingerprint = {**fingerprint("cpu"), "threads": fingerprint("cpu")["threads"] + 7}
    path = tmp_path / "foreign.json"
    foreign.write(path)
    with pytest.raises(SystemExit, match="would not hold here"):
        tablecmd.main(["import", str(path)])
    assert tablecmd.main(["import", "--force", str(path)]) == 0
    assert CostTable.read(table).fingerprint == fingerprint("cpu")


def test_no_table_yet_says_how_to_make_one(capsys):
    assert tablecmd.main(["show"]) == 0
    assert "no table for this machine yet" in capsys.readouterr().out


def test_runs_as_python_dash_m_convrewrite_table():
    out = subprocess.run([sys.executable, "-m", "convrewrite.table", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("show", "check", "prune", "reset", "export", "import"):
        assert command in out
