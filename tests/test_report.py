"""Reports: the site table, and every candidate with why it won or lost."""

from convrewrite.report import Report, SiteReport


def site(path, chosen, times, note="", key="k1", original="conv"):
    return SiteReport(path, "pointwise conv", "[1,8,7x7]->16 float32", original, chosen, times.get(original),
                      times.get(chosen), "measured", note, key, times, "channel_mix")


def test_every_candidate_is_listed_with_why_it_won_or_lost():
    times = {"conv": 4e-6, "matmul": 2e-6, "baddbmm": 3e-6}
    report = Report((site("a", "matmul", times), site("b", "matmul", times)))  # a repeated layer: listed once
    lines = report.candidates().splitlines()[2:]
    assert len(lines) == 3
    assert "matmul" in lines[0] and "0.50x" in lines[0] and lines[0].endswith("chosen")
    assert "baddbmm" in lines[1] and lines[1].endswith("slower than matmul")
    assert "conv" in lines[2] and lines[2].endswith("the original, replaced")


def test_a_fastest_candidate_that_lost_says_why():
    times = {"conv": 4e-6, "matmul": 3.9e-6}
    kept = Report((site("a", "conv", times, note="kept original: the rewritten graph ran 1.20x the time"),))
    assert "fastest, but the rewritten graph ran 1.20x the time" in kept.candidates()
    close = Report((site("a", "conv", times),))
    assert "fastest, but not by the margin" in close.candidates()


def test_a_report_without_figures_says_so():
    assert Report((site("a", "conv", {}),)).candidates() == "no candidate was timed or predicted"


def test_a_site_kept_on_its_original_shows_the_originals_figure_as_the_chosen_one():
    times = {"conv": 4e-6, "matmul": 2e-6}
    (kept,) = Report((site("a", "matmul", times),)).kept_original("kept original: the check").sites
    assert (kept.chosen, kept.t_chosen, kept.predicted_speedup) == ("conv", 4e-6, 1.0)
    assert str(Report((kept,))).splitlines()[-1].split()[5:10] == ["conv", "conv", "4", "4", "1.00x"]
