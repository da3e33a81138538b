"""The bench: every workload as written, optimized, with each form forced, and under inductor.

    python bench/run.py            # full run, rewrites bench/RESULTS.md and bench/results.json
    python bench/run.py --quick    # shorter timings and a smaller shape grid
    python bench/run.py --only conv1d-1x1-short --only grid

All candidates of a workload are timed in one run, in interleaved rounds
(``convrewrite.measure.time_callables``), and reported as speedups over the original.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import datetime
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config
import torch.nn as nn
from tabulate import tabulate

import convrewrite
from convrewrite.progress import bar
from convrewrite.decide import choose
from convrewrite.forms import forms_for, registered_names
from convrewrite.kinds.channel_mix import ChannelMixSpec, crossover
from convrewrite.kinds.channel_mix.forms import ORIGINAL
from convrewrite.kinds.channel_mix.grid import random_spec
from convrewrite.measure import time_callables, time_forms
from convrewrite.options import Options
from convrewrite.profile import MODES, build
from convrewrite.table import CostTable, fingerprint, load_table

sys.path.insert(0, str(Path(__file__).parent))
from workloads import COMPILED, WORKLOADS  # noqa: E402

HERE = Path(__file__).parent
README = HERE.parent / "README.md"
# the forum's code at its own sizes, and a few blocks
HEADLINE = ("conv2d-1x1-large", "conv1d-1x1-short", "conv1d-1x1-permuted", "conv1d-on-transposed", "linear-transposes",
            "linear-transposes-long", "ffn-transposed", "convnext-block", "pointnet", "mobilenetv2-block", "convolve-loop",
            "unfold-mul-sum", "unfold-matmul", "per-pixel-loop", "per-pixel-16", "tap-loop")
HEADLINE_MARKS = ("<!-- bench:headline -->", "<!-- /bench:headline -->")
ALL_FORMS = ("conv", "conv_channels_last", "matmul", "baddbmm", "linear", "addmm",
             "channels_first_conv", "channels_first_matmul", "channels_last_linear",
             "conv_direct", "conv_unfold", "conv_fft")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


# -- calling a model the way each mode does --------------------------------------------------
def call(model: nn.Module, inputs: tuple, train: bool):
    """A zero-argument call: inference under no_grad, or forward + backward to the parameters
    with a dense output gradient (a loss's, not the stride-0 one ``.sum()`` would give)."""
    if train:
        params = [p for p in model.parameters() if p.requires_grad]
        grad_out = []

        def train_step():
            out = model(*inputs)
            if not grad_out:
                grad_out.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out))
            return torch.autograd.grad(out, params, grad_out[0])
        return train_step

    def infer():
        with torch.no_grad():
            return model(*inputs)
    return infer


