"""Figures that hold: convrewrite's timings against the steady state, and the choices they make.

    python bench/figures.py                  # every part below, then bench/RESULTS.md's section
    python bench/figures.py --only steady --only overhead

- ``steady``: the figure ``time_forms`` gives a form (what the pass decides and stores from)
  against the form's steady-state cost, a long loop of back-to-back calls (what a model that
  runs it sees), over a grid of channel mixes from about 1 us to 100 ms a call.
- ``choices``: random single-layer pointwise models (``Conv1d``/``Conv2d``, ``kernel_size=1``)
  optimized with a fresh cache dir, first on a quiet machine and then with one busy core during
  each first call (``--busy-cores``, a process spinning in a loop, stopped before anything is
  timed for the comparison; the model then runs quietly for a few seconds, in which a decision
  taken under load is taken again). Every model is then timed quietly, side by side: as written, as
  optimized, and with each channel-mix form. Regret: optimized over the fastest of those.
  After the busy run, each figure the pass stored is timed again quietly.
- ``stability``: the same models decided in 3 fresh processes, each with its own cache dir.
- ``prediction``: the shipped table's choices on random specs it has not seen, by prediction
  alone (``measure=False``) and with the default ``measure="auto"`` (bench/run.py's grid).
- ``code``: the figure the pass weighs a Python loop by (the code as written, timed as it
  decides) against the steady state of the model that runs it, for bench/workloads.py's loops.
- ``overhead``: the optimized module's own cost per call where nothing was rewritten.

The machine's other load is read from /proc/stat during each part and printed with it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from tabulate import tabulate

import convrewrite
from convrewrite.progress import bar
from convrewrite.check import ORIGINAL as ORIGINAL_GRAPH
from convrewrite.check import REWRITTEN as REWRITTEN_GRAPH
from convrewrite.decide import AS_WRITTEN
from convrewrite.forms import forms_for
from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.kinds.channel_mix.forms import ORIGINAL
from convrewrite.kinds.channel_mix.grid import random_spec
from convrewrite.measure import form_call, time_callables, time_forms
from convrewrite.spec import CHANNELS_LAST, STRIDED
from convrewrite.specialize import RETRY_S
from convrewrite.table import GRAPH_KEY, CostTable, fingerprint, user_table_path

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"
MARKS = ("<!-- bench:figures -->", "<!-- /bench:figures -->")
STEADY_S = 0.3  # each steady-state loop runs at least this long
# paired readings (a steady state, then a figure) per row: the VM's speed moves by more than
# 15% over tens of seconds, so a figure is compared with a steady state read next to it
PAIRS = 5
EVAL_ROUNDS, EVAL_BLOCK_S = 21, 0.005  # the side-by-side comparison of a model's variants
SETTLE_S = RETRY_S + 1.0  # a busy first call is followed by this long of quiet calls
GRID = [  # (batch, in, out, length): Conv1d channel mixes from ~1 us to ~100 ms a call
    (1, 4, 4, 1), (1, 8, 8, 16), (2, 16, 32, 32), (4, 32, 32, 64), (8, 64, 64, 64), (8, 64, 128, 256),
    (16, 128, 128, 256), (16, 256, 256, 256), (32, 256, 256, 512), (32, 512, 512, 512), (64, 512, 512, 1024),
]


def steady_seconds(fn) -> float:
    """Seconds per call over one loop of back-to-back calls (at least ``STEADY_S``, after 3
    warm-up calls): the mean cost a model running ``fn`` over and over sees, warm."""
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < STEADY_S or n < 3:
        fn()
        n += 1
    return elapsed / n


def paired(steady_calls: dict, figures: Callable[[], dict]) -> dict[str, dict]:
    """Per name: ``PAIRS`` readings of its steady state next to a figure, in alternating
    order; the figure, the steady state and their ratio are medians over the pairs, and the
    spread is how far the steady state itself moved between them (max over min)."""
    readings = []
    for i in range(PAIRS):
        if i % 2 == 0:
            st = {name: steady_seconds(call) for name, call in steady_calls.items()}
            fig = figures()
        else:
            fig = figures()
            st = {name: steady_seconds(call) for name, call in steady_calls.items()}
        readings.append((fig, st))
    rows = {}
    for name in steady_calls:
        figs, steadies = [f[name] for f, _ in readings], [s[name] for _, s in readings]
        rows[name] = {"figure_us": statistics.median(figs) * 1e6, "steady_us": statistics.median(steadies) * 1e6,
                      "ratio": statistics.median(f / s for f, s in zip(figs, steadies)),
                      "steady_spread": max(steadies) / min(steadies)}
    return rows


def bench_steady() -> dict:
    """Each form's figure against its steady state, read in pairs (:func:`paired`): how far
    the steady state itself moves between pairs is the comparison's floor."""
    rows = []
    for batch, cin, cout, length in GRID:
        rows += _form_pairs(ChannelMixSpec(batch, cin, cout, (length,)))
    return {"rows": rows, "within_15pct": _share(r["ratio"] for r in rows),
            "steady_within_15pct": _share(r["steady_spread"] for r in rows)}


