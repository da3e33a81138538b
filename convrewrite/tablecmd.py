"""``python -m convrewrite.table``: see, check, prune, reset, export and import this machine's cost table, and merge tables.

    python -m convrewrite.table show              # entries, winners, how and when measured, flags
    python -m convrewrite.table check --sample 20 # re-time a sample; did levels or rankings move? (--update)
    python -m convrewrite.table prune             # drop figures their neighbours contradict
    python -m convrewrite.table reset             # delete this machine's table
    python -m convrewrite.table export FILE       # copy it, e.g. to ship to identical machines
    python -m convrewrite.table import FILE       # merge a table made on a machine like this one
    python -m convrewrite.table merge OUT FILE... # merge tables of identical machines into OUT

The table is the user cache dir's file for this machine's fingerprint (see
:mod:`convrewrite.table`); ``import`` refuses a file whose fingerprint differs (another CPU,
thread count or torch version: its figures would not hold here) unless ``--force``.
``merge`` reads no table of this machine: it writes the entries of the FILEs to OUT (replacing
OUT; name OUT among the FILEs to keep what it holds), later FILEs winning where two hold the
same spec, and refuses a FILE whose fingerprint differs from the first FILE's unless ``--force``.
"""

from __future__ import annotations

import argparse
import copy
import random
import shutil
import statistics
import sys
from pathlib import Path

from tabulate import tabulate

from .device import device_type
from .forms import forms_for
from .kinds import get_kind, parse_key
from .measure import time_forms
from .table import GRAPH_KEY, CostTable, TableError, fingerprint, heal, user_table_path

DRIFT = 1.25  # an entry whose figures moved by more than this (either way) is reported
MARGIN = 1.1  # a stored fastest form this much behind the fastest now: its ranking changed


def _read(path: Path) -> CostTable:
    try:
        return CostTable.read(path)
    except TableError as e:
        sys.exit(f"convrewrite.table: {e}")


def _original(key: str, spec) -> str | None:
    if key.startswith(f"{GRAPH_KEY}|"):
        return "original"  # the graph as dynamo gave it
    return None if spec is None else get_kind(spec.kind).original


def show(path: Path, limit: int) -> str:
    """The table's entries: the spec, the fastest form and its speedup over the original, how
    and when the figures were measured, and a flag where the neighbours contradict a figure."""
    table = _read(path)
    suspicious = {key for key, _ in heal(copy.deepcopy(table))}
    rows = []
    for key, times in list(table.entries.items())[:limit]:
        spec, meta = parse_key(key), table.meta.get(key, {})
        best, original = min(times, key=times.get), _original(key, spec)
        speedup = times[original] / times[best] if original in times else None
        mode = f"{spec.mode} {spec.executor}" if spec else "compiled" if original else "-"
        rows.append((spec.describe() if spec else key, mode, best,
                     f"{speedup:.2f}x" if speedup else "-", meta.get("when", "-"), meta.get("blocks", "-"),
                     meta.get("busy", "-"), "contradicted by neighbours" if key in suspicious else ""))
    head = (f"{path}\nfingerprint: {table.fingerprint}\n{len(table.entries)} entries"
            f"{f' (first {limit} shown)' if len(table.entries) > limit else ''}, "
            f"{len(suspicious)} contradicted by their neighbours (`prune` drops them)")
    cols = ("spec", "mode", "fastest", "vs original", "measured", "blocks", "other load (cores)", "flag")
    return f"{head}\n\n{tabulate(rows, cols)}"


def check(path: Path, sample: int, seed: int, update: bool) -> str:
    """Re-time a random sample of entries (of predictable kinds: the channel mix) and report, for each, how far its level
    moved (the median over forms of stored / now) and whether its ranking did (the stored
    fastest form now more than ``MARGIN`` behind the fastest); ``update`` stores the new
    figures (clean ones only)."""
    table = _read(path)
    specs = {k: spec for k in table.entries if (spec := parse_key(k)) is not None and spec.executor == "eager"}
    rows, fresh = [], CostTable(table.fingerprint)
    for key in random.Random(seed).sample(sorted(specs), min(sample, len(specs))):
        spec, stored = specs[key], table.entries[key]
        forms = [f for f in forms_for(spec) if f.name in stored]
        now = time_forms(spec, forms)
        level = statistics.median(stored[n] / now[n] for n in now)
        then_best, now_best = min(now, key=stored.get), min(now, key=now.get)
        reranked = now[then_best] > MARGIN * now[now_best]
        note = "under load: not stored" if now.contended else ", ".join(
            w for w, bad in (("level moved", max(level, 1 / level) > DRIFT), ("ranking changed", reranked)) if bad)
        rows.append((spec.describe(), spec.mode, f"{level:.2f}", then_best, now_best, note))
        if update and now.storable:
            fresh.add(key, dict(now), {f.name: f.source_hash for f in forms if f.name in now}, now.record())
    if update and fresh.entries:
        fresh.write(path)
    moved, reranked = (sum(word in r[5] for r in rows) for word in ("level", "ranking"))
    head = (f"{len(rows)} of {len(table.entries)} entries re-timed: {moved} moved by more than {DRIFT}x, "
            f"{reranked} changed their fastest form by more than {MARGIN}x"
            f"{f'; {len(fresh.entries)} updated' if update else ''}. Decisions rest on the ranking within an "
            "entry; its level moves with the process and the machine's state.")
    cols = ("spec", "mode", "stored / now (median)", "fastest stored", "fastest now", "note")
    return f"{head}\n\n{tabulate(rows, cols)}"


