"""Rank a site's legal forms with the cost table and pick one, keeping the original unless
another form is clearly faster (by ``options.margin``)."""

from __future__ import annotations

import dataclasses

from .forms import forms_for
from .measure import time_forms
from .options import Options
from .table import CostTable, user_table_path

TABLE, PREDICTED, MEASURED, NONE = "table", "predicted", "measured", "none"


@dataclasses.dataclass(frozen=True)
class Choice:
    """The decision for one site, with the figures it was made from."""

    form: str
    original: str
    times: dict[str, float]
    source: str

    @property
    def t_original(self) -> float | None:
        return self.times.get(self.original)

    @property
    def t_chosen(self) -> float | None:
        return self.times.get(self.form)

    @property
    def rewritten(self) -> bool:
        return self.form != self.original


def choose(spec, original: str, table: CostTable, options: Options) -> Choice:
    """Pick the form for ``spec``: exact table entry, else a measurement (``options.measure``),
    else the table's prediction; no figures at all keeps the original."""
    forms = [f for f in forms_for(spec) if options.forms is None or f.name in options.forms or f.name == original]
    names = [f.name for f in forms]
    times, source = table.lookup(spec), TABLE
    if times is None and options.measure:
        times, source = time_forms(spec, forms), MEASURED
        _remember(table, spec, times, forms)
    if times is None:
        times, source = table.predict(spec, names, original), PREDICTED
    times = {n: t for n, t in times.items() if n in names}
    if original not in times:
        return Choice(original, original, times, NONE)
    best = min(times, key=times.get)
    form = best if times[original] >= options.margin * times[best] else original
    return Choice(form, original, times, source)


def _remember(table: CostTable, spec, times: dict[str, float], forms) -> None:
    hashes = {f.name: f.source_hash for f in forms if f.name in times}
    table.add(spec.key(), times, hashes)
    fresh = CostTable(table.fingerprint)
    fresh.add(spec.key(), times, hashes)
    fresh.write(user_table_path(spec.device))