def steady_allocator() -> str:
    """Fix glibc malloc's mmap threshold for this process; say which allocator the bench runs on.

    glibc raises the threshold as the process frees large blocks, so whether an activation of
    a few MB comes back as fresh pages (page faults on every call) depends on the process's
    history: eager mobilenetv2-block (train) ran 90 +- 12 ms per call in one process and
    51 +- 2 ms with the threshold fixed. Fixed, the ratios compare code, not allocator history
    (PyTorch's CPU launcher, ``torch.backends.xeon.run_cpu``, swaps in jemalloc or tcmalloc
    for the same reason)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fixed = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        fixed = False
    return "glibc malloc, mmap threshold fixed at 32 MiB (mallopt)" if fixed else "the platform's default malloc"


def first_call_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forced(model: nn.Module, inputs: tuple, form: str, train: bool, tmp: Path, report=None):
    """``model`` optimized as if ``form`` won at every site of ``report`` (its explain(), made
    if not given) where it is legal (None if nowhere)."""
    if report is None:
        with torch.set_grad_enabled(train):
            report = convrewrite.explain(model, *inputs)
    table = CostTable(fingerprint("cpu"), profiled=True)
    for site in (s for s in report if s.key):  # every form timed (an exact hit), the forced one fastest
        # nanoseconds: faster than any code a lifted conv replaces, so loops are lifted too
        table.add(site.key, {**dict.fromkeys(registered_names(), 3e-9), site.original: 2e-9, form: 1e-9}, {})
    path = tmp / f"forced-{form}-{train}.json"
    table.write(path)
    optimized = convrewrite.optimize(model, table=path, check=False)  # forced, even where slower
    with torch.set_grad_enabled(train):
        chosen = {s.chosen for s in optimized.specialize(*inputs)}
    return optimized if chosen == {form} else None


class _Reports(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.reports = []

    def emit(self, record):
        self.reports.append(record.args[0])


@contextlib.contextmanager
def backend_reports():
    """The reports ``backend="convrewrite"`` logs meanwhile: one per compiled graph, saying
    which compiled graph runs."""
    logger, handler = logging.getLogger("convrewrite.backend"), _Reports()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.reports
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def pointwise_convs(model: nn.Module) -> bool:
    """Whether ``model`` has a 1x1 conv module: without one, inductor's ``conv_1x1_as_mm``
    compiles the same code, and timing it again would only add a second noisy sample."""
    return any(isinstance(m, nn.modules.conv._ConvNd) and set(m.kernel_size) == {1} for m in model.modules())


def compiled_variant(model: nn.Module, name: str):
    """A torch.compile anchor: inductor, inductor with conv_1x1_as_mm, or our backend."""
    return {"inductor": lambda: torch.compile(model),
            "inductor-1x1mm": lambda: torch.compile(model, options={"conv_1x1_as_mm": True}),
            "compile-convrewrite": lambda: torch.compile(model, backend="convrewrite")}[name]()


# -- sections --------------------------------------------------------------------------------
def bench_workload(workload, train: bool, args, tmp: Path) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    model, inputs = workload.make()
    if not train:
        model.eval()
    optimized = convrewrite.optimize(model)
    candidates = {"original": call(model, inputs, train)}
    first = {"optimize": first_call_seconds(call(optimized, inputs, train))}
    candidates["optimized"] = call(optimized, inputs, train)
    with torch.set_grad_enabled(train):
        report = convrewrite.explain(model, *inputs)
    kinds = {key.split("|")[0] for key in (s.key for s in report) if key}
    for form in (f for f in ALL_FORMS if f != ORIGINAL and any(f in registered_names(k) for k in kinds)):
        variant = forced(model, inputs, form, train, tmp, report)
        if variant is not None:
            candidates[f"form:{form}"] = call(variant, inputs, train)
    if workload.reference is not None:
        candidates["hand-written"] = call(workload.reference(model), inputs, train)
    backend_ran = []
    if not args.no_compile:
        torch._dynamo.reset()
        for name in (n for n in workload.compiled if n != "inductor-1x1mm" or pointwise_convs(model)):
            compiled = compiled_variant(model, name)
            with backend_reports() as reports:
                first[name] = first_call_seconds(call(compiled, inputs, train))
            backend_ran += [r.ran for r in reports]
            candidates[name] = call(compiled, inputs, train)
    times = dict(time_callables(candidates, rounds=args.rounds, block_s=args.block))
    forms = {k: v for k, v in times.items() if k.startswith("form:") or k == "original"}
    best = min(forms, key=forms.get)
    report = optimized.report
    return {"workload": workload.name, "source": workload.source, "mode": "train" if train else "infer",
            "times": times, "first_call_s": first, "chosen": [s.chosen for s in report],
            "keys": [s.key for s in report],
            "figures": [s.source for s in report], "best": best, "backend_ran": backend_ran,
            "optimized_vs_best": times["optimized"] / times[best],
            "optimized_vs_hand_written": times["optimized"] / times["hand-written"] if "hand-written" in times else None,
            "optimized_vs_original": times["optimized"] / times["original"],
            "bench_s": time.perf_counter() - start}


def bench_grid(args) -> dict:
    """Choice quality on seeded random specs the shipped table has not seen, for pure
    prediction (measure=False) and for the default policy (measure="auto")."""
    table = load_table("cpu")
    tables = {"predict": table, "auto": load_table("cpu")}  # auto's measurements must not help predict
    rng = random.Random(args.grid_seed)
    specs = []
    while len(specs) < args.grid:
        spec = random_spec(rng, mode=MODES[len(specs) % 3], realistic=len(specs) % 2 == 1)
        if spec.key() not in table.entries:
            specs.append(spec)
    rows = []
    for spec in bar(specs, desc="grid", unit="spec"):
        times = time_forms(spec, forms_for(spec), rounds=args.rounds, block_s=args.block / 2)
        row = {"key": spec.key(), "times": dict(times), "best": min(times, key=times.get)}
        for policy, measure in (("predict", False), ("auto", "auto")):
            choice = choose(spec, ORIGINAL, tables[policy], Options(measure=measure))
            row[policy] = {"chosen": choice.form, "source": choice.source,
                           "regret": times[choice.form] / min(times.values()),
                           "vs_original": times[choice.form] / times[ORIGINAL]}
        rows.append(row)
    return {"seed": args.grid_seed, "table": table.origin, "specs": rows, "n": len(rows),
            "policies": {p: _quality([r[p] for r in rows]) for p in ("predict", "auto")},
            "always_conv": _quality([{"regret": r["times"][ORIGINAL] / min(r["times"].values()), "vs_original": 1.0}
                                     for r in rows])}


def _quality(choices: list[dict]) -> dict:
    regrets = sorted(c["regret"] for c in choices)
    return {"within_10pct": sum(r <= 1.10 for r in regrets) / len(regrets), "median_regret": statistics.median(regrets),
            "p90_regret": regrets[int(0.9 * (len(regrets) - 1))], "max_regret": regrets[-1],
            "slower_than_original": sum(c["vs_original"] > 1.05 for c in choices),
            "measured": sum(c.get("source") == "measured" for c in choices), "regrets": regrets}


def bench_crossover(args) -> dict:
    """Every channel-mix form timed over the crossover grid (``convrewrite.kinds.channel_mix.crossover``), drawn
    to crossover.png when matplotlib is installed."""
    specs = crossover.grid()
    table = CostTable(fingerprint("cpu"))
    build(specs, table, rounds=3, block_s=args.block / 4)
    cells = crossover.cells(specs, table.entries)
    try:
        crossover.draw(cells, HERE / "crossover.png", crossover.title(table.fingerprint, "float32"))
    except ImportError:
        return {"cells": cells, "png": None}
    return {"cells": cells, "png": "crossover.png"}


def bench_roofline(args, workloads: list[dict]) -> dict:
    """This machine's matmul peak and copy bandwidth, and each single-site pointwise workload's
    fraction of its roofline bound (max of flops/peak and bytes/bandwidth) when optimized."""
    n, size = 2048, 1 << 26
    a, b = torch.randn(n, n), torch.randn(n, n)
    src, dst = torch.randn(size), torch.empty(size)
    t = time_callables({"mm": lambda: torch.mm(a, b), "copy": lambda: dst.copy_(src)}, rounds=args.rounds, block_s=0.2)
    peak, bandwidth = 2 * n ** 3 / t["mm"], 2 * 4 * size / t["copy"]
    rows = []
    for w in workloads:
        if w["mode"] != "infer" or len(w["keys"]) != 1 or not w["keys"][0].startswith("channel_mix|"):
            continue
        spec = ChannelMixSpec.from_key(w["keys"][0])
        positions = spec.batch * math.prod(spec.out_spatial)
        flops = 2 * positions * spec.in_channels * spec.out_channels / spec.groups
        moved = 4 * (spec.batch * spec.in_channels * math.prod(spec.spatial) + positions * spec.out_channels
                     + spec.in_channels * spec.out_channels / spec.groups)
        bound = max(flops / peak, moved / bandwidth)
        rows.append({"workload": w["workload"], "gflop": flops / 1e9, "mbytes": moved / 1e6, "bound_ms": bound * 1e3,
                     "optimized_ms": w["times"]["optimized"] * 1e3, "original_ms": w["times"]["original"] * 1e3,
                     "fraction": bound / w["times"]["optimized"], "fraction_original": bound / w["times"]["original"]})
    return {"peak_gflops": peak / 1e9, "bandwidth_gbs": bandwidth / 1e9, "sites": rows}


def bench_overhead(args) -> dict:
    """Steady-state cost of the optimized module over its own rewritten graph, and first-call time."""
    tiny, x = nn.Conv1d(4, 4, 1).eval(), torch.randn(1, 4, 4)
    with tempfile.TemporaryDirectory() as tmp:
        opt = forced(tiny, (x,), "linear", False, Path(tmp))  # a rewritten graph to compare with
    gm = opt.graph_module(x)
    t = time_callables({"graph": call(gm, (x,), False), "optimized": call(opt, (x,), False)},
                       rounds=args.rounds, block_s=args.block)
    xs = torch.randn(8, 64, 128)
    opt_deep = convrewrite.optimize(nn.Sequential(*[nn.Conv1d(64, 64, 1) for _ in range(50)]).eval())
    first = first_call_seconds(call(opt_deep, (xs,), False))
    steady = time_callables({"steady": call(opt_deep, (xs,), False)}, rounds=3, block_s=args.block)["steady"]
    return {"overhead_us": (t["optimized"] - t["graph"]) * 1e6, "graph_us": t["graph"] * 1e6,
            "first_call_50_layers_s": first, "steady_50_layers_s": steady}


# -- output ----------------------------------------------------------------------------------
def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def workload_table(results: list[dict]) -> str:
    cols = ["original", "optimized", *(f"form:{f}" for f in ALL_FORMS if f != ORIGINAL), "hand-written", *COMPILED]
    cols = [c for c in cols if any(c in r["times"] for r in results)]
    rows = []
    for r in results:
        t, hand = r["times"], r.get("optimized_vs_hand_written")
        rows.append([r["workload"], r["mode"], f"{t['original'] * 1e3:.3f}",
                     *(_x(t["original"] / t[c]) if c in t else "-" for c in cols[1:]),
                     ",".join(r["chosen"]), r["best"], _x(r["optimized_vs_best"]), _x(hand) if hand else "-"])
    head = ["workload", "mode", "original ms", "optimized", *(c.removeprefix("form:") for c in cols[2:]),
            "chosen", "best", "opt/best", "opt/hand"]
    return tabulate(rows, head, tablefmt="github")


def loops_compiled_text(results: list[dict]) -> list[str]:
    """Convolutions written as loops under torch.compile: our backend against inductor, in
    compile time and run time."""
    rows = [(r["workload"], r["mode"], f"{r['first_call_s']['inductor']:.1f}", f"{r['first_call_s']['compile-convrewrite']:.1f}",
             _x(r["first_call_s"]["inductor"] / r["first_call_s"]["compile-convrewrite"]),
             f"{r['times']['inductor'] * 1e3:.3f}", f"{r['times']['compile-convrewrite'] * 1e3:.3f}",
             _x(r["times"]["inductor"] / r["times"]["compile-convrewrite"]))
            for r in results if "hand-written" in r["times"] and {"inductor", "compile-convrewrite"} <= set(r["first_call_s"])]
    if not rows:
        return []
    head = ["workload", "mode", "inductor first call s", "convrewrite first call s", "compile speedup",
            "inductor ms", "convrewrite ms", "run speedup"]
    return ["Convolutions written as code under `torch.compile`: `backend=\"convrewrite\"` against inductor "
            "(first call = dynamo + compile + one run):", "", tabulate(rows, head, tablefmt="github"), ""]


def compiled_rows(results: list[dict]) -> list[dict]:
    """Per row timed under inductor and our backend: our backend's speedup over default
    inductor, and over the better of inductor and inductor with ``conv_1x1_as_mm``."""
    rows = []
    for r in (r for r in results if {"inductor", "compile-convrewrite"} <= set(r["times"])):
        t = r["times"]
        better = min(t["inductor"], t.get("inductor-1x1mm", math.inf))
        rows.append({"workload": r["workload"], "mode": r["mode"], "loop": "hand-written" in t,
                     "ran": ",".join(r.get("backend_ran", [])), "times": t,
                     "vs_inductor": t["inductor"] / t["compile-convrewrite"], "vs_better": better / t["compile-convrewrite"]})
    return rows


def compiled_text(results: list[dict]) -> list[str]:
    """``backend="convrewrite"`` against inductor's two settings on every row, with geometric means."""
    rows = compiled_rows(results)
    if not rows:
        return []
    table = tabulate([(x["workload"], x["mode"], f"{x['times']['original'] * 1e3:.3f}",
                       *(_x(x["times"]["original"] / x["times"][c]) if c in x["times"] else "-" for c in COMPILED),
                       f"{x['vs_inductor']:.2f}", f"{x['vs_better']:.2f}", x["ran"]) for x in rows],
                     ["workload", "mode", "eager ms", *COMPILED, "ours / inductor", "ours / better setting",
                      "graph ours ran"], tablefmt="github")
    return ["`backend=\"convrewrite\"` against inductor, default and with `conv_1x1_as_mm` (speedups over eager; "
            "\"ours / better setting\" is the faster inductor setting's time over ours, so above 1 is faster; "
            "\"graph ours ran\" is the compiled graph the backend chose on its first call: inductor's own compile of "
            "the graph as dynamo gave it, the same with 1x1 convs as matmuls, or the rewritten graph):", "", table, "",
            compiled_summary(rows), ""]


