"""First calls under 2-process DDP: one decision per job (rank 0 decides, the others wait)
against each process deciding alone, on the same 2-core machine.

    python bench/ddp.py        # bench/RESULTS.md's "ddp" section

Each run starts 2 processes at once, each with its own fresh cache dir and ``measure=True``
(every site timed: the most contended first call). "coordinated": a gloo process group of 2,
so rank 0 measures and broadcasts its decisions. "alone": the same 2 processes with no
process group, each measuring at the same time as the other. For each: both ranks' first-call
seconds, the sites each rewrote, and whether the two ranks chose the same form everywhere.
Two routes: ``optimize`` (the fx capture) and ``compile`` (``torch.compile(model,
backend="convrewrite")`` with the eager inner compiler, so the first call is the pass's work
and not inductor's).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tabulate import tabulate

import convrewrite
from convrewrite.table import fingerprint

sys.path.insert(0, str(Path(__file__).parent))
from figures import command_line, publish  # noqa: E402
from workloads import AudioStack, InvertedResidual, MyConv2d, PointNetEncoder  # noqa: E402

MARKS = ("<!-- bench:ddp -->", "<!-- /bench:ddp -->")
ROUTES = ("optimize", "compile")
MODELS = {  # name: (model, one rank's batch)
    "PointNet encoder": (PointNetEncoder, lambda: torch.randn(8, 3, 1024)),
    "MobileNetV2 block": (InvertedResidual, lambda: torch.randn(8, 32, 28, 28)),
    "audio stack": (AudioStack, lambda: torch.randn(8, 1, 16000)),
    # sites that win, so that the ranks' agreement is not trivial
    "Conv1d(8, 32, 1)": (lambda: torch.nn.Conv1d(8, 32, 1), lambda: torch.randn(64, 8, 256)),
    "unfold + matmul conv": (lambda: MyConv2d(unfold_matmul=True), lambda: torch.randn(4, 16, 64, 64)),
}


class _Reports(logging.Handler):
    """The backend's reports, as it logs them once it chose what runs."""

    def __init__(self):
        super().__init__()
        self.reports = []

    def emit(self, record):
        self.reports.append(record.args[0])


def _rank(rank: int, port: int | None, name: str, route: str, cache: str, queue) -> None:
    os.environ["CONVREWRITE_CACHE_DIR"] = f"{cache}/{rank}"
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(minutes=10))
    torch.set_num_threads(1)  # two ranks on two cores, as torchrun sets OMP_NUM_THREADS=1
    make, batch = MODELS[name]
    torch.manual_seed(0)
    model, x = make(), batch()
    logged = _Reports()
    logging.getLogger("convrewrite.backend").addHandler(logged)
    logging.getLogger("convrewrite.backend").setLevel(logging.INFO)
    if route == "optimize":
        opt = convrewrite.optimize(model, measure=True)
    else:
        opt = torch.compile(model, backend="convrewrite", options={"measure": True, "inner": "eager"})
    start = time.perf_counter()
    opt(x).sum().backward()  # a training step's first call
    seconds = time.perf_counter() - start
    reports = [opt.report] if route == "optimize" else logged.reports
    sites = [s for r in reports for s in r]
    queue.put((rank, seconds, [s.chosen for s in sites], sum(s.chosen != s.original for s in sites)))
    if port is not None:
        dist.barrier()  # rank 0 holds the store its decisions are posted in
        dist.destroy_process_group()


def run(name: str, route: str, coordinated: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1] if coordinated else None
    ctx, cache = mp.get_context("spawn"), tempfile.mkdtemp(prefix="convrewrite-ddp-")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, name, route, cache, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=1200) for _ in procs)
    for p in procs:
        p.join()
    (_, s0, forms0, n0), (_, s1, forms1, n1) = results
    return {"model": name, "route": route, "how": "coordinated" if coordinated else "alone", "first0": s0, "first1": s1,
            "rewritten": f"{n0}, {n1}", "agree": forms0 == forms1}


def section(rows: list[dict], command: str) -> str:
    fp = fingerprint("cpu")
    table = tabulate([(r["model"], r["route"], r["how"], f"{r['first0']:.1f}", f"{r['first1']:.1f}", r["rewritten"],
                       "yes" if r["agree"] else "no") for r in rows],
                     ["model", "route", "decided", "rank 0 first call s", "rank 1 first call s", "sites rewritten (rank 0, 1)",
                      "same forms"], tablefmt="github")
    return "\n".join([MARKS[0], "## First calls under 2-process DDP (issue 20)", "",
                      f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
                      f"- machine: {fp['model']} ({fp['isa']}), torch {torch.__version__}, 1 thread per rank",
                      f"- command: `{command}`", "",
                      "Each rank: a fresh cache dir, `measure=True`, one training step's first call (forward and "
                      "backward). coordinated: a gloo process group, rank 0 decides for both; alone: no process "
                      "group, both ranks measure at once. route: optimize(), or torch.compile(backend=\"convrewrite\") "
                      "with the eager inner compiler.", "", table, "", MARKS[1]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="a model name (repeatable)")
    p.add_argument("--route", action="append", choices=ROUTES, default=[], help="optimize or compile (default: both)")
    args = p.parse_args(argv)
    rows = []
    for name in [n for n in MODELS if not args.only or n in args.only]:
        for route, coordinated in ((r, c) for r in args.route or ROUTES for c in (False, True)):
            rows.append(run(name, route, coordinated))
            print(rows[-1], file=sys.stderr)
    text = section(rows, command_line("ddp.py", argv))
    publish(text, MARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
