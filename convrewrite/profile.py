"""``python -m convrewrite.profile``: rebuild this machine's cost table from microbenchmarks.

Every registered form is timed on the seeded random grid of each kind that has one (the
channel mix's: see :mod:`convrewrite.kinds.channel_mix.grid`), and the
table is written atomically to this machine's cache file (or ``--out``). A tabulate summary
of which form wins where ends the run. ``--plot PATH`` also times a regular grid of shapes
and draws the crossover map (``convrewrite.kinds.channel_mix.crossover``) as a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from collections import Counter, defaultdict

import torch
import torch._dynamo
from tabulate import tabulate

from .device import DEVICE_TYPES, device_type
from .forms import forms_for
from .kinds import get_kind, kinds, parse_key
from .kinds.channel_mix import crossover
from .measure import Timings, time_forms
from .progress import bar
from .table import CostTable, fingerprint, user_table_path

MODES = ("infer", "train", "train-w")
ROUNDS, ROUNDS_QUICK, BLOCK_S = 15, 7, 0.001
RETRIES = 2  # a spec measured under load is measured again this many times before it is left out


def build(specs: list, table: CostTable, rounds: int, block_s: float, progress=True,
          checkpoint=None, every: int = 50) -> list:
    """Time every legal form of every spec into ``table``, with a progress bar on stderr;
    ``checkpoint(table)`` is called every ``every`` specs, so an interrupted run keeps its work.
    A spec whose figures stay contended after ``RETRIES`` more tries is left out (figures
    taken under load are never stored); those specs are returned."""
    contended = []
    with bar(total=len(specs), desc="timing forms", unit="spec", enabled=progress) as bar_:
        for i, spec in enumerate(specs, 1):
            forms = forms_for(spec)
            times = _clean_times(spec, forms, rounds, block_s)
            if times is None:
                contended.append(spec)
            else:
                table.add(spec.key(), dict(times), {f.name: f.source_hash for f in forms if f.name in times},
                          times.record())
            bar_.update(1)
            if checkpoint is not None and i % every == 0 and i < len(specs):
                checkpoint(table)
    return contended


def _clean_times(spec, forms, rounds: int, block_s: float) -> Timings | None:
    """The forms' timings, measured again (up to ``RETRIES`` times) while contended; None if
    they never came out clean."""
    for _ in range(1 + RETRIES):
        if spec.executor == "inductor":
            torch._dynamo.reset()  # each spec compiles every form afresh (dynamo caches per code object)
        times = time_forms(spec, forms, rounds=rounds, block_s=block_s)
        if times.storable:
            return times
    return None


def summary(table: CostTable) -> str:
    """Which form wins where: per kind and bucket of its grid (dims, input layout, mode, size
    for a channel mix), wins, and the median and 90th percentile of the fastest form's speedup
    over the original. Both percentiles take the lower of two neighbouring values, so one
    figure a noisy moment inflated (a "499x") never sets either column where a bucket holds
    two specs or more."""
    groups, headers = defaultdict(list), ()
    for key, times in table.entries.items():
        spec = parse_key(key)
        kind = None if spec is None else get_kind(spec.kind)
        if kind is None or kind.grid is None or kind.original not in times:
            continue
        bucket = kind.grid.bucket(spec)
        headers = tuple(bucket)
        best = min(times, key=times.get)
        groups[(kind.name, *bucket.values())].append((best, times[kind.original] / times[best]))
    rows = []
    for group, entries in sorted(groups.items()):
        wins = Counter(best for best, _ in entries)
        median, p90 = torch.quantile(torch.tensor([speedup for _, speedup in entries], dtype=torch.float64),
                                     torch.tensor([0.5, 0.9], dtype=torch.float64), interpolation="lower").tolist()
        rows.append((*group, len(entries), ", ".join(f"{n} {c}" for n, c in wins.most_common()),
                     f"{median:.2f}x", f"{p90:.2f}x"))
    return tabulate(rows, ("kind", *headers, "specs", "fastest form (count)", "median best/original", "90th percentile"))


def _dtype_name(name: str, parser: argparse.ArgumentParser) -> str:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        parser.error(f"--dtype: {name!r} is not a torch float dtype (float32, float64, bfloat16, float16)")
    return str(dtype).removeprefix("torch.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convrewrite.profile",
        description="Rebuild this machine's convrewrite cost table: time every registered form of the "
                    "channel mix on a seeded random grid of pointwise-conv shapes, and write the table "
                    "atomically to the user cache dir (or --out). optimize() reads it from there.")
    parser.add_argument("--device", default="cpu", choices=DEVICE_TYPES, help="device to profile (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="comma-separated float dtypes, e.g. float32,bfloat16 (default: float32)")
    parser.add_argument("--mode", default="infer,train,train-w",
                        help="comma-separated modes (default: infer,train,train-w): train times forward + "
                             "backward to input and parameters, train-w backward to parameters only (a first layer)")
    parser.add_argument("--executor", default="eager", choices=("eager", "inductor"),
                        help="time the forms as they run eagerly (default), or compiled by torch.compile's inductor "
                             "(the figures the convrewrite backend decides with)")
    parser.add_argument("--quick", action="store_true", help="a small grid and short timings (about 13 s on 2 CPU cores; longer while "
                             "other processes keep the machine busy: specs timed under load are timed again)")
    parser.add_argument("--specs", type=int, default=None, help="random specs per dtype and mode (default 500, about 5 min on 2 "
                             "CPU cores for the default dtype and modes; 20 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shape grid (default 0)")
    parser.add_argument("--plot", metavar="PNG", default=None,
                        help="also time a regular (channels, size) grid and draw which form wins where, as a PNG "
                             "(needs matplotlib: pip install 'convrewrite[plot]'); --specs 0 times that grid only")
    parser.add_argument("--out", default=None, help=f"table file to write (default: {user_table_path('cpu').parent}/<device>-<fingerprint>.json)")
    args = parser.parse_args(argv)
    if not device_type(args.device).available():
        parser.error(f"--device {args.device}: not available here")
    modes = [m.strip() for m in args.mode.split(",")]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--mode: expected a comma-separated subset of {','.join(MODES)}, got {args.mode!r}")
    dtypes = [_dtype_name(d.strip(), parser) for d in args.dtype.split(",")]
    if args.plot:
        _require_matplotlib(parser)
    n = args.specs if args.specs is not None else (20 if args.quick else 500)
    if n < 0 or n == 0 and not args.plot:
        parser.error(f"--specs: expected a positive number (0 only with --plot), got {n}")
    rng = random.Random(args.seed)
    specs = [dataclasses.replace(kind.grid.random_spec(rng, args.device, dtype, mode, realistic=i % 2 == 0),
                                 executor=args.executor)
             for kind in kinds() if kind.grid for dtype in dtypes for mode in modes for i in range(n)]
    out = args.out or user_table_path(args.device)
    table = CostTable(fingerprint(args.device))
    start = time.perf_counter()
    contended = build(specs, table, rounds=ROUNDS_QUICK if args.quick else ROUNDS, block_s=BLOCK_S,
                      checkpoint=lambda partial: partial.write(out))
    table.profiled = not args.quick and n > 0  # only a finished run of the random grid may stand alone
    if args.plot:
        _plot(args, dtypes[0], table)
    print(summary(table))
    if not table.write(out):
        return 1
    print(f"\n{len(table.entries)} specs timed in {time.perf_counter() - start:.0f} s; table written to {out}")
    if contended:
        print(f"{len(contended)} spec(s) left out: other processes kept the machine busy while they were "
              "timed (figures taken under load are never stored); run the profile again on a quiet machine")
    return 0


def _require_matplotlib(parser: argparse.ArgumentParser) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("--plot needs matplotlib: pip install 'convrewrite[plot]' (or pip install matplotlib)")


def _plot(args, dtype: str, table: CostTable) -> None:
    """Time the crossover grid into ``table`` and draw it to ``args.plot``."""
    specs = [dataclasses.replace(s, executor=args.executor) for s in crossover.grid(args.device, dtype)]
    build(specs, table, rounds=ROUNDS_QUICK if args.quick else ROUNDS, block_s=BLOCK_S)
    path = crossover.draw(crossover.cells(specs, table.entries), args.plot, crossover.title(table.fingerprint, dtype))
    print(f"crossover map: {path}")


if __name__ == "__main__":
    sys.exit(main())