def prune(path: Path) -> str:
    """Drop the figures :func:`convrewrite.table.heal` finds contradicted, on disk."""
    table = _read(path)
    dropped = heal(table)
    if dropped:
        table.write(path, merge=False)
    return f"{len(dropped)} figure(s) dropped from {path}"


def import_table(source: Path, path: Path, force: bool) -> str:
    """Merge the table at ``source`` into this machine's (its entries win where both have one)."""
    table = _read(source)
    here = fingerprint(table.fingerprint.get("device", "cpu"))
    if table.fingerprint != here and not force:
        sys.exit(f"convrewrite.table: {source} was made on {table.fingerprint}, this machine is {here}; its figures "
                 "would not hold here (--force imports it anyway, as this machine's)")
    table.fingerprint = here
    table.write(path)
    return f"{len(table.entries)} entries merged into {path}"


def merge(out: Path, sources: list[Path], force: bool) -> str:
    """Write the tables at ``sources`` merged to ``out`` (atomically, replacing it): later files
    win where two hold the same key; each must carry the first one's fingerprint unless
    ``force``. Every file is read before anything is written, so a bad one leaves ``out`` as it was."""
    tables = [_read(source) for source in sources]
    merged = tables[0]
    for source, table in zip(sources[1:], tables[1:]):
        if table.fingerprint != merged.fingerprint and not force:
            sys.exit(f"convrewrite.table: {source} was made on {table.fingerprint}, but {sources[0]} on "
                     f"{merged.fingerprint}; their figures do not describe the same machine (--force merges it "
                     "anyway, under the first file's fingerprint)")
        merged = merged.merged_with(table)
    if not merged.write(out, merge=False):
        sys.exit(f"convrewrite.table: could not write {out}")
    return f"{len(merged.entries)} entries from {len(sources)} file(s) written to {out}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convrewrite.table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="whose table (default: cpu)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="entries, winners, how and when measured").add_argument(
        "--limit", type=int, default=50, help="entries shown (default 50)")
    check_args = commands.add_parser("check", help="re-time a sample of entries and report drift")
    check_args.add_argument("--sample", type=int, default=20)
    check_args.add_argument("--seed", type=int, default=0)
    check_args.add_argument("--update", action="store_true", help="store the new clean figures")
    commands.add_parser("prune", help="drop figures their neighbours contradict")
    commands.add_parser("reset", help="delete this machine's table")
    commands.add_parser("export", help="copy this machine's table to FILE").add_argument("file", type=Path)
    import_args = commands.add_parser("import", help="merge FILE (made on a machine like this) into this machine's table")
    import_args.add_argument("file", type=Path)
    import_args.add_argument("--force", action="store_true", help="import a table made on another fingerprint")
    merge_args = commands.add_parser(
        "merge", help="merge table FILEs of identical machines into OUT (later FILEs win on the same spec)",
        description="Merge table FILEs (e.g. exported from identical machines) into OUT, replacing OUT. Where two "
                    "FILEs hold figures of the same spec, the later FILE's win. Every FILE must carry the first "
                    "FILE's device fingerprint unless --force.")
    merge_args.add_argument("out", type=Path, metavar="OUT")
    merge_args.add_argument("files", type=Path, nargs="+", metavar="FILE")
    merge_args.add_argument("--force", action="store_true", help="merge FILEs made on another fingerprint too")
    args = parser.parse_args(argv)
    try:
        available = device_type(args.device).available()
    except (ValueError, RuntimeError) as e:  # not a device type torch or convrewrite knows
        parser.error(f"--device {args.device}: {e}")
    if not available:
        parser.error(f"--device {args.device}: not available here")
    path = user_table_path(args.device)
    if args.command == "import":
        print(import_table(args.file, path, args.force))
        return 0
    if args.command == "merge":
        print(merge(args.out, args.files, args.force))
        return 0
    if not path.exists():
        print(f"no table for this machine yet ({path}): optimize() and `python -m convrewrite.profile` make one")
        return 0 if args.command in ("show", "reset") else 1
    if args.command == "show":
        print(show(path, args.limit))
    elif args.command == "check":
        print(check(path, args.sample, args.seed, args.update))
    elif args.command == "prune":
        print(prune(path))
    elif args.command == "reset":
        path.unlink()
        print(f"deleted {path}")
    elif args.command == "export":
        try:
            shutil.copyfile(path, args.file)
        except OSError as e:
            sys.exit(f"convrewrite.table: could not write {args.file}: {e.strerror}")
        print(f"{path} -> {args.file}")
    return 0
