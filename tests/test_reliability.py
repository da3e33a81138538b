"""Faults and hostile inputs: they get a clear error or a clean fallback, never a wrong answer."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import convrewrite
from convrewrite.table import CostTable, load_table, user_table_path

# `python -m convrewrite.profile` with figures from a fake clock (10 ms a spec, always clean):
# on a busy machine the real clock reads every spec as contended, and nothing would be stored.
PROFILE_ON_A_FAKE_CLOCK = """
import sys, time
from convrewrite import profile
from convrewrite.measure import Timings
def clean(spec, forms, **_):
    time.sleep(0.01)
    return Timings({f.name: 1e-3 for f in forms}, {f.name: 0.01 for f in forms}, 0.0, 15)
profile.time_forms = clean
sys.exit(profile.main(sys.argv[1:]))
"""


def pointwise_stack():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_new_memory_format_dtype_and_shape_respecialise():
    model = pointwise_stack()
    opt = convrewrite.optimize(model, forms=("matmul",), measure=True)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        for inp in (x, x.to(memory_format=torch.channels_last), x[:, :, ::2], x.double(), x[:1]):
            model.to(inp.dtype)
            torch.testing.assert_close(opt(inp), model(inp))
    assert len(opt._state.specs) >= 4


def test_integer_and_complex_inputs_run_as_the_original_does():
    model = nn.Sequential(nn.Conv1d(2, 2, 1))
    opt = convrewrite.optimize(model)
    for x in (torch.ones(1, 2, 3, dtype=torch.int64), torch.ones(1, 2, 3, dtype=torch.complex64)):
        with pytest.raises(RuntimeError) as expected:
            model(x)
        with pytest.raises(type(expected.value)), pytest.warns(UserWarning, match="run through the original"):
            opt(x)


def test_a_failing_pass_falls_back_with_one_warning_and_the_model_runs_once(monkeypatch):
    from convrewrite import specialize

    def broken(gm, options, executor="eager"):
        raise KeyError("a bug of the pass")

    monkeypatch.setattr(specialize, "rewrite", broken)
    model, x = pointwise_stack(), torch.randn(2, 4, 5, 5)
    calls = []
    model[0].register_forward_pre_hook(lambda m, args: calls.append(1))
    opt = convrewrite.optimize(model)
    with pytest.warns(UserWarning, match="rewriting failed \\(KeyError: 'a bug of the pass'\\); these inputs run") as seen:
        out = opt(x)
    assert [w.filename for w in seen] == [__file__]  # the warning names the user's line, not the pass's
    assert len(calls) == 1 and "KeyError" in opt.report.note
    torch.testing.assert_close(out, model(x))


def test_meta_tensors_run_as_the_original_does():
    """Nothing can be timed or verified on the meta device: every site keeps its original."""
    model = pointwise_stack().to("meta")
    x = torch.randn(2, 4, 5, 5, device="meta")
    opt = convrewrite.optimize(model, measure=True)
    out = opt(x)
    assert out.device.type == "meta" and out.shape == model(x).shape
    assert opt.report.sites and all(s.chosen == s.original and "meta" in s.note for s in opt.report.sites)


def test_unwritable_cache_dir_warns_and_keeps_choices_in_memory(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")  # a cache dir below a regular file cannot be made, even by root
    monkeypatch.setenv("CONVREWRITE_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    model, x = nn.Conv1d(4, 8, 1), torch.randn(2, 4, 16)
    with pytest.warns(UserWarning, match="could not write"), torch.no_grad():
        opt = convrewrite.optimize(model, x, measure=True)
    assert opt.report.sites[0].source == "measured"
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


def test_profile_killed_halfway_keeps_the_old_table_and_its_progress(isolated_cache):
    path = user_table_path("cpu")
    env = {**os.environ, "CONVREWRITE_CACHE_DIR": str(isolated_cache)}
    run = [sys.executable, "-c", PROFILE_ON_A_FAKE_CLOCK, "--quick", "--mode", "infer"]
    subprocess.run(run + ["--specs", "3"], env=env, check=True, capture_output=True)
    before = CostTable.read(path).entries
    proc = subprocess.Popen(run + ["--specs", "400", "--seed", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(240):  # wait (up to 2 minutes) for the first checkpoint
        if len(CostTable.read(path).entries) > len(before):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = CostTable.read(path).entries
    assert set(before) <= set(after) and len(after) > len(before)
    assert load_table("cpu").lookup  # still loads


def test_whole_module_torch_save_and_load():
    model, x = pointwise_stack(), torch.randn(1, 4, 3, 3)
    opt = convrewrite.optimize(model, x)
    buf = io.BytesIO()
    torch.save(opt, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# -- DistributedDataParallel over gloo, two processes on this machine -------------------------
def _ddp_worker(rank, world, port, how, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = pointwise_stack()
    options = dict(forms=("baddbmm",), measure=True)
    run = model
    if how == "optimize":
        run = convrewrite.optimize(model, **options)
    elif how == "compile":  # torch.compile(DDP(model)) hands this torch's backends no graph on CPU
        run = torch.compile(model, backend="convrewrite", options={**options, "inner": "eager"})
    ddp = nn.parallel.DistributedDataParallel(run)
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(1 + rank)
    for _ in range(3):
        sgd.zero_grad()
        ddp(torch.randn(4, 4, 6, 6)).square().mean().backward()
        sgd.step()
    if rank == 0:  # as bytes: tensors sent through the queue would need this process alive
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        queue.put(buf.getvalue())
    dist.destroy_process_group()


def _train_ddp(how, port):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, how, queue)) for r in range(2)]
    for p in procs:
        p.start()
    state = torch.load(io.BytesIO(queue.get(timeout=300)))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return state


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_training_matches_the_unoptimized_model():
    plain = _train_ddp("plain", _free_port())
    for how in ("optimize", "compile"):  # each job ends before the next takes a port
        trained = _train_ddp(how, _free_port())
        assert list(plain) == list(trained)
        for k in plain:
            torch.testing.assert_close(trained[k], plain[k], rtol=1e-4, atol=1e-5)