def compiled_summary(rows: list[dict]) -> str:
    """Geometric means of :func:`compiled_rows` and the rows more than 5% behind the better setting."""
    geo = lambda xs: math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else math.nan  # noqa: E731
    below = [f"{x['workload']} {x['mode']} {x['vs_better']:.2f} (ran {x['ran']})" for x in rows if x["vs_better"] < 0.95]
    plain = [x for x in rows if not x["loop"]]
    return (f"`backend=\"convrewrite\"`, geometric mean over {len(rows)} rows: {geo([x['vs_inductor'] for x in rows]):.2f}x "
            f"default inductor, {geo([x['vs_better'] for x in rows]):.2f}x the better of its two settings; without the "
            f"{len(rows) - len(plain)} loop rows: {geo([x['vs_inductor'] for x in plain]):.2f}x and "
            f"{geo([x['vs_better'] for x in plain]):.2f}x. Rows more than 5% slower than the better setting: "
            f"{', '.join(below) or 'none'}.")


def grid_text(g: dict) -> str:
    buckets = ((1.0, 1.05), (1.05, 1.10), (1.10, 1.25), (1.25, 1.5), (1.5, 2.0), (2.0, math.inf))
    policies = {"predict (measure=False)": g["policies"]["predict"], "auto (default)": g["policies"]["auto"],
                "always keep the conv": g["always_conv"]}
    rows = [(name, f"{q['within_10pct']:.0%}", f"{q['median_regret']:.3f}", f"{q['p90_regret']:.2f}",
             f"{q['max_regret']:.2f}", q["slower_than_original"], q["measured"]) for name, q in policies.items()]
    head = (f"{g['n']} random specs (seed {g['seed']}; inference, training and first-layer training in turn; half with sizes rounded as "
            f"models write them; none in the shipped table), timed in one run; chosen/best = time of the chosen "
            f"form over the fastest form's.")
    table = tabulate(rows, ["policy", "within 10% of best", "median chosen/best", "p90", "max",
                            "slower than original >5%", "measured"], tablefmt="github")
    hist = tabulate([(f"[{lo:.2f}, {hi:.2f})", *(sum(lo <= r < hi for r in q["regrets"]) for q in policies.values()))
                     for lo, hi in buckets], ["chosen/best", *policies], tablefmt="github")
    return f"{head}\n\n{table}\n\nDistribution:\n\n{hist}"


