"""The rewrite pass: annotated graph -> sites -> specs -> choices -> verified emits -> report.

``rewrite(gm, options)`` mutates ``gm`` (annotated by ``capture.annotate`` or carrying the
same meta) and returns a :class:`Report`. It is the one pass behind every front door.
"""

from __future__ import annotations

import dataclasses
import logging

import torch.fx as fx

from . import progress
from .decide import AS_WRITTEN, NONE, Choice, against_source, choose, source_seconds
from .emit import emit, keep_output_strides, verify
from .forms import get_form
from .options import Options
from .report import Report, SiteReport
from .rules import rules
from .site import Site
from .table import table_for

log = logging.getLogger(__name__)
PROGRESS_AFTER_S = 2.0  # a first call that decides for longer than this shows a bar


def rewrite(gm: fx.GraphModule, options: Options, executor: str = "eager", decided: Report | None = None) -> Report:
    """Rewrite every site of ``gm`` whose best form beats its original by ``options.margin``
    when the graph is run by ``executor`` ("eager", or "inductor" for the dynamo backend).
    With ``decided`` (another process's report of the same graph), each site takes the form
    chosen there, and nothing is timed here."""
    rows, replaced, choices = [], {}, {}
    taken = None if decided is None else {(s.key, s.original): _as_choice(s) for s in decided if s.key}
    with progress.bar(desc="convrewrite: choosing forms", unit="site", delay=PROGRESS_AFTER_S,
                      enabled=options.progress) as bar:
        for rule in rules():
            sites = list(rule(gm))  # each rule sees the graph the rules before it left
            bar.total = (bar.total or 0) + len(sites)
            for site in sites:
                rows.append(_decided(gm, site, f"convrewrite_site{len(rows)}", options, executor, replaced,
                                     choices, taken))
                bar.update()
    if executor == "eager" and any(r.chosen != r.original for r in rows):
        keep_output_strides(gm)
    gm.graph.lint()
    gm.recompile()
    log.info("convrewrite: rewrote %d of %d site(s)", sum(r.chosen != r.original for r in rows), len(rows))
    return Report(tuple(rows))


def _decided(gm: fx.GraphModule, site: Site, name: str, options: Options, executor: str, replaced: dict,
             choices: dict, taken: dict | None) -> SiteReport:
    """The report of ``site``, rewritten in ``gm`` if a form wins."""
    if site.spec is None:
        return SiteReport(site.path, site.pattern, "-", AS_WRITTEN, AS_WRITTEN, site.source_seconds, None, NONE,
                          site.note)
    if site.spec.device == "meta":  # no data: nothing can be timed or verified
        return SiteReport(site.path, site.pattern, _shape(site.spec), site.original, site.original, None, None,
                          NONE, "meta tensors: nothing to time or verify", kind=site.spec.kind)
    # a lifted loop becomes one conv op, which inductor runs as an extern kernel: its
    # forms are timed eagerly, as the code they replace was
    run_by = "eager" if site.from_code else executor
    site = dataclasses.replace(_follow(site, replaced), spec=dataclasses.replace(site.spec, executor=run_by))
    return _rewrite_site(gm, site, name, options, replaced, _choice(site, options, choices, taken))


def _shape(spec) -> str:
    """A site's shape for its report, with the mode its figures are for (infer, train, or
    train-w: gradients to the parameters only): a training step's figures are several times
    an inference call's."""
    return f"{spec.describe()} {spec.mode}"


def _follow(site: Site, replaced: dict) -> Site:
    """``site`` with inputs that earlier rewrites replaced pointing at their replacements."""
    get = lambda v: replaced.get(v, v) if isinstance(v, fx.Node) else v  # noqa: E731
    return dataclasses.replace(site, x=get(site.x), params=tuple(get(p) for p in site.params))


def _rewrite_site(gm: fx.GraphModule, site: Site, name: str, options: Options, replaced: dict,
                  choice: Choice) -> SiteReport:
    chosen, note = choice.form, "no figures for this spec" if choice.source == NONE else ""
    if choice.rewritten:
        note = site.note
        form = get_form(site.spec.kind, chosen)
        problem = verify(form, get_form(site.spec.kind, site.original), site.spec) if options.verify else None
        if problem:
            chosen, note = choice.original, f"kept original: {problem}"
        else:
            replaced[site.node] = emit(gm, site, form, name)
    return SiteReport(site.path, site.pattern, _shape(site.spec), choice.original, chosen,
                      choice.t_original, choice.times.get(chosen), choice.source, note, site.spec.key(),
                      dict(choice.times), site.spec.kind)


def _choice(site: Site, options: Options, choices: dict, taken: dict | None) -> Choice:
    """The site's decision: one per spec and original (repeated layers share it), weighed
    against the code's own time where the source is code; or, with ``taken`` (another
    process's decisions, keyed by spec key and the original it reported), the one taken there."""
    if taken is not None:
        original = AS_WRITTEN if site.from_code else site.original
        return taken.get((site.spec.key(), original)) or Choice(original, original, {}, NONE)
    key = (site.spec.key(), site.original)
    if key not in choices:
        choices[key] = choose(site.spec, site.original, table_for(site.spec.device, options), options)
    return against_source(choices[key], source_seconds(site), options.margin) if site.from_code else choices[key]


def _as_choice(row: SiteReport) -> Choice:
    """The decision another process reported for a site."""
    return Choice(row.chosen, row.original, dict(row.times), row.source)
