"""Per-call cost of a per-pixel loop lifted to one conv under ``torch.compile(backend="convrewrite")``.

    python bench/loop_call.py            # a 40x40 image, then bench/RESULTS.md's section
    python bench/loop_call.py --side 100

Times side by side, in one process, after two warm-up calls each: the loop compiled by our
backend (the lifted conv), a plain ``nn.Conv2d`` computing the same conv compiled by our
backend, by inductor and by dynamo's ``eager`` backend (dynamo's frame and nothing else), the
conv module run eagerly, and ``F.conv2d`` itself. The gaps between them say where a compiled
lifted loop's time per call goes beyond the conv it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from convrewrite.measure import time_callables

sys.path.insert(0, str(Path(__file__).parent))
from figures import command_line, heading, publish  # noqa: E402
from workloads import PerPixel  # noqa: E402

VERSION = torch.__version__.split("+")[0]
MARKS = (f"<!-- bench:loopcall:{VERSION} -->", f"<!-- /bench:loopcall:{VERSION} -->")  # a section per torch


def candidates(side: int) -> dict:
    """name -> a call of it, each called twice already (compiled and warm)."""
    torch.manual_seed(0)
    loop, x = PerPixel(), torch.randn(1, 1, side, side)
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    conv.weight = loop.weight
    fns = {f"loop, backend={b}" if m is loop else f"nn.Conv2d, backend={b}": torch.compile(m, backend=b)
           for m, b in ((loop, "convrewrite"), (conv, "convrewrite"), (conv, "inductor"), (conv, "eager"))}
    fns["nn.Conv2d, eager"] = conv
    fns["F.conv2d"] = lambda x: F.conv2d(x, loop.weight, padding=1)
    calls = {name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}
    for call in calls.values():
        call(), call()
    return calls


def section(side: int, times: dict, command: str) -> str:
    base = times["F.conv2d"]
    rows = [(name, f"{t * 1e6:.1f}", f"{(t - base) * 1e6:+.1f}") for name, t in times.items()]
    return "\n".join([
        *heading(MARKS, f"A lifted loop's call under the backend (issue 21), {side}x{side}, torch {VERSION}", command),
        tabulate(rows, ["called", "us per call", "over F.conv2d"], tablefmt="github"), "", MARKS[1]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=40)
    args = p.parse_args(argv)
    with torch.no_grad():
        times = time_callables(candidates(args.side), rounds=15, block_s=0.02)
    command = command_line("loop_call.py", argv)
    text = section(args.side, dict(times), command)
    publish(text, MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