def _form_pairs(spec: ChannelMixSpec) -> list[dict]:
    forms = [f for f in forms_for(spec) if f.name in (ORIGINAL, "linear", "baddbmm")]
    args = spec.example_inputs(torch.Generator().manual_seed(0))
    contended = []

    def figures():
        timings = time_forms(spec, forms)
        contended.append(timings.contended)
        return timings.seconds
    with torch.no_grad():  # as a model runs in inference
        pairs = paired({f.name: form_call(f, spec, args) for f in forms}, figures)
    print(f"steady: {spec.describe()} done", file=sys.stderr)
    return [{"spec": spec.describe(), "form": name, **row, "contended": sum(contended)} for name, row in pairs.items()]


def _share(ratios) -> float:
    ratios = list(ratios)
    return sum(abs(r - 1) <= 0.15 for r in ratios) / len(ratios)


# -- choices -------------------------------------------------------------------------------
def model_specs(n: int, seed: int) -> list[ChannelMixSpec]:
    """``n`` random inference channel mixes a single Conv1d/Conv2d(kernel_size=1) computes."""
    rng, specs = random.Random(seed), []
    while len(specs) < n:
        spec = random_spec(rng, realistic=len(specs) % 2 == 1)
        if spec.ndim <= 2 and spec.in_layout != STRIDED:
            specs.append(spec)
    return specs


def single_layer(spec: ChannelMixSpec) -> tuple[nn.Module, torch.Tensor]:
    conv_type = nn.Conv1d if spec.ndim == 1 else nn.Conv2d
    torch.manual_seed(0)
    model = conv_type(spec.in_channels, spec.out_channels, 1, stride=spec.stride, groups=spec.groups,
                      bias=spec.bias).eval()
    x = spec.example_inputs(torch.Generator().manual_seed(1))[0]
    if spec.in_layout == CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    return model, x


