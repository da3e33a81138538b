"""Rank a site's legal forms with the cost table and pick one, keeping the original unless
another form is clearly faster (by ``options.margin``)."""

from __future__ import annotations

import dataclasses

from .forms import forms_for
from .measure import time_forms
from .options import Options
from .table import CostTable, user_table_path

TABLE, PREDICTED, MEASURED, NONE = "table", "predicted", "measured", "none"
AS_WRITTEN = "as written"  # the original of a site whose source is code, not a form
AUTO_AGREEMENT = 0.7  # below this share of agreeing neighbours, measure="auto" measures


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
    """Pick the form for ``spec`` from the first figures found:

    1. an exact table entry that timed every legal form;
    2. a measurement of every legal form, if ``options.measure`` is True, or is "auto" and
       the spec kind cannot be predicted (a model's own layout chain, run eagerly);
    3. the table's prediction; with ``measure="auto"`` (the default) a prediction whose
       neighbours disagree (agreement below ``AUTO_AGREEMENT``), or no prediction at all (no
       entries for this device), is replaced by a measurement. Only eager specs are ever
       measured here: inductor figures come from ``python -m convrewrite.profile --executor
       inductor`` (compiling every candidate inside a compile is neither cheap nor safe), and
       without them the original is left to inductor.

    No figures at all keeps the original. ``options.forms`` limits what may be chosen.
    """
    forms = forms_for(spec)
    names = [f.name for f in forms]
    allowed = {original, *(names if options.forms is None else options.forms)}
    times, source = table.lookup(spec), TABLE
    if times is not None and not set(names) <= set(times):
        times = None  # a form was added since (or the entry was cut short): not an exact hit
    eager = spec.executor == "eager"  # inductor figures come from `profile --executor inductor` only
    auto = options.measure == "auto" and eager
    if times is None and ((options.measure is True and eager) or (auto and not spec.predictable)):
        times, source = _measure(table, spec, forms), MEASURED
    if times is None:
        times, source = (table.predict(spec, names, original) if spec.predictable else {}), PREDICTED
        guess = _pick(times, original, allowed, options.margin)
        if auto and (not times or table.agreement(spec, guess, original) < AUTO_AGREEMENT):
            times, source = _measure(table, spec, forms), MEASURED
    times = {n: t for n, t in times.items() if n in allowed and n in names}
    if original not in times:
        return Choice(original, original, times, NONE)
    return Choice(_pick(times, original, allowed, options.margin), original, times, source)


def against_source(choice: Choice, seconds: float, margin: float) -> Choice:
    """``choice`` (among forms) weighed against source code that took ``seconds``: the
    fastest form replaces the code if faster by ``margin``; no figures keep the code."""
    times = {**choice.times, AS_WRITTEN: seconds}
    best = min(choice.times, key=choice.times.get, default=AS_WRITTEN)
    form = best if seconds >= margin * times[best] else AS_WRITTEN
    return Choice(form, AS_WRITTEN, times, choice.source)


def _pick(times: dict[str, float], original: str, allowed: set, margin: float) -> str:
    """The fastest allowed form if it beats the original by ``margin``, else the original."""
    candidates = {n: t for n, t in times.items() if n in allowed}
    if original not in candidates:
        return original
    best = min(candidates, key=candidates.get)
    return best if candidates[original] >= margin * candidates[best] else original


def _measure(table: CostTable, spec, forms) -> dict[str, float]:
    """Time every legal form now, and remember the figures in memory and in the user table."""
    times = time_forms(spec, forms)
    _remember(table, spec, times, forms)
    return times


def _remember(table: CostTable, spec, times: dict[str, float], forms) -> None:
    hashes = {f.name: f.source_hash for f in forms if f.name in times}
    table.add(spec.key(), times, hashes)
    fresh = CostTable(table.fingerprint)
    fresh.add(spec.key(), times, hashes)
    fresh.write(user_table_path(spec.device))
