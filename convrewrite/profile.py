"""``python -m convrewrite.profile``: rebuild this machine's cost table from microbenchmarks.

Every registered form is timed on a seeded random grid of channel-mix specs (1D/2D/3D,
batch, channels, spatial size, groups, stride, input layout, inference and training; half of
them with sizes rounded the way models are written), and the
table is written atomically to this machine's cache file (or ``--out``). A tabulate summary
of which form wins where ends the run. ``--plot PATH`` also times a regular grid of shapes
and draws the crossover map (``convrewrite.crossover``) as a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from collections import Counter, defaultdict

import torch
import torch._dynamo
from tabulate import tabulate

from . import crossover
from .forms import forms_for
from .forms.channel_mix import ORIGINAL, channels_last_backward_may_crash, conv
from .measure import Timings, time_forms
from .spec import CHANNELS_FIRST, CHANNELS_LAST, STRIDED, ChannelMixSpec, layout_of
from .table import CostTable, fingerprint, user_table_path

MODES = ("infer", "train", "train-w")
MAX_MACS = 1e8  # keeps every timed call within milliseconds on a small CPU
ROUNDS, ROUNDS_QUICK, BLOCK_S = 15, 7, 0.001
RETRIES = 2  # a spec measured under load is measured again this many times before it is left out


def _log_uniform(rng: random.Random, lo: float, hi: float) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def random_spec(rng: random.Random, device="cpu", dtype="float32", mode="infer", realistic=False) -> ChannelMixSpec:
    """One random pointwise-conv spec, its work capped by MAX_MACS.

    Sizes are log-uniform integers; ``realistic`` rounds them the way models are written
    (channels to multiples of 8, batch to a power of two, square images, lengths to
    multiples of 8). ``mode``: infer, train or train-w (see ``ChannelMixSpec.mode``).
    """
    grad = mode != "infer"
    while True:
        ndim = rng.choices((1, 2, 3), (0.45, 0.45, 0.1))[0]
        side_max = {1: 16384, 2: 128, 3: 24}[ndim]
        sides = [_log_uniform(rng, 1, side_max) for _ in range(1 if realistic and ndim > 1 else ndim)]
        cin, cout, batch = _log_uniform(rng, 3, 1024), _log_uniform(rng, 3, 1024), _log_uniform(rng, 1, 128)
        if realistic:
            cin, cout = (_multiple(c, 8) for c in (cin, cout))
            batch = 2 ** round(math.log2(batch))
            sides = [_multiple(s, 8) if ndim == 1 else s for s in sides] * (ndim if ndim > 1 else 1)
        groups = 1
        if rng.random() < 0.15:
            groups = rng.choice([g for g in (2, 4, 8, math.gcd(cin, cout)) if cin % g == 0 and cout % g == 0])
        stride = (2,) * ndim if rng.random() < 0.1 and min(sides) > 1 else (1,) * ndim
        in_layout = rng.choices((CHANNELS_FIRST, CHANNELS_LAST, STRIDED), (0.7, 0.25, 0.05))[0]
        spec = ChannelMixSpec(batch, cin, cout, tuple(sides), groups, stride, bias=rng.random() < 0.8,
                              dtype=dtype, device=device, in_layout=in_layout, grad=grad, input_grad=mode != "train-w")
        macs = spec.batch * math.prod(spec.out_spatial) * cin * cout / groups
        crashes = in_layout == CHANNELS_LAST and spec.ndim > 1 and channels_last_backward_may_crash(spec)
        if macs <= MAX_MACS * (0.3 if grad else 1.0) and not crashes:
            return with_out_layout(spec)


def _multiple(v: int, m: int) -> int:
    return max(m, m * round(v / m)) if v >= m else v


def with_out_layout(spec: ChannelMixSpec) -> ChannelMixSpec:
    """``spec`` with ``out_layout`` set to what the original conv returns for its input layout."""
    x, w, b = spec.example_inputs()
    with torch.no_grad():
        out = conv(x, w, b, spec=spec)
    return ChannelMixSpec(**{**spec.__dict__, "out_layout": layout_of(out)})


def build(specs: list[ChannelMixSpec], table: CostTable, rounds: int, block_s: float, progress=True,
          checkpoint=None, every: int = 50) -> list[ChannelMixSpec]:
    """Time every legal form of every spec into ``table``, with a progress bar on stderr;
    ``checkpoint(table)`` is called every ``every`` specs, so an interrupted run keeps its work.
    A spec whose figures stay contended after ``RETRIES`` more tries is left out (figures
    taken under load are never stored); those specs are returned."""
    from torch.hub import tqdm  # tqdm if installed, else torch's own minimal bar

    contended = []
    with tqdm(total=len(specs), disable=not progress, unit="spec", file=sys.stderr) as bar:
        for i, spec in enumerate(specs, 1):
            forms = forms_for(spec)
            times = _clean_times(spec, forms, rounds, block_s)
            if times is None:
                contended.append(spec)
            else:
                table.add(spec.key(), dict(times), {f.name: f.source_hash for f in forms if f.name in times},
                          times.record())
            bar.update(1)
            if checkpoint is not None and i % every == 0 and i < len(specs):
                checkpoint(table)
    return contended


def _clean_times(spec: ChannelMixSpec, forms, rounds: int, block_s: float) -> Timings | None:
    """The forms' timings, measured again (up to ``RETRIES`` times) while contended; None if
    they never came out clean."""
    for _ in range(1 + RETRIES):
        if spec.executor == "inductor":
            torch._dynamo.reset()  # each spec compiles every form afresh (dynamo caches per code object)
        times = time_forms(spec, forms, rounds=rounds, block_s=block_s)
        if not times.contended:
            return times
    return None


def summary(table: CostTable) -> str:
    """Which form wins where: per (dims, input layout, mode, size bin), wins and best speedup."""
    groups = defaultdict(list)
    for key, times in table.entries.items():
        spec = ChannelMixSpec.from_key(key)
        if ORIGINAL not in times:
            continue
        size = math.log10(max(1.0, spec.batch * math.prod(spec.out_spatial) * spec.in_channels * spec.out_channels / spec.groups))
        bin_ = "<1e6 MAC" if size < 6 else "1e6-1e8 MAC" if size < 8 else ">=1e8 MAC"
        groups[(spec.executor, f"{spec.ndim}d", spec.in_layout, spec.mode, bin_)].append(times)
    rows = []
    for (executor, nd, layout, mode, bin_), entries in sorted(groups.items()):
        wins = Counter(min(t, key=t.get) for t in entries)
        speedups = sorted(t[ORIGINAL] / min(t.values()) for t in entries)
        rows.append((executor, nd, layout, mode, bin_, len(entries), ", ".join(f"{n} {c}" for n, c in wins.most_common()),
                     f"{speedups[len(speedups) // 2]:.2f}x", f"{speedups[-1]:.2f}x"))
    return tabulate(rows, ("executor", "dims", "input", "mode", "size", "specs", "fastest form (count)", "median best/conv", "max"))


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
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to profile (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="comma-separated float dtypes, e.g. float32,bfloat16 (default: float32)")
    parser.add_argument("--mode", default="infer,train,train-w",
                        help="comma-separated modes (default: infer,train,train-w): train times forward + "
                             "backward to input and parameters, train-w backward to parameters only (a first layer)")
    parser.add_argument("--executor", default="eager", choices=("eager", "inductor"),
                        help="time the forms as they run eagerly (default), or compiled by torch.compile's inductor "
                             "(the figures the convrewrite backend decides with)")
    parser.add_argument("--quick", action="store_true", help="a small grid and short timings (under a minute on 2 CPU cores)")
    parser.add_argument("--specs", type=int, default=None, help="random specs per dtype and mode (default 500; 20 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shape grid (default 0)")
    parser.add_argument("--plot", metavar="PNG", default=None,
                        help="also time a regular (channels, size) grid and draw which form wins where, as a PNG "
                             "(needs matplotlib: pip install 'convrewrite[plot]'); --specs 0 times that grid only")
    parser.add_argument("--out", default=None, help=f"table file to write (default: {user_table_path('cpu').parent}/<device>-<fingerprint>.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
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
    specs = [dataclasses.replace(random_spec(rng, args.device, dtype, mode, realistic=i % 2 == 0), executor=args.executor)
             for dtype in dtypes for mode in modes for i in range(n)]
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
