"""One decision per job: two processes over gloo decide once (rank 0) and run the same forms;
rank 0 failing to decide sends every rank back to the original, without a hang."""

import datetime
import io
import logging
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import convrewrite
from convrewrite import check, decide, distributed, specialize
from convrewrite.measure import Timings

FORMS = ("matmul", "linear")  # rank 0 would pick the first, rank 1 the second, if each decided alone


def _worker(rank, port, fail_on_rank0, cache, timeout_s, late_s, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CONVREWRITE_CACHE_DIR=f"{cache}/{rank}")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=timeout_s))
    measured = []

    def clock(spec, forms, **_):  # no real timing in tests: each rank's figures favour another form
        measured.append(spec.key())
        times = {f.name: 1e-3 if f.name == FORMS[rank] else 2e-3 for f in forms}
        return Timings(times, dict.fromkeys(times, 0.01), 0.0, 15)

    decide.time_forms = clock
    check.time_callables = lambda fns, **_: Timings({n: 2e-3 if n == "original" else 1e-3 for n in fns})
    if fail_on_rank0 and rank == 0:
        specialize.rewrite = lambda *a, **k: (_ for _ in ()).throw(KeyError("a bug of the pass"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    opt = convrewrite.optimize(model, measure=True, forms=FORMS)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    if rank == 0:
        time.sleep(late_s)  # a deciding rank that answers after the process group's timeout
    out, expected = opt(x), model(x)  # a training step's forward: grad enabled, training mode
    queue.put((rank, [s.chosen for s in opt.report], len(measured), opt.report.note, torch.equal(out, expected)
               or bool(torch.allclose(out, expected, atol=1e-5))))
    if not late_s:  # rank 0 holds the store its posts are in: as in training, it stays until all are done
        dist.barrier()
    dist.destroy_process_group()


def _on_two_ranks(target, *args, results=2) -> list:
    """Run ``target(rank, port, *args, queue)`` in two spawned processes; the first
    ``results`` items they put on the queue, once both exited cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    items = [queue.get(timeout=240) for _ in range(results)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return items


def _run(fail_on_rank0, tmp_path, timeout_s=60.0, late_s=0.0):
    items = _on_two_ranks(_worker, fail_on_rank0, str(tmp_path), timeout_s, late_s)
    return {rank: rest for rank, *rest in items}


def test_rank0_decides_and_every_rank_runs_its_forms(tmp_path):
    results = _run(False, tmp_path)
    (forms0, measured0, _, same0), (forms1, measured1, note1, same1) = results[0], results[1]
    assert forms0 == forms1 == ["matmul", "matmul"]  # alone, rank 1 would have chosen linear
    assert measured0 == 2 and measured1 == 0  # only the deciding rank timed anything
    assert "decided by rank 0" in note1 and same0 and same1


def test_rank0_failing_to_decide_sends_every_rank_to_the_original(tmp_path):
    results = _run(True, tmp_path)
    (forms0, _, note0, same0), (forms1, measured1, note1, same1) = results[0], results[1]
    assert forms0 == [] and "rewriting failed" in note0
    assert forms1 == [] and "rank 0 could not decide" in note1 and measured1 == 0
    assert same0 and same1


def test_a_rank_waits_no_longer_than_the_process_groups_timeout(tmp_path):
    results = _run(False, tmp_path, 3.0, 8.0)
    _, measured1, note1, same1 = results[1]
    assert "decision did not arrive" in note1 and "timeout" in note1 and measured1 == 0 and same1
    assert results[0][3]  # rank 0, answering late, still computes the model's output


def _evaluating_alone(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
    if rank == 0:  # evaluation on rank 0 only, as training scripts often do
        decide.time_forms = lambda spec, forms, **_: Timings({f.name: 1e-3 for f in forms})
        model = nn.Sequential(nn.Conv2d(4, 8, 1)).eval()
        with torch.no_grad():
            convrewrite.optimize(model, measure=True)(torch.randn(2, 4, 5, 5))
        queue.put("evaluated")
    dist.barrier()
    dist.destroy_process_group()


def test_evaluation_on_one_rank_does_not_wait_for_the_others():
    # waiting for rank 1 would last the 300 s timeout; the queue gives up at 240 s
    assert _on_two_ranks(_evaluating_alone, results=1) == ["evaluated"]


class KeywordStack(nn.Module):
    """A forward that takes ``**kwargs``: fx cannot bind it, so optimize() captures it through dynamo."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x, **kwargs):
        return self.down(torch.relu(self.up(x)))


def _dynamo_worker(rank, port, route, cache, queue):
    """Rank ``rank`` of a training job over gloo, through optimize()'s dynamo capture or
    ``torch.compile(backend="convrewrite")``; each rank's fake figures favour another form."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CONVREWRITE_CACHE_DIR=f"{cache}/{rank}")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    measured, timed, reports = [], [], []

    def clock(spec, forms, **_):
        measured.append(spec.key())
        times = {f.name: 1e-3 if f.name == FORMS[rank] else 2e-3 for f in forms}
        return Timings(times, dict.fromkeys(times, 0.01), 0.0, 15)

    def check_clock(fns, **_):  # the whole-graph check, and the backend's choice between compiled graphs
        timed.append(sorted(fns))
        return Timings({n: 2e-3 if n == "original" else 1e-3 for n in fns})

    decide.time_forms, check.time_callables = clock, check_clock
    logging.getLogger("convrewrite.backend").addHandler(_Reports(reports))
    logging.getLogger("convrewrite.backend").setLevel(logging.INFO)
    torch.manual_seed(0)
    model = KeywordStack()
    options = dict(measure=True, forms=FORMS)
    if route == "optimize":
        run = convrewrite.optimize(model, **options)
    else:
        run = torch.compile(model, backend="convrewrite", options={**options, "inner": "eager"})
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    out = run(x)
    out.sum().backward()
    report = run.report if route == "optimize" else reports[-1]
    queue.put((rank, [s.chosen for s in report], len(measured), len(timed), report.ran, report.note,
               bool(torch.allclose(out, model(x), atol=1e-5))))
    dist.barrier()
    dist.destroy_process_group()


class _Reports(logging.Handler):
    def __init__(self, into):
        super().__init__()
        self.into = into

    def emit(self, record):
        self.into.append(record.args[0])


@pytest.mark.parametrize("route", ["optimize", "backend"])
def test_graphs_captured_by_dynamo_run_rank0s_forms_on_every_rank(tmp_path, route):
    results = {rank: rest for rank, *rest in _on_two_ranks(_dynamo_worker, route, str(tmp_path))}
    (forms0, measured0, timed0, ran0, _, same0), (forms1, measured1, timed1, ran1, note1, same1) = results[0], results[1]
    assert forms0 == forms1 == ["matmul", "matmul"]  # alone, rank 1 would have chosen linear
    assert measured0 == 2 and measured1 == 0 and timed0 >= 1 and timed1 == 0  # rank 1 timed nothing
    assert ran0 == ran1 and "decided by rank 0" in note1 and same0 and same1


def _training_alone(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
    if rank == 0:  # a training step on rank 0 alone: it posts its decisions and waits for no one
        decide.time_forms = lambda spec, forms, **_: Timings({f.name: 1e-3 for f in forms})
        convrewrite.optimize(nn.Sequential(nn.Conv2d(4, 8, 1)), measure=True)(torch.randn(2, 4, 5, 5))
        queue.put("trained")
    dist.barrier()
    dist.destroy_process_group()


def test_rank0_training_alone_does_not_wait_for_the_others():
    assert _on_two_ranks(_training_alone, results=1) == ["trained"]


def _fsdp2_worker(rank, port, optimize, queue):
    from torch.distributed.fsdp import fully_shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    decide.time_forms = lambda spec, forms, **_: Timings({f.name: 2e-3 if f.name == "conv" else 1e-3 for f in forms})
    check.time_callables = lambda fns, **_: Timings({n: 2e-3 if n == "original" else 1e-3 for n in fns})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    run = convrewrite.optimize(model, measure=True, forms=("baddbmm",)) if optimize else model
    fully_shard(run)
    sgd = torch.optim.SGD(run.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)
    views = []
    for _ in range(3):
        sgd.zero_grad()
        out = run(torch.randn(4, 4, 6, 6))
        views.append(out._is_view())
        out += 1.0  # in place on the output, as residual code does: FSDP2's backward hook must hold
        out.square().mean().backward()
        sgd.step()
    weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    forms = [s.chosen for s in run.report] if optimize else []
    if rank == 0:
        buf = io.BytesIO()
        torch.save(weights, buf)
        queue.put((forms, views, buf.getvalue()))
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_training_matches_the_unoptimized_model():
    (_, _, plain), = _on_two_ranks(_fsdp2_worker, False, results=1)
    (forms, views, trained), = _on_two_ranks(_fsdp2_worker, True, results=1)
    assert forms == ["baddbmm", "baddbmm"] and not any(views)
    plain, trained = torch.load(io.BytesIO(plain)), torch.load(io.BytesIO(trained))
    assert list(plain) == list(trained)
    for k in plain:
        torch.testing.assert_close(trained[k], plain[k], rtol=1e-4, atol=1e-5)


def test_a_single_process_decides_alone():
    assert not distributed.coordinated()