def crossover_text(c: dict) -> str:
    wins = collections.Counter(min(cell["times"], key=cell["times"].get) for cell in c["cells"])
    text = (f"The fastest form of a C -> C pointwise conv (batch 8, channels-first input) over channels and size, "
            f"{len(c['cells'])} shapes, each label the fastest form's speedup over the conv; grey shapes exceed "
            f"{crossover.MAX_MACS:.0e} MACs and were not timed. Fastest: "
            + ", ".join(f"{name} {n}" for name, n in wins.most_common())
            + ". The same map for any machine: `python -m convrewrite.profile --plot map.png`.")
    picture = "![crossover map](crossover.png)" if c["png"] else \
        "(not drawn: matplotlib is not installed; `pip install 'convrewrite[plot]'`)"
    return f"{text}\n\n{picture}"


def machine() -> str:
    fp = fingerprint("cpu")
    return f"{fp['model']} ({fp['isa']}, {fp['threads']} threads), {platform.system()} {platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}"


def merged_with_last_run(data: dict, command: str) -> tuple[dict, str]:
    """A partial run (``--only``) merged into the last results: its rows and sections replace
    theirs, the rest stay, and the header says which rows were re-run, when and how."""
    try:
        last = json.loads((HERE / "results.json").read_text())
    except (OSError, ValueError):
        return data, command
    rerun = {(r["workload"], r["mode"]) for r in data.get("workloads", [])}
    rows = [r for r in last.get("workloads", []) if (r["workload"], r["mode"]) not in rerun] + data.get("workloads", [])
    order = {w.name: i for i, w in enumerate(WORKLOADS)}
    rows.sort(key=lambda r: (order.get(r["workload"], len(order)), r["mode"] != "infer"))
    names = sorted({name for name, _ in rerun} | {k for k in ("grid", "crossover", "roofline", "overhead") if k in data})
    reruns = [*last.get("reruns", []), {"date": data["date"], "command": command, "rows": names}]
    merged = {**last, **{k: v for k, v in data.items() if k not in ("date", "machine", "allocator")},
              "workloads": rows, "reruns": reruns}
    return merged, last.get("command", "python bench/run.py")


