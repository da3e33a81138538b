"""optimize() on modules fx cannot capture: captured through dynamo, rewritten, checked."""

import dataclasses
import warnings
from collections import OrderedDict

import pytest
import torch
import torch._dynamo
import torch.nn as nn

import convrewrite
from convrewrite import dynamo_route
from convrewrite.measure import Timings

from .helpers import assert_same_outputs_and_grads


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def compiles(monkeypatch):
    """How many graphs the route has handed to the pass."""
    count = {"graphs": 0}
    real = dynamo_route.compile_graph

    def counted(*args, **kwargs):
        count["graphs"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(dynamo_route, "compile_graph", counted)
    return count


class DataDependent(nn.Module):
    """A branch on a tensor's value: fx cannot trace it, dynamo breaks the graph there."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 5, 1)

    def forward(self, x):
        return self.c(x) if x.sum() > 0 else -self.c(x)


class Output(OrderedDict):
    """A dict subclass built from keywords, as transformers' ModelOutput is."""

    def __init__(self, **items):
        super().__init__(**items)


@dataclasses.dataclass
class Pair:
    hidden: torch.Tensor
    pooled: torch.Tensor


class KwargsModel(nn.Module):
    """A Hugging Face style forward: optional arguments, ``**kwargs`` and a dict-subclass output."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv1d(4, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x=None, mask=None, return_dict=True, **kwargs):
        h = self.proj(x)
        if mask is not None:
            h = h * mask
        y = self.head(h.transpose(1, 2))
        return Output(last_hidden_state=y, pooled=y.mean(1)) if return_dict else (y, y.mean(1))


class Block(nn.Module):
    """Python over sizes in a child (as timm's MobileViT computes patch counts): fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = x[..., :-1]
        return self.pw(x)


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()

    def forward(self, x):
        return self.block(torch.relu(self.stem(x)))


def test_a_model_fx_cannot_trace_is_captured_through_dynamo_and_rewritten():
    model, x = DataDependent(), torch.randn(2, 3, 6)
    opt = convrewrite.optimize(model, forms=("matmul",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_outputs_and_grads(model, opt, x, calls=3)
        assert_same_outputs_and_grads(model, opt, -x, calls=2)  # the other branch
    report = opt.report_for(x.requires_grad_())  # as the calls above passed it
    assert "captured by dynamo: 2 graph(s)" in report.note
    assert [(s.path, s.chosen) for s in report.rewritten] == [("c", "matmul")]
    assert "whole model through dynamo" in report.note


def test_kwargs_forward_keeps_its_output_types_and_gradients(compiles):
    model, x, mask = KwargsModel(), torch.randn(2, 4, 5), torch.ones(1, 1, 5)
    opt = convrewrite.optimize(model)
    for _ in range(2):
        out, ref = opt(x, mask=mask), model(x, mask=mask)
        assert type(out) is Output and list(out) == list(ref)
        torch.testing.assert_close(dict(out), dict(ref))
        out, ref = opt(x=x, return_dict=False), model(x=x, return_dict=False)
        assert type(out) is tuple
        torch.testing.assert_close(out, ref)
    assert compiles["graphs"] == 2  # one per signature: later calls reuse them
    report = opt.report_for(x, mask=mask)
    assert {s.pattern for s in report.sites} >= {"pointwise conv"} and report.rewritten
    out = opt(x.requires_grad_())["last_hidden_state"]
    grads = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    ref = torch.autograd.grad(model(x)["last_hidden_state"].sum(), [x, *model.parameters()])
    torch.testing.assert_close(grads, ref)


def test_a_child_fx_cannot_trace_no_longer_hides_its_sites():
    model, x = Parent(), torch.randn(2, 3, 6, 7)
    opt = convrewrite.optimize(model)
    assert_same_outputs_and_grads(model, opt, x, calls=2)
    report = opt.report_for(x.requires_grad_())
    assert "captured by dynamo" in report.note
    assert "block.pw" in [s.path for s in report.sites]


def test_the_compiled_forward_runs_only_where_it_wins_whole(monkeypatch, compiles):
    # each graph's rewrite wins (conftest's check times); dynamo's frame around them loses
    slower = Timings({"original": 1e-3, "rewritten": 2e-3})
    monkeypatch.setattr(dynamo_route, "whole_graph_times", lambda *_: slower)
    model, x = KwargsModel(), torch.randn(2, 4, 5)
    opt = convrewrite.optimize(model)
    torch.testing.assert_close(dict(opt(x)), dict(model(x)))
    assert not opt.report.rewritten and "rewritten graph ran 2.00x the time" in opt.report.sites[0].note
    torch._dynamo.reset()
    opt(x)  # the module's own forward runs: dynamo is not asked again
    assert compiles["graphs"] == 1


def test_nothing_rewritten_runs_the_module_without_dynamo(compiles):
    model, x = KwargsModel(), torch.randn(2, 4, 5)
    opt = convrewrite.optimize(model, margin=1e6)  # no form wins by that much
    opt(x)
    assert opt.report.sites and not opt.report.rewritten
    torch._dynamo.reset()
    opt(x)
    assert compiles["graphs"] == 1


def test_a_failing_dynamo_capture_falls_back_with_one_warning(monkeypatch):
    def boom(*_):
        raise RuntimeError("boom")

    monkeypatch.setattr(dynamo_route.DynamoRoute, "specialize", boom)
    model, x = KwargsModel(), torch.randn(2, 4, 5)
    opt = convrewrite.optimize(model)
    with pytest.warns(UserWarning, match=r"capture through dynamo failed \(RuntimeError: boom\)"):
        torch.testing.assert_close(dict(opt(x)), dict(model(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(dict(opt(x)), dict(model(x)))


def test_a_call_that_does_not_bind_raises_the_originals_error():
    model = DataDependent()
    opt = convrewrite.optimize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="unexpected keyword"):
            opt(torch.randn(1, 3, 2), scale=2)


def test_variadic_forward_is_captured_through_dynamo():
    class Variadic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 1)

        def forward(self, *xs):
            return sum(self.conv(x) for x in xs)

    model, x = Variadic(), torch.randn(1, 2, 3)
    opt = convrewrite.optimize(model)
    torch.testing.assert_close(opt(x, x), model(x, x))
    report = opt.specialize(x, x)
    assert "captured by dynamo" in report.note and [s.path for s in report.sites] == ["conv", "conv"]


def test_an_optimized_submodule_with_kwargs_inside_a_model_and_optimized_twice():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = KwargsModel()

        def forward(self, x):
            return self.encoder(x, return_dict=True)["pooled"] * 2

    model, x = Outer(), torch.randn(2, 4, 5)
    ref = model(x)
    model.encoder = convrewrite.optimize(model.encoder)
    torch.testing.assert_close(model(x), ref)
    twice = convrewrite.optimize(convrewrite.optimize(model))
    torch.testing.assert_close(twice(x), ref)
    assert list(twice.state_dict()) == list(Outer().state_dict())


def test_sites_under_an_optimized_module_are_named_by_the_paths_a_user_writes():
    inner = KwargsModel()
    model = nn.Sequential(nn.Sequential(convrewrite.optimize(inner)))
    x = torch.randn(2, 4, 5)
    inner(x)
    twice = convrewrite.optimize(model)
    twice(x)
    paths = [s.path for s in twice.report_for(x).sites]
    assert "0.0.proj" in paths and all(model.get_submodule(p.split(":")[0]) for p in paths)


@pytest.mark.parametrize("isolates", [True, False], ids=["isolated entries", "limit raised (torch < 2.13)"])
def test_many_signatures_and_instances_are_each_captured_past_dynamos_recompile_limit(isolates, monkeypatch):
    # dynamo keeps at most recompile_limit (8) graphs per code object; transformers models all
    # share their decorators' code, and every input length is a signature of its own
    monkeypatch.setattr(dynamo_route, "_ISOLATES", isolates and dynamo_route._ISOLATES)
    lengths = range(1, torch._dynamo.config.recompile_limit + 3)
    opt = convrewrite.optimize(KwargsModel(), forms=("matmul",))
    with torch.no_grad():
        for n in lengths:
            opt(torch.randn(2, 4, n))
        assert all(opt.report_for(torch.randn(2, 4, n)).rewritten for n in lengths)
    for _ in lengths:
        other = convrewrite.optimize(KwargsModel(), forms=("matmul",))
        with torch.no_grad():
            other(torch.randn(2, 4, 5))
        assert other.report.rewritten, other.report.note


def test_sites_after_a_graph_break_inside_a_submodule_are_named_by_their_path_in_the_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)

        def forward(self, x, **options):
            torch._dynamo.graph_break()  # the rest of this forward is a frame of its own, its self this block
            return self.conv(x).relu()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv1d(4, 4, 1), Block())

        def forward(self, x, **options):
            return self.encoder(x)

    model, x = Net(), torch.randn(2, 4, 5)
    optimized = convrewrite.optimize(model)
    torch.testing.assert_close(optimized(x), model(x))
    paths = [s.path for s in optimized.report.sites]
    assert "encoder.1.conv" in paths and all(isinstance(model.get_submodule(p), nn.Conv1d) for p in paths)
