"""The crossover map: its grid, its cells, and what each drawn cell shows (fake figures)."""

import math

import pytest

from convrewrite import profile
from convrewrite.kinds.channel_mix import crossover
from convrewrite.kinds.channel_mix.forms import ORIGINAL
from convrewrite.table import CostTable

matplotlib = pytest.importorskip("matplotlib")  # the [plot] extra; the dev extra installs it


def test_grid_covers_four_panels_within_the_work_cap():
    specs = crossover.grid()
    panels = {(s.ndim, s.mode) for s in specs}
    assert panels == {(1, "infer"), (1, "train"), (2, "infer"), (2, "train")}
    for s in specs:
        assert s.in_channels == s.out_channels and s.batch == crossover.BATCH and s.groups == 1
        assert s.batch * math.prod(s.spatial) * s.in_channels ** 2 <= crossover.MAX_MACS
    assert len({s.key() for s in specs}) == len(specs)


def test_cells_read_the_table_and_skip_untimed_specs():
    a, b = crossover.grid()[:2]
    cells = crossover.cells([a, b], {a.key(): {ORIGINAL: 2.0, "addmm": 1.0}})
    assert cells == [{"ndim": a.ndim, "mode": a.mode, "channels": a.in_channels, "size": a.spatial[0],
                      "times": {ORIGINAL: 2.0, "addmm": 1.0}}]


def _cell(channels, size, times, ndim=1, mode="infer"):
    return {"ndim": ndim, "mode": mode, "channels": channels, "size": size, "times": times}


def test_each_cell_is_coloured_by_its_fastest_form_and_labelled_with_its_speedup():
    import matplotlib.pyplot as plt

    colours = {ORIGINAL: "red", "addmm": "blue", "baddbmm": "green"}
    cells = [_cell(8, 16, {ORIGINAL: 3.0, "addmm": 1.0, "baddbmm": 2.0}),
             _cell(64, 16, {ORIGINAL: 1.0, "addmm": 1.5, "baddbmm": 2.0}),
             _cell(8, 128, {ORIGINAL: 4.0, "addmm": 3.0, "baddbmm": 1.0})]
    fig, ax = plt.subplots()
    crossover._panel(ax, cells, 1, "infer", colours)
    drawn = {(p.get_x() + 0.5, p.get_y() + 0.5): p.get_facecolor() for p in ax.patches}
    to_rgba = matplotlib.colors.to_rgba
    assert drawn == {(0, 0): to_rgba("blue"), (1, 0): to_rgba("red"), (0, 1): to_rgba("green")}
    assert sorted(t.get_text() for t in ax.texts) == ["1.0x", "3.0x", "4.0x"]
    plt.close(fig)


def test_draw_writes_a_png(tmp_path):
    cells = [_cell(8, 16, {ORIGINAL: 3.0, "addmm": 1.0}, ndim, mode) for ndim in (1, 2) for mode in crossover.MODES]
    path = crossover.draw(cells, tmp_path / "map.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_plot_times_the_grid_into_the_table(tmp_path, monkeypatch):
    small = crossover.grid()[:2]
    monkeypatch.setattr(crossover, "grid", lambda device, dtype: small)
    out, png = tmp_path / "t.json", tmp_path / "map.png"
    assert profile.main(["--specs", "0", "--plot", str(png), "--out", str(out)]) == 0
    table = CostTable.read(out)
    assert set(table.entries) == {s.key() for s in small} and not table.profiled  # the shipped table still counts
    assert png.stat().st_size > 0


def test_profile_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        profile.main(["--quick", "--specs", "0", "--plot", str(tmp_path / "m.png")])
    assert "convrewrite[plot]" in capsys.readouterr().err