def write_results(data: dict, command: str) -> None:
    data["command"] = command
    reruns = [f"- re-run on {r['date']}: `{r['command']}` ({', '.join(r['rows'])})" for r in data.get("reruns", [])]
    lines = [
        "# Bench results",
        "",
        f"- date: {data['date']}",
        f"- machine: {data['machine']}",
        f"- command: `{command}`",
        *reruns,
        f"- allocator: {data['allocator']}; see `steady_allocator` in bench/run.py",
        "- times: `torch.utils.benchmark`, all candidates of a row in interleaved rounds, median round; "
        "ratios are speedups over the original (higher is better); `opt/best` is the optimized model's time "
        "over the fastest form's (1.00x is the oracle). `form:X` is the model with form X forced at every site. "
        "`hand-written`: the one conv op a person would write instead of code that spells out a convolution (`opt/hand`: the "
        "optimized model's time over it).",
        "- raw numbers: [results.json](results.json)",
        "",
    ]
    if data.get("workloads"):
        lines += ["## Forum code and blocks", "", workload_table(data["workloads"]), ""]
        lines += ["First call (capture + rewrite for optimize, compile for inductor), seconds:", ""]
        firsts = list(dict.fromkeys(k for r in data["workloads"] for k in r["first_call_s"]))
        lines += [tabulate([(r["workload"], r["mode"], *(f"{r['first_call_s'][k]:.2f}" if k in r["first_call_s"] else "-"
                                                         for k in firsts)) for r in data["workloads"]],
                           ["workload", "mode", *firsts], tablefmt="github"), ""]
        lines += compiled_text(data["workloads"])
        lines += loops_compiled_text(data["workloads"])
    if data.get("grid"):
        lines += ["## Choice quality on unseen shapes", "", grid_text(data["grid"]), ""]
    if data.get("crossover"):
        lines += ["## Crossover map", "", crossover_text(data["crossover"]), ""]
    if data.get("roofline"):
        r = data["roofline"]
        lines += ["## Roofline", "",
                  f"This machine: fp32 matmul peak {r['peak_gflops']:.0f} GFLOP/s (2048x2048 mm), copy bandwidth "
                  f"{r['bandwidth_gbs']:.1f} GB/s (256 MB copy). Bound = max(flops / peak, bytes / bandwidth); "
                  "fraction = bound / measured time (1.0 is the physical limit).", "",
                  tabulate([(x["workload"], f"{x['gflop']:.3f}", f"{x['mbytes']:.1f}", f"{x['bound_ms']:.3f}",
                             f"{x['original_ms']:.3f}", f"{x['fraction_original']:.0%}", f"{x['optimized_ms']:.3f}",
                             f"{x['fraction']:.0%}") for x in r["sites"]],
                           ["workload (infer)", "GFLOP", "MB moved", "bound ms", "original ms", "of bound",
                            "optimized ms", "of bound"], tablefmt="github"), ""]
    if data.get("overhead"):
        o = data["overhead"]
        lines += ["## Overhead", "",
                  f"- steady-state cost of the optimized module over its rewritten graph: {o['overhead_us']:.1f} us per call "
                  f"(graph alone {o['graph_us']:.1f} us)",
                  f"- first call of a 50-layer pointwise model (capture + rewrite + one run): {o['first_call_50_layers_s']:.2f} s "
                  f"(a steady call: {o['steady_50_layers_s'] * 1e3:.2f} ms)", ""]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + _kept_sections())
    (HERE / "results.json").write_text(json.dumps(data, indent=1))