@contextlib.contextmanager
def busy(cores: int):
    """``cores`` processes spinning in a Python loop for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.2 if procs else 0)  # let them be scheduled
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def first_call(model: nn.Module, x: torch.Tensor, busy_cores: int):
    optimized = convrewrite.optimize(model)
    with busy(busy_cores), torch.no_grad():
        optimized(x)
    return optimized


def settle(optimized, x: torch.Tensor) -> None:
    """The model called quietly for ``SETTLE_S`` after its first call, as a training or serving
    loop would call it: a decision taken under load is taken again within that time."""
    end = time.perf_counter() + SETTLE_S
    with torch.no_grad():
        while time.perf_counter() < end:
            optimized(x)


class FormLayer(nn.Module):
    """``layer``'s parameters computed with ``form``: the layer as a user would write it by hand
    in that form (a module call, as the layer as written and the optimized one are)."""

    def __init__(self, layer: nn.Module, form, spec: ChannelMixSpec):
        super().__init__()
        self.layer, self.form, self.spec = layer, form, spec

    def forward(self, x):
        return self.form.fn(x, self.layer.weight, self.layer.bias, spec=self.spec)


def _calling(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: layer(x)


def quiet_comparison(spec: ChannelMixSpec, model: nn.Module, optimized, x: torch.Tensor) -> dict:
    """Seconds per call, timed side by side on a quiet machine: the model as written, as
    optimized, and with each legal form computing its layer."""
    fns = {"as written": lambda: model(x), "optimized": lambda: optimized(x)}
    for form in forms_for(spec):
        if form.name != ORIGINAL:
            fns[form.name] = _calling(FormLayer(model, form, spec), x)
    with torch.no_grad():
        return dict(time_callables(fns, rounds=EVAL_ROUNDS, block_s=EVAL_BLOCK_S))


def bench_choices(specs: list[ChannelMixSpec], busy_cores: int) -> dict:
    os.environ["CONVREWRITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="convrewrite-figures-")
    rows, stored_graphs = [], []
    for spec in specs:
        model, x = single_layer(spec)
        before = set(_stored())
        optimized = first_call(model, x, busy_cores)
        first = optimized.report
        if busy_cores:
            settle(optimized, x)
        (site,) = optimized.report
        times = quiet_comparison(spec, model, optimized, x)
        stored_graphs += _graph_figures_against_quiet(spec, {k: v for k, v in _stored().items() if k not in before},
                                                      times)
        best = min(times, key=times.get)
        rows.append({"spec": spec.describe(), "chosen": site.chosen, "source": site.source, "best": best,
                     "decided_again": optimized.report is not first,
                     "regret": times["optimized"] / min(times.values()),
                     "vs_written": times["optimized"] / times["as written"], "times": times})
        print(f"choices(busy={busy_cores}): {spec.describe()} -> {site.chosen} ({site.source})", file=sys.stderr)
    regrets = [r["regret"] for r in rows]
    result = {"busy_cores": busy_cores, "n": len(rows), "rows": rows,
              "within_10pct": sum(r <= 1.10 for r in regrets) / len(rows), "median_regret": statistics.median(regrets),
              "slower_than_written": sum(r["vs_written"] > 1.05 for r in rows),
              "decided_again": sum(r["decided_again"] for r in rows)}
    result["stored"] = stored_against_quiet() + stored_graphs
    return result


def _stored() -> dict:
    path = user_table_path("cpu")
    return CostTable.read(path).entries if path.exists() else {}


def _graph_figures_against_quiet(spec: ChannelMixSpec, new: dict, times: dict) -> list[dict]:
    """The whole-graph check's figures a model's first call stored, against its quiet
    comparison's times of the model as written and as optimized (the latter with the
    optimized module's own call cost, about 1 us)."""
    quiet = {ORIGINAL_GRAPH: times["as written"], REWRITTEN_GRAPH: times["optimized"]}
    return [{"spec": spec.describe(), "form": f"whole graph, {n}", "stored_us": s * 1e6, "quiet_us": quiet[n] * 1e6,
             "ratio": s / quiet[n]}
            for key, figures in new.items() if key.startswith(f"{GRAPH_KEY}|") for n, s in figures.items() if n in quiet]


def stored_against_quiet() -> list[dict]:
    """Each channel-mix figure the pass wrote to the user's table, against a quiet re-time
    of its form."""
    rows = []
    for key, figures in _stored().items():
        if key.startswith(f"{GRAPH_KEY}|"):  # compared as each model is (_graph_figures_against_quiet)
            continue
        spec = ChannelMixSpec.from_key(key)
        quiet = time_forms(spec, [f for f in forms_for(spec) if f.name in figures])
        rows += [{"spec": spec.describe(), "form": n, "stored_us": s * 1e6, "quiet_us": quiet[n] * 1e6,
                  "ratio": s / quiet[n]} for n, s in figures.items() if n in quiet]
    return rows


# -- stability ------------------------------------------------------------------------------
def decisions(specs: list[ChannelMixSpec]) -> list[list[str]]:
    """The form chosen for each spec's single-layer model, in this process, fresh cache, and
    the site's note (why an original was kept)."""
    os.environ["CONVREWRITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="convrewrite-figures-")
    chosen = []
    for spec in specs:
        model, x = single_layer(spec)
        site = first_call(model, x, 0).report.sites[0]
        chosen.append([site.chosen, site.note])
    return chosen


def bench_stability(n: int, seed: int, processes: int = 3) -> dict:
    runs = []
    for _ in range(processes):
        out = subprocess.run([sys.executable, __file__, "--decide", "--models", str(n), "--seed", str(seed)],
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out))
    same = [len({r[i][0] for r in runs}) == 1 for i in range(n)]
    differing = [{"spec": s.describe(), "chosen": [r[i][0] for r in runs], "apart": _apart(s, {r[i][0] for r in runs}),
                  "notes": sorted({r[i][1] for r in runs} - {""})}
                 for i, s in enumerate(model_specs(n, seed)) if not same[i]]
    return {"processes": processes, "n": n, "same_in_all": sum(same) / n, "differing": differing,
            "apart_within_10pct": sum(d["apart"] <= 1.10 for d in differing)}


