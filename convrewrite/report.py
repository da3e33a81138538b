"""What the pass did at each site, and why; ``print(report)`` shows a table."""

from __future__ import annotations

import dataclasses

from tabulate import tabulate


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """One site: where it is, what it computes, what was chosen and from which figures."""

    path: str
    pattern: str
    shape: str
    original: str
    chosen: str
    t_original: float | None
    t_chosen: float | None
    source: str
    note: str = ""
    key: str = ""
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # every candidate's seconds per call
    kind: str = ""  # the spec's kind, what the site computes ("" where it has no spec)

    @property
    def predicted_speedup(self) -> float | None:
        if self.t_original and self.t_chosen:
            return self.t_original / self.t_chosen
        return None


@dataclasses.dataclass(frozen=True)
class Report:
    """Every site of one specialisation (one input signature) of a model."""

    sites: tuple[SiteReport, ...] = ()
    signature: str = ""
    note: str = ""
    ran: str = ""  # under the backend: which compiled graph runs (original or rewritten)
    under_load: bool = False  # the whole-graph check was timed while other processes used the CPU

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.chosen != s.original]

    def kept_original(self, why: str) -> "Report":
        """This report with every rewritten site back on its original, noting ``why``."""
        sites = tuple(dataclasses.replace(s, chosen=s.original, t_chosen=s.t_original, note=why)
                      if s.chosen != s.original else s for s in self.sites)
        return dataclasses.replace(self, sites=sites)

    def under(self, path: str) -> "Report":
        """This report with its sites' paths read from ``path``, a module of the one they were found in."""
        if not path:
            return self
        return dataclasses.replace(self, sites=tuple(
            dataclasses.replace(s, path=f"{path}.{s.path}" if s.path else path) for s in self.sites))

    def running(self, graph: str) -> "Report":
        """This report, saying the backend runs compiled ``graph``."""
        return dataclasses.replace(self, ran=graph)

    def noted(self, line: str) -> "Report":
        """This report with ``line`` added to its note."""
        return dataclasses.replace(self, note="\n".join(n for n in (self.note, line) if n))

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def candidates(self) -> str:
        """Every candidate form of every distinct site (repeated layers once), with its figure,
        its time relative to the original, and why it was or was not chosen."""
        rows, seen = [], set()
        for site in self:
            if not site.times or (site.key, site.original) in seen:
                continue
            seen.add((site.key, site.original))
            for name, seconds in sorted(site.times.items(), key=lambda item: item[1]):
                ratio = seconds / site.t_original if site.t_original else None
                rows.append((site.path, site.shape, name, _us(seconds), _x(ratio), _verdict(site, name)))
        cols = ("site", "shape", "candidate", "us", "vs original", "verdict")
        return tabulate(rows, cols, tablefmt="simple") if rows else "no candidate was timed or predicted"

    def __str__(self) -> str:
        head = f"convrewrite: {len(self.rewritten)} of {len(self.sites)} site(s) rewritten"
        head += f" for {self.signature}" if self.signature else ""
        head += f"; runs the {self.ran} graph" if self.ran else ""
        if self.note:
            head += f"\n{self.note}"
        if not self.sites:
            return head
        rows = [(s.path, s.pattern, s.shape, s.original, s.chosen, _us(s.t_original), _us(s.t_chosen),
                 _x(s.predicted_speedup), s.source, s.note) for s in self.sites]
        cols = ("site", "pattern", "shape", "original", "chosen", "orig us", "chosen us", "speedup", "figures", "note")
        return f"{head}\n{tabulate(rows, cols, tablefmt='simple')}"


def _verdict(site: SiteReport, name: str) -> str:
    fastest = min(site.times, key=site.times.get)
    if name == site.chosen:
        return "chosen" + (f" ({site.note})" if site.note and name == site.original else "")
    if name == site.original:
        return "the original, replaced"
    if name != fastest:
        return f"slower than {fastest}"
    return f"fastest, but {site.note.removeprefix('kept original: ')}" if site.note.startswith("kept original") \
        else "fastest, but not by the margin and the figures' noise (or not among forms=)"


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"