def _kept_sections() -> str:
    """RESULTS.md from its first section that another bench script writes (``<!-- bench:NAME
    -->``: bench/figures.py's, bench/models.py's, ...) to its end, readings between them
    included, kept as it is."""
    old = (HERE / "RESULTS.md").read_text() if (HERE / "RESULTS.md").exists() else ""
    start = old.find("<!-- bench:")
    return "" if start < 0 else "\n" + old[start:]


def headline(data: dict, command: str) -> str:
    """The README's results: the forum's code and a few blocks, vs eager and inductor, and a summary."""
    rows = []
    for r in data["workloads"]:
        if r["workload"] in HEADLINE:
            t, hand = r["times"], r.get("optimized_vs_hand_written")
            rows.append([r["workload"], r["mode"], f"{t['original'] * 1e3:.3f}", _x(t["original"] / t["optimized"]),
                         f"{r['optimized_vs_best']:.2f}", f"{hand:.2f}" if hand else "-",
                         *(_x(t["original"] / t[c]) if c in t else "-" for c in ("inductor", "compile-convrewrite"))])
    table = tabulate(rows, ["workload", "mode", "eager ms", "optimize()", "optimize / best form",
                            "optimize / hand-written", "inductor", "backend=convrewrite"], tablefmt="github")
    auto, predict = data["grid"]["policies"]["auto"], data["grid"]["policies"]["predict"]
    o = data["overhead"]
    return "\n".join([
        f"Speedups over the model as written (eager), on this project's machine ({data['machine']}), from "
        f"`{command}` on {data['date'][:10]}, on {data['allocator']}. \"optimize / best form\" is the optimized "
        "model's time over the fastest single form forced at every site (1.00 = the oracle); \"optimize / "
        "hand-written\" compares a lifted loop with the one conv op written by hand. The machine is shared and "
        "noisy: rows of tens of microseconds move by 10-15% between runs. Inductor is not run on the 100x100 per-pixel loop (it took 130 s on a 20x20 one); "
        "per-pixel-16 compares it with our backend.",
        "", table, "", compiled_summary(compiled_rows(data["workloads"])) + " Every row: bench/RESULTS.md.", "",
        f"On {data['grid']['n']} random pointwise shapes absent from the shipped table, the chosen form was within 10% "
        f"of the fastest on {auto['within_10pct']:.0%} of them with the default `measure=\"auto\"` ({auto['measured']} "
        f"measured), and on {predict['within_10pct']:.0%} from prediction alone (`measure=False`); keeping the conv "
        f"would be within 10% on {data['grid']['always_conv']['within_10pct']:.0%}. Steady-state overhead of the "
        f"optimized module over its graph: {o['overhead_us']:.1f} us per call; first call of a 50-layer pointwise "
        f"model: {o['first_call_50_layers_s']:.2f} s.",
        *(["", "Which form wins where on this machine (`python -m convrewrite.profile --plot map.png` draws it for yours):",
           "", "![crossover map](bench/crossover.png)"] if data.get("crossover", {}).get("png") else []),
        "", "All figures, every candidate form, compile times and the roofline: [bench/RESULTS.md](bench/RESULTS.md)."])


