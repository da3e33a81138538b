"""Rank a site's legal forms with the cost table and pick one, keeping the original unless
another form is clearly faster (by ``options.margin``, and by more than the figures' noise).

:func:`beats` is the one comparison every decision of the package makes (sites here, whole
graphs in :mod:`convrewrite.check` and the backend).
"""

from __future__ import annotations

import collections
import dataclasses

from .forms import forms_for
from .measure import Timings, time_code, time_forms
from .options import Options
from .site import Site
from .table import CostTable

TABLE, PREDICTED, MEASURED, NONE = "table", "predicted", "measured", "none"
CONTENDED = "measured under load"  # decided from, never stored
AS_WRITTEN = "as_written"  # the original of a site whose source is code, not a form (named as the layout chain's)
AUTO_AGREEMENT = 0.7  # below this share of agreeing neighbours, measure="auto" measures
# farther than this from its nearest measured entry, a prediction extrapolates (one categorical
# mismatch is 3.0; SqueezeBERT's [1,768,128] convs, 3.3-5 away, were predicted 3-10x too slow)
AUTO_REACH = 3.0
NOISE_SIGMAS = 2.0  # a win must exceed this many times the figures' combined relative noise


def beats(candidate_s: float, original_s: float, margin: float, noise: float = 0.0, slack_s: float = 0.0) -> bool:
    """Whether a candidate taking ``candidate_s`` clearly beats an original taking
    ``original_s``: faster by the factor ``margin``, by ``NOISE_SIGMAS`` times ``noise`` (the
    two figures' combined relative uncertainty) and by ``slack_s`` seconds. Ties, and wins
    inside the noise, keep the original."""
    factor = max(margin, 1.0 + NOISE_SIGMAS * noise)
    return candidate_s * factor + slack_s < original_s


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
       neighbours disagree (agreement below ``AUTO_AGREEMENT``), that extrapolates (no entry
       measured here within ``AUTO_REACH``), that rests on other machines' figures alone (the
       shipped table on another CPU), or no prediction at all, is replaced
       by a measurement. Only eager specs are ever
       measured here: inductor figures come from ``python -m convrewrite.profile --executor
       inductor`` (compiling every candidate inside a compile is neither cheap nor safe), and
       without them the original is left to inductor.

    No figures at all keeps the original. ``options.forms`` limits what may be chosen. A
    measurement taken under load decides (its noise widening the margin) but is not stored.
    """
    forms = forms_for(spec)
    names = [f.name for f in forms]
    allowed = {original, *(names if options.forms is None else options.forms)}
    times, source = table.lookup(spec), TABLE
    if times is not None and not set(names) <= set(times):
        times = None  # a form was added since (or the entry was cut short): not an exact hit
    eager = spec.executor == "eager"  # inductor figures come from `profile --executor inductor` only
    auto = options.measure == "auto" and eager
    noise = 0.0
    if times is None and ((options.measure is True and eager) or (auto and not spec.predictable)):
        times, source = _measure(table, spec, forms), MEASURED
    if times is None:
        times, source = (table.predict(spec, names, original) if spec.predictable else {}), PREDICTED
        guess = _pick(times, original, allowed, options.margin)
        if auto and (not times or table.agreement(spec, guess, original) < AUTO_AGREEMENT
                     or table.reach(spec, original) > AUTO_REACH
                     or table.own_share(spec, original) == 0.0):  # another machine's figures alone
            times, source = _measure(table, spec, forms), MEASURED
    if isinstance(times, Timings):
        source = CONTENDED if times.contended else source
        noise = times.noise
    times = {n: t for n, t in times.items() if n in allowed and n in names}
    if original not in times:
        return Choice(original, original, times, NONE)
    return Choice(_pick(times, original, allowed, options.margin, noise), original, times, source)


RETIME_BELOW = 0.2  # seconds: code faster than this on its (cold) first call is timed again
SOURCES_KEPT = 256  # code timings remembered, the least recently used dropped first
_source_seconds: collections.OrderedDict = collections.OrderedDict()


def source_seconds(site: Site) -> float | None:
    """Seconds per call of the code a site replaces: its first call's figure where that is too
    long to be mostly warm-up, else timed now (once per ``site.source_key``)."""
    if site.source_runner is None or (site.source_seconds or 0.0) >= RETIME_BELOW:
        return site.source_seconds
    key = site.source_key
    if key not in _source_seconds:
        with site.source_runner() as run:
            _source_seconds[key] = time_code(run)
        if len(_source_seconds) > SOURCES_KEPT:
            _source_seconds.popitem(last=False)
    _source_seconds.move_to_end(key)
    return _source_seconds[key]


def against_source(choice: Choice, seconds: float, margin: float) -> Choice:
    """``choice`` (among forms) weighed against source code that took ``seconds``: the
    fastest form replaces the code if faster by ``margin``; no figures keep the code."""
    times = {**choice.times, AS_WRITTEN: seconds}
    best = min(choice.times, key=choice.times.get, default=AS_WRITTEN)
    form = best if best != AS_WRITTEN and beats(times[best], seconds, margin) else AS_WRITTEN
    return Choice(form, AS_WRITTEN, times, choice.source)


def _pick(times: dict[str, float], original: str, allowed: set, margin: float, noise: float = 0.0) -> str:
    """The fastest allowed form if it :func:`beats` the original, else the original."""
    candidates = {n: t for n, t in times.items() if n in allowed}
    if original not in candidates:
        return original
    best = min(candidates, key=candidates.get)
    return best if beats(candidates[best], candidates[original], margin, noise) else original


def _measure(table: CostTable, spec, forms) -> Timings:
    """Time every legal form now; remember clean figures in memory and in the user table
    (figures taken under load decide this site only: a later specialisation measures again)."""
    times = time_forms(spec, forms)
    if times.storable:
        _remember(table, spec, times, forms)
    return times


def _remember(table: CostTable, spec, times: Timings, forms) -> None:
    hashes = {f.name: f.source_hash for f in forms if f.name in times}
    table.remember(spec.key(), dict(times), hashes, times.record())
