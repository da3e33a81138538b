"""The deployment route: ``torch.export`` + AOTInductor, with and without ``rewrite_exported``.

    python bench/export_aoti.py                          # the default models
    python bench/export_aoti.py --only pointnet

For each model: export it, then (a) compile the program with AOTInductor as exported and (b)
pass it through :func:`convrewrite.rewrite_exported` (inductor figures) first. Reported: the
seconds each route takes from the exported program to a loaded package (inductor's caches
disabled, so each compile is cold), the sites rewritten, and the two packages' times per call,
side by side in one process with eager and ``torch.compile`` (inductor) as anchors.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

import convrewrite
from convrewrite.measure import time_callables

sys.path.insert(0, str(Path(__file__).parent))
from compile_time import build  # noqa: E402
from figures import command_line, heading, model_parser, publish  # noqa: E402

DEFAULT = ("pointnet", "mobilenetv2-block", "hf-squeezebert")
MARKS = ("<!-- bench:export -->", "<!-- /bench:export -->")


def packaged(program, path: Path):
    """The loaded AOTInductor package of ``program``, and the seconds it took to get it."""
    start = time.perf_counter()
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return torch._inductor.aoti_load_package(package), time.perf_counter() - start


def bench(name: str, tmp: Path) -> dict:
    model, inputs = build(name)
    with torch.no_grad():
        exported = torch.export.export(model, inputs)
        as_exported, plain_s = packaged(exported, tmp / f"{name}-plain.pt2")
        start = time.perf_counter()
        rewritten, report = convrewrite.rewrite_exported(exported)
        pass_s = time.perf_counter() - start
        ours, ours_s = packaged(rewritten, tmp / f"{name}-ours.pt2")
        torch.testing.assert_close(ours(*inputs), model(*inputs), rtol=1e-4, atol=1e-4)
        inductor = torch.compile(model)
        inductor(*inputs)
        times = time_callables({"eager": lambda: model(*inputs), "inductor": lambda: inductor(*inputs),
                                "aoti": lambda: as_exported(*inputs), "aoti+convrewrite": lambda: ours(*inputs)},
                               rounds=9, block_s=0.05)
    return {"model": name, "plain_s": plain_s, "ours_s": ours_s + pass_s, "sites": len(report),
            "rewritten": len(report.rewritten), "times": dict(times)}


def section(rows: list[dict], command: str) -> str:
    table = [(r["model"], f"{r['rewritten']}/{r['sites']}", f"{r['plain_s']:.1f}", f"{r['ours_s']:.1f}",
              *(f"{r['times'][k] * 1e3:.2f}" for k in ("eager", "inductor", "aoti", "aoti+convrewrite")),
              f"{r['times']['aoti'] / r['times']['aoti+convrewrite']:.2f}x") for r in rows]
    head = ["model", "sites rewritten", "aoti s", "convrewrite+aoti s", "eager ms", "inductor ms", "aoti ms",
            "aoti+convrewrite ms", "ours over aoti"]
    return "\n".join([
        *heading(MARKS, "torch.export + AOTInductor (issue 21)", command),
        "Seconds from the exported program to a loaded package (cold: inductor's caches disabled), and ms "
        "per call, timed side by side in one process (inference).", "",
        tabulate(table, head, tablefmt="github"), "", MARKS[1]])


def main(argv=None) -> int:
    p = model_parser(__doc__)
    args = p.parse_args(argv)
    torch._inductor.config.force_disable_caches = True
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(name, Path(tmp)) for name in args.only or DEFAULT]
    publish(section(rows, command_line("export_aoti.py", argv)), MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