def update_readme(data: dict, command: str) -> None:
    """Rewrite the README's results between its headline marks (a full run only)."""
    text = README.read_text()
    start, end = HEADLINE_MARKS
    if start in text and end in text:
        head, rest = text.split(start, 1)
        README.write_text(f"{head}{start}\n{headline(data, command)}\n{end}{rest.split(end, 1)[1]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter timings, a 40-spec grid")
    p.add_argument("--only", action="append", default=[],
                   help="workload name, 'roofline', 'grid', 'crossover' or 'overhead' (repeatable)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns (inductor, our backend)")
    p.add_argument("--grid-seed", type=int, default=2026)
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's adaptive mmap threshold on (noisier, history-dependent timings)")
    args = p.parse_args(argv)
    args.rounds, args.block = (11, 0.02) if args.quick else (15, 0.05)
    args.grid = 40 if args.quick else 80
    wanted = lambda name: not args.only or name in args.only  # noqa: E731
    data = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": machine(),
            "allocator": "the platform's default malloc" if args.default_malloc else steady_allocator()}
    # compile times as a first compile sees them, not inductor's caches from an earlier run
    torch._inductor.config.force_disable_caches = True
    # as a fresh install: the shipped table only, and measurements kept out of the user's cache
    os.environ["CONVREWRITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="convrewrite-bench-")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(w, train) for w in WORKLOADS if wanted(w.name) for train in (False, True)[:1 + w.train]]
        data["workloads"] = [bench_workload(w, train, args, Path(tmp))
                             for w, train in bar(runs, desc="workloads", unit="workload")]
    if data["workloads"]:
        print(workload_table(data["workloads"]))
    if wanted("crossover"):
        data["crossover"] = bench_crossover(args)
    if data["workloads"] and wanted("roofline"):
        data["roofline"] = bench_roofline(args, data["workloads"])
    if wanted("grid"):
        data["grid"] = bench_grid(args)
        print(grid_text(data["grid"]))
    if wanted("overhead"):
        data["overhead"] = bench_overhead(args)
        print(data["overhead"])
    command = ("python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.only:
        data, command = merged_with_last_run(data, command)
    write_results(data, command)
    if not args.only:
        update_readme(data, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