def _apart(spec: ChannelMixSpec, chosen: set[str]) -> float:
    """How far apart the forms that different processes chose are: the slowest over the
    fastest, each computing the model's layer, timed quietly side by side."""
    model, x = single_layer(spec)
    fns = {f.name: _calling(model if f.name == ORIGINAL else FormLayer(model, f, spec), x)
           for f in forms_for(spec) if f.name in chosen}
    with torch.no_grad():
        times = time_callables(fns, rounds=EVAL_ROUNDS, block_s=EVAL_BLOCK_S)
    return max(times.values()) / min(times.values())


# -- prediction -----------------------------------------------------------------------------
def bench_prediction(n: int, seed: int) -> dict:
    from run import bench_grid  # bench/run.py's grid, on a fresh cache dir
    os.environ["CONVREWRITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="convrewrite-figures-")
    return bench_grid(argparse.Namespace(grid_seed=seed, grid=n, rounds=15, block=0.01))


# -- code -----------------------------------------------------------------------------------
CODE_WORKLOADS = ("tap-loop", "unfold-matmul", "convolve-loop", "per-pixel-16")
CODE_MODES = ("infer", "train-w", "train")  # train-w: a first layer's step (no gradient for the data)


def bench_code() -> dict:
    """Each loop's figure as written (the site's time of the code, as the pass measured it to
    decide) against the steady state of the model running it, per mode, read in pairs."""
    from workloads import LOOP_WORKLOADS
    rows = []
    for w in (w for w in LOOP_WORKLOADS if w.name in CODE_WORKLOADS):
        for mode in CODE_MODES if w.train else CODE_MODES[:1]:
            rows.append({"workload": w.name, "mode": mode, **_code_figure(w, mode)})
            print(f"code: {w.name} {mode} done", file=sys.stderr)
    return {"rows": rows, "within_15pct": _share(r["ratio"] for r in rows),
            "steady_within_15pct": _share(r["steady_spread"] for r in rows)}


def _code_figure(workload, mode: str) -> dict:
    """The model's steady state in ``mode`` and the pass's figure for its loop as written
    (each figure from a fresh optimize() with its own cache dir), in pairs."""
    model, inputs = workload.make()
    for x in inputs:
        x.requires_grad_(mode == "train")
    call = (lambda m: lambda: m(*inputs)) if mode == "infer" else (lambda m: lambda: m(*inputs).sum().backward())

    def figure():
        os.environ["CONVREWRITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="convrewrite-figures-")
        optimized = convrewrite.optimize(model, measure=True)
        call(optimized)()
        (site,) = [s for s in optimized.report if s.pattern == "conv loop"]
        return {"code": site.times[AS_WRITTEN]}
    with torch.set_grad_enabled(mode != "infer"):
        return paired({"code": call(model)}, figure)["code"]


# -- overhead -------------------------------------------------------------------------------
class _ReturnsItsInput(nn.Module):
    """A forward that costs next to nothing: the optimized module's own cost is most of a call."""

    def forward(self, x):
        return x


OVERHEAD_TRIALS = 7


def bench_overhead() -> dict:
    """Per-call cost of the optimized module over the plain one where nothing is rewritten, at
    one thread (at two, waking the second thread moves a small conv's time by more than the
    overhead being measured): the issue's small conv, and a forward that returns its input,
    whose time is almost all call overhead and so moves far less with the machine's load.
    Each trial times plain and optimized side by side; the overhead is the median of the
    trials' differences."""
    x = torch.randn(2, 8, 7, 7)
    rows = {"`Conv2d(8, 64, 1)` on `[2, 8, 7, 7]`": nn.Conv2d(8, 64, 1).eval(),
            "a forward that returns its input": _ReturnsItsInput()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"rows": [_overhead(name, model, x) for name, model in rows.items()]}
    finally:
        torch.set_num_threads(threads)


def _overhead(name: str, model: nn.Module, x: torch.Tensor) -> dict:
    optimized = convrewrite.optimize(model, forms=())  # only the original may be chosen
    with torch.no_grad():
        optimized(x)
        trials = [time_callables({"plain": lambda: model(x), "optimized": lambda: optimized(x)}, rounds=31,
                                 block_s=0.01).seconds for _ in range(OVERHEAD_TRIALS)]
    overheads = [(t["optimized"] - t["plain"]) * 1e6 for t in trials]
    return {"model": name, "plain_us": statistics.median(t["plain"] for t in trials) * 1e6,
            "optimized_us": statistics.median(t["optimized"] for t in trials) * 1e6,
            "overhead_us": statistics.median(overheads), "overhead_range_us": [min(overheads), max(overheads)]}


# -- output ---------------------------------------------------------------------------------
def _r(x: float) -> str:
    return f"{x:.2f}"


def _run(part: dict) -> str:
    return f"*{part['run']}*\n"


def section(data: dict) -> str:
    lines = [MARKS[0], "## Figures that hold (issue 16)", "",
             f"- machine: {data['machine']}", f"- busy protocol: {data['busy_protocol']}",
             "- each part below names the date and command of its run; raw numbers: [figures.json](figures.json)", ""]
    if "steady" in data:
        s = data["steady"]
        lines += ["### Figures against the steady state", "", _run(s),
                  "`time_forms` (warm-up, 15 interleaved 1 ms blocks, 25th percentile) against the steady state (one "
                  f"loop of back-to-back calls of >= {STEADY_S} s), read in {PAIRS} pairs of one next to the other, in "
                  "alternating order; figure, steady state and their ratio are medians over the pairs, spread is the "
                  "steady state's largest reading over its smallest; contended: how many of the figures were; quiet "
                  f"machine. Figures within 15% of the steady state: {s['within_15pct']:.0%}; steady state within 15% "
                  f"of itself across the pairs: {s['steady_within_15pct']:.0%}.", "",
                  tabulate([(r["spec"], r["form"], f"{r['figure_us']:.1f}", f"{r['steady_us']:.1f}", _r(r["ratio"]),
                             _r(r["steady_spread"]), r["contended"] or "") for r in s["rows"]],
                           ["spec", "form", "figure us", "steady us", "figure/steady", "steady spread", "contended"],
                           tablefmt="github"), ""]
    for name in ("choices_quiet", "choices_busy"):
        if name in data:
            c = data[name]
            lines += [f"### Choices, {c['n']} random single-layer models, {c['busy_cores']} busy core(s) at the first call",
                      "", _run(c), f"- within 10% of the fastest layout-preserving form: {c['within_10pct']:.0%}; "
                      f"median regret {c['median_regret']:.3f}; more than 5% slower than as written: "
                      f"{c['slower_than_written']}" + (f"; decided again after the load: {c['decided_again']}"
                                                       if c["busy_cores"] else ""), ""]
            worst = sorted(c["rows"], key=lambda r: -r["regret"])[:8]
            lines += ["Worst regrets:", "",
                      tabulate([(r["spec"], r["chosen"], r["source"], r["best"], _r(r["regret"]), _r(r["vs_written"]))
                                for r in worst], ["spec", "chosen", "figures", "fastest", "regret", "opt/written"],
                               tablefmt="github"), ""]
            if c["stored"]:
                ratios = [r["ratio"] for r in c["stored"]]
                graphs = sum(r["form"].startswith("whole graph") for r in c["stored"])
                lines += [f"- figures stored in the user table: {len(ratios)} ({graphs} of them the whole-graph check's, "
                          "against the quiet comparison's model as written and as optimized); stored/quiet re-time: median "
                          f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}; off by 2x or "
                          f"more: {sum(r >= 2 or r <= 0.5 for r in ratios)}", ""]
            else:
                lines += ["- figures stored in the user table: none", ""]
    if "stability" in data:
        s = data["stability"]
        lines += [f"### Decision stability: {s['n']} models in {s['processes']} fresh processes", "", _run(s),
                  f"- same form in every process: {s['same_in_all']:.0%}"
                  + (f"; where they differ, the chosen forms within 10% of each other (timed quietly side by side): "
                     f"{s['apart_within_10pct']} of {len(s['differing'])}" if s["differing"] else ""), ""]
        if s["differing"]:
            lines += [tabulate([(d["spec"], ", ".join(d["chosen"]), _r(d["apart"]), "; ".join(d.get("notes", ())))
                                for d in s["differing"]],
                               ["spec", "chosen", "slowest/fastest of those", "why an original was kept"],
                               tablefmt="github"), ""]
    if "prediction" in data:
        from run import grid_text
        lines += ["### The shipped table on unseen shapes", "", _run(data["prediction"]), grid_text(data["prediction"]), ""]
    if "code" in data:
        c = data["code"]
        lines += ["### Loops as written: figures against the steady state", "", _run(c),
                  "The seconds per call the pass weighs a loop by (its report's time of the code, measured at the "
                  "first call of a fresh `optimize(model, measure=True)`) against the model's steady state, read in "
                  "pairs as above; quiet machine. train-w: a first layer's training step (no gradient for the data). "
                  f"Figures within 15% of the steady state: {c['within_15pct']:.0%}; steady state within 15% of itself "
                  f"across the pairs: {c['steady_within_15pct']:.0%}.", "",
                  tabulate([(r["workload"], r["mode"], f"{r['figure_us']:.1f}", f"{r['steady_us']:.1f}", _r(r["ratio"]),
                             _r(r["steady_spread"])) for r in c["rows"]],
                           ["workload", "mode", "figure us", "steady us", "figure/steady", "steady spread"],
                           tablefmt="github"), ""]
    if "overhead" in data:
        o = data["overhead"]
        lines += ["### Per-call overhead", "", _run(o),
                  f"One thread, nothing rewritten, {OVERHEAD_TRIALS} trials of plain and optimized timed side by "
                  "side; overhead: the median of the trials' differences, and their range.", "",
                  tabulate([(r["model"], f"{r['plain_us']:.2f}", f"{r['optimized_us']:.2f}", f"{r['overhead_us']:.2f}",
                             "{:.2f} to {:.2f}".format(*r["overhead_range_us"])) for r in o["rows"]],
                           ["model", "plain us", "optimized us", "overhead us", "range"], tablefmt="github"), ""]
    lines.append(MARKS[1])
    return "\n".join(lines)


def model_parser(doc: str) -> argparse.ArgumentParser:
    """A bench script's argument parser, with ``--only`` (a model or workload name, repeatable)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="a model or workload name (repeatable)")
    return p


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran ``script`` (a file in bench/) with ``argv`` (None: this process's)."""
    return f"python bench/{script} {' '.join(sys.argv[1:] if argv is None else argv)}".strip()


def heading(marks: tuple[str, str], title: str, command: str) -> list[str]:
    """A RESULTS.md section's first lines: its mark, title, date, machine and command."""
    from convrewrite.table import fingerprint
    fp = fingerprint("cpu")
    return [marks[0], f"## {title}", "", f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
            f"- machine: {fp['model']} ({fp['isa']}, {torch.get_num_threads()} threads), torch {torch.__version__}",
            f"- command: `{command}`", ""]


def publish(text: str, marks: tuple[str, str]) -> None:
    """Print a section of RESULTS.md and put it in place (:func:`replace_section`)."""
    print(text)
    replace_section(text, marks)


def replace_section(text: str, marks: tuple[str, str]) -> None:
    """Put ``text`` (which starts and ends with ``marks``) in RESULTS.md in place of the
    section between those marks, or at its end."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Bench results\n"
    start, end = old.find(marks[0]), old.find(marks[1])
    new = old[:start] + text + old[end + len(marks[1]):] if 0 <= start < end else old.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="steady, choices, stability, prediction, code or overhead (repeatable)")
    p.add_argument("--models", type=int, default=40)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--busy-cores", type=int, default=1)
    p.add_argument("--decide", action="store_true", help=argparse.SUPPRESS)  # one process of `stability`
    args = p.parse_args(argv)
    specs = model_specs(args.models, args.seed)
    if args.decide:
        print(json.dumps(decisions(specs)))
        return 0
    wanted = lambda name: not args.only or name in args.only  # noqa: E731
    fp = fingerprint("cpu")
    saved = HERE / "figures.json"
    data = json.loads(saved.read_text()) if saved.exists() else {}  # parts not run now are kept
    data.update(machine=f"{fp['model']} ({fp['isa']}, {fp['threads']} threads), torch {torch.__version__}",
                busy_protocol=f"{args.busy_cores} process(es) spinning `while True: pass` from just before each "
                              "model's first call (capture, measurement, check) until it returns; then the model is "
                              f"called quietly for {SETTLE_S:g} s, as a loop would call it (a decision taken under "
                              "load is taken again within that time), and the comparison is timed quietly")
    parts = {"steady": bench_steady, "choices_quiet": lambda: bench_choices(specs, 0),
             "choices_busy": lambda: bench_choices(specs, args.busy_cores),
             "stability": lambda: bench_stability(args.models, args.seed),
             "prediction": lambda: bench_prediction(args.models, args.seed), "code": bench_code,
             "overhead": bench_overhead}
    command = command_line("figures.py", argv)
    for name, run in bar(parts.items(), desc="parts", unit="part"):
        if wanted(name.split("_")[0]):
            data[name] = {**run(), "run": f"{datetime.datetime.now().isoformat(timespec='minutes')}: `{command}`"}
    saved.write_text(json.dumps(data, indent=1))  # first: a part's figures outlive a failure below
    publish(section(data), MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
