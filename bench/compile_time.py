"""Compile time of ``torch.compile(backend="convrewrite")`` against inductor, cold and warm.

    python bench/compile_time.py                       # the default models
    python bench/compile_time.py --only hf-squeezebert

Each (model, setting) runs in fresh processes: first with an empty inductor cache dir (cold),
then again with the cache that run left (warm); our backend's settings once more with an empty
inductor cache dir but the convrewrite cache dir the first run left (its figures of the
compiled graphs kept: a later process compiles the graph that won alone). Settings: inductor, inductor with
``conv_1x1_as_mm``, our backend, and our backend with ``alternatives="background"``. A
process measures its first call (dynamo, the pass and compiles; inference, batch as the
workload gives it), then the seconds until the alternatives compiled in the background are
ready (:func:`convrewrite.backend.settle`) plus the call that picks, then the steady time per
call. Steady times come from separate processes, so they are
less exact than bench/run.py's side-by-side ratios. Results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from convrewrite.progress import bar

sys.path.insert(0, str(Path(__file__).parent))
from figures import command_line, heading, model_parser, publish  # noqa: E402

SETTINGS = ("inductor", "inductor-1x1mm", "convrewrite", "convrewrite-background")
OURS = SETTINGS[2:]
DEFAULT = ("mobilenetv2-block", "pointnet", "unfold-matmul", "per-pixel-16", "hf-squeezebert",
           "hf-mobilevit-small")
MARKS = ("<!-- bench:compile -->", "<!-- /bench:compile -->")


def build(name: str):
    """The model and inputs of a bench workload (bench/workloads.py) or a real model (bench/models.py)."""
    import models
    import workloads
    if name in models.MODELS:
        model, x = models.build(name)
        return model, (x,)
    (workload,) = [w for w in workloads.WORKLOADS if w.name == name]
    model, inputs = workload.make()
    return model.eval(), inputs


def compiled(model, setting: str):
    if setting.startswith("convrewrite"):
        options = {"alternatives": "background"} if setting.endswith("background") else {}
        return torch.compile(model, backend="convrewrite", options=options)
    return torch.compile(model, options={"conv_1x1_as_mm": True} if setting == "inductor-1x1mm" else {})


def child(name: str, setting: str) -> dict:
    """One process's figures (run with the cache dirs set by :func:`run`)."""
    from convrewrite.measure import time_callables
    model, inputs = build(name)
    fn = compiled(model, setting)
    reports = _backend_reports()
    with torch.no_grad():
        start = time.perf_counter()
        fn(*inputs)
        first = time.perf_counter() - start
        settle = 0.0
        if setting.startswith("convrewrite"):
            from convrewrite.backend import settle as wait
            start = time.perf_counter()
            wait()
            fn(*inputs)  # the call that times the compiled graphs and picks one
            settle = time.perf_counter() - start
        steady = time_callables({setting: lambda: fn(*inputs)}, rounds=9, block_s=0.01)[setting]
    ran = sorted({r.ran for r in reports if getattr(r, "ran", "")})
    return {"first_s": first, "settle_s": settle, "steady_ms": steady * 1e3, "ran": ", ".join(ran) or "-"}


def _backend_reports() -> list:
    """The reports the backend logs (filled as it logs them): which compiled graph each runs."""
    import logging
    reports = []

    class Keep(logging.Handler):
        def emit(self, record):
            reports.extend(a for a in (record.args or ()) if hasattr(a, "ran"))
    logger = logging.getLogger("convrewrite.backend")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    return reports


def run(name: str, setting: str, cache: Path, inductor: str = "inductor") -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / inductor), "CONVREWRITE_CACHE_DIR": str(cache / "ours"),
           "CONVREWRITE_PROGRESS": "0"}
    out = subprocess.run([sys.executable, __file__, "--child", name, setting], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(name: str) -> dict:
    row = {"model": name}
    for setting in SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            row[setting] = {"cold": run(name, setting, Path(tmp)), "warm": run(name, setting, Path(tmp))}
            row[setting]["kept"] = run(name, setting, Path(tmp), "inductor-again") if setting in OURS else None
        print(name, setting, row[setting], file=sys.stderr)
    return row


def _s(figures: dict, key: str = "first_s") -> str:
    return figures["error"][:40] if "error" in figures else f"{figures[key]:.1f}"


def _ratio(row: dict, setting: str, cache: str) -> str:
    ours, theirs = row[setting][cache], row["inductor"]["cold" if cache == "kept" else cache]
    if ours is None:
        return "-"
    return "-" if "error" in ours or "error" in theirs else f"{ours['first_s'] / theirs['first_s']:.2f}x"


def section(rows: list[dict], command: str) -> str:
    table = [(r["model"], setting, _s(r[setting]["cold"]), _ratio(r, setting, "cold"), _s(r[setting]["warm"]),
              _ratio(r, setting, "warm"), _s(r[setting]["kept"]) if r[setting].get("kept") else "-",
              _ratio(r, setting, "kept"), _s(r[setting]["cold"], "settle_s"), _s(r[setting]["cold"], "steady_ms"),
              " / ".join(r[setting][c].get("ran", "-") for c in ("cold", "warm", "kept") if r[setting].get(c))
              if setting in OURS else "")
             for r in rows for setting in SETTINGS]
    head = ["model", "setting", "cold first call s", "over inductor", "warm first call s", "over inductor",
            "cold, figures kept s", "over inductor cold", "then ready after s", "steady ms",
            "graph ours ran (cold / warm / kept)"]
    return "\n".join([
        *heading(MARKS, "Compile time under torch.compile (issue 21)", command),
        "First call (dynamo + pass + compiles + one run, inference) in a fresh process, seconds: cold = empty "
        "inductor cache dir, warm = the cache the cold run left. Where the pass rewrote a site, convrewrite "
        "compiles the rewritten graph and the graph as dynamo gave it, and times both, within the first call "
        "(elsewhere it compiles the latter alone); convrewrite-background compiles only the rewritten graph "
        "then, the other on a background thread, and \"then ready after\" is the wait for it plus the call "
        "that times both and picks. Our warm run and \"cold, figures kept\" (an empty inductor cache dir, the "
        "convrewrite cache dir the cold run left) find the compiled graphs' figures the cold run kept where it "
        "timed them on a quiet machine, and compile the graph that won alone. \"graph ours ran\": the compiled "
        "graph(s) the backend chose in each run. Steady ms: per call after that, each setting in its own process "
        "(cold run), so they move by up to 2x between processes on this shared machine; bench/run.py's "
        "side-by-side ratios are the run-time figures to read.", "",
        tabulate(table, head, tablefmt="github"), "", MARKS[1]])


def main(argv=None) -> int:
    p = model_parser(__doc__)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    rows = [bench(name) for name in bar(args.only or DEFAULT, desc="models", unit="model")]
    publish(section(rows, command_line("compile_time.py", argv)), MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
