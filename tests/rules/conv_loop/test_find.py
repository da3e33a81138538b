"""Code that computes a convolution, through ``optimize``: lifted where shown equal (with
gradients and shared parameters), reported and left as written where not."""

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

import convrewrite
from convrewrite.backend import annotate_from_meta
from convrewrite.capture import annotate, capture, fold_sizes
from convrewrite.rules import conv_loop
from tests import loops
from tests.helpers import assert_same_outputs_and_grads


def loop_specs(model, *inputs):
    """The lifted specs of ``model``'s loops, under no_grad and with autograd (to the
    parameters only, and to the inputs too)."""
    specs = []
    for grad, input_grad in ((False, False), (True, False), (True, True)):
        with torch.set_grad_enabled(grad):
            args = [x.detach().requires_grad_(input_grad and x.is_floating_point())
                    if isinstance(x, torch.Tensor) else x for x in inputs]
            gm = capture(model)
            annotate(gm, args)
            fold_sizes(gm)
            specs += [s.spec for s in conv_loop.find(gm) if s.spec is not None]
    return specs


@pytest.fixture
def optimized(fake_table):
    """``optimized(model, *inputs)``: optimize with a table where every conv form takes 1 ns,
    so lifting never depends on how fast this machine runs the loop."""
    def make(model, *inputs, **options):
        table = fake_table(loop_specs(model, *inputs), original_time=1e-9)
        return convrewrite.optimize(model, table=table, **options)
    return make


class Net(nn.Module):
    """A loop between ordinary layers."""

    def __init__(self):
        super().__init__()
        self.pre, self.taps, self.post = nn.Conv1d(4, 4, 3, padding=1), loops.TapLoop(4, 5), nn.Linear(30, 7)

    def forward(self, x):
        return self.post(torch.relu(self.taps(self.pre(x))))


def test_a_loop_inside_a_model_is_lifted_with_equal_outputs_and_gradients(optimized):
    model, x = Net(), torch.randn(2, 4, 30)
    opt = optimized(model, x)
    assert_same_outputs_and_grads(model, opt, x)
    (row,) = [s for s in opt.report if s.pattern == conv_loop.PATTERN]
    assert row.path == "taps" and row.original == "as_written" and row.chosen.startswith("conv_")
    assert opt.state_dict().keys() == model.state_dict().keys()


def test_the_lifted_conv_reads_the_live_parameter(optimized):
    model, x = Net(), torch.randn(2, 4, 30)
    opt = optimized(model, x)
    with torch.no_grad():
        opt(x)
        model.taps.w.mul_(-2)
        torch.testing.assert_close(opt(x), model(x))


@pytest.mark.parametrize("model, inputs", [
    (loops.PerPixel(), (torch.randn(1, 1, 24, 24),)),
    (loops.FullConvolve(), (torch.randn(50, 9), torch.randn(50, 5))),
    (loops.UnfoldMulSum(stride=2, padding=1), (torch.randn(2, 3, 16, 16),)),
])
def test_a_model_that_is_a_loop_is_lifted_whole(optimized, model, inputs):
    opt = optimized(model, *inputs)
    assert_same_outputs_and_grads(model, opt, *inputs)
    assert len(opt.report.rewritten) == 1 and "not traced" in opt.report.note


def test_the_analysis_runs_once_per_signature(optimized):
    calls = []
    model, x = Net(), torch.randn(2, 4, 30)
    model.taps.register_forward_pre_hook(lambda m, a: calls.append(1))
    opt = optimized(model, x)
    opt(x)
    assert "has hooks" in opt.report.sites[0].note  # a hooked module is left as written
    model.taps._forward_pre_hooks.clear()
    opt = optimized(model, x)
    runs = []
    model.taps.forward = lambda x, _f=model.taps.forward: (runs.append(1), _f(x))[1]
    opt(x)
    first = len(runs)
    for _ in range(3):
        opt(x)
    assert first > 1 and len(runs) == first  # analysed on the first call, lifted after it


def test_code_that_is_not_a_convolution_runs_as_written_and_says_why(optimized):
    model, x = nn.Sequential(nn.Identity(), loops.WithRelu()), torch.randn(1, 1, 10, 10)
    opt = optimized(model, x)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    (row,) = opt.report.sites
    assert row.pattern == conv_loop.UNLIFTED and "not a polynomial op" in row.note and not opt.report.rewritten
    assert "relu" in str(convrewrite.explain(model, x))


def test_a_loop_taking_a_non_tensor_argument_is_left_alone(optimized):
    class Taps(loops.TapLoop):
        def forward(self, x, gain):
            return super().forward(x) * gain

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.taps = Taps()

        def forward(self, x, gain):
            return self.taps(x, gain)

    model, x = Outer(), torch.randn(2, 4, 20)
    opt = optimized(model, x, 2.0)
    torch.testing.assert_close(opt(x, 3.0), model(x, 3.0))
    assert "not a tensor" in opt.report.sites[0].note


class CountingUnfold(loops.UnfoldMulSum):
    calls = 0

    def forward(self, x):
        CountingUnfold.calls += 1
        return super().forward(x)


def test_the_analysis_is_reused_across_optimize_calls_until_the_code_changes(optimized):
    model, x = CountingUnfold(stride=1, padding=1), torch.randn(1, 3, 10, 10)
    optimized(model, x)(x)
    first = CountingUnfold.calls
    optimized(model, x)(x)
    # again: 4 traces and 4 annotating runs (3 of them in loop_specs); no analysis, and no call
    # of the model's own forward by the whole-graph check, whose figures the first call kept
    assert first > 20 and CountingUnfold.calls - first == 8
    model.stride = 2  # another convolution now: analysed again, and still equal
    opt = optimized(model, x)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    assert "stride=(2, 2)" in opt.report.sites[0].shape


# -- unrolled loops in graphs --------------------------------------------------------------
def graph_sites(model, *inputs):
    """The conv-loop sites the rule finds in ``model``'s dynamo graphs (under no_grad)."""
    sites = []

    def backend(gm, example_inputs):
        annotate_from_meta(gm)
        sites.extend(conv_loop.find(gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*inputs)
    torch._dynamo.reset()
    return sites


@pytest.mark.parametrize("model, inputs", [
    (loops.PerPixel(), (torch.randn(1, 1, 6, 6),)),
    (loops.FullConvolve(), (torch.randn(5, 9), torch.randn(5, 4))),
    (loops.UnfoldMulSum(stride=2, padding=1), (torch.randn(2, 3, 9, 9),)),
    (loops.UnfoldMatmul(), (torch.randn(2, 3, 8, 8),)),
    (loops.TapLoop(causal=False), (torch.randn(2, 4, 30),)),
    (loops.ChannelsLastTaps(), (torch.randn(2, 11, 3),)),
])
def test_a_loop_dynamo_unrolled_lifts_to_the_convolution_its_module_computes(model, inputs):
    (site,) = graph_sites(model, *inputs)
    from_module = loop_specs(model, *inputs)[0]  # under no_grad
    assert site.spec.key() == from_module.key()
    assert site.pattern == conv_loop.PATTERN and "ops of unrolled code" in site.note


@pytest.mark.parametrize("model, x, spec", [
    (loops.MultiChannelPerPixel(), torch.randn(2, 3, 5, 5), "conv2d [2, 3, 5, 5] * [5, 3, 3, 3] -> [2, 5, 5, 5] float32"),
    (loops.StackedWindows(), torch.randn(2, 6, 20), "conv1d [2, 6, 20] * [4, 6, 3] -> [2, 4, 18] float32"),
])
def test_other_spellings_dynamo_unrolled_are_lifted_with_equal_outputs_and_gradients(model, x, spec):
    (site,) = graph_sites(model, x)
    assert site.spec.describe() == spec
    compiled = torch.compile(model, backend="convrewrite", options={"inner": "eager"})
    assert_same_outputs_and_grads(model, compiled, x)
    torch._dynamo.reset()


@pytest.mark.parametrize("model, x", [
    (loops.OuterProduct(), torch.randn(3, 4)),
    (loops.Scaled(), torch.randn(2, 4, 30)),
    (loops.DataDependent(), torch.randn(2, 4, 30)),
])
def test_unrolled_code_that_is_not_a_convolution_is_not_a_site(model, x):
    assert graph_sites(model, x) == []


class FixedTaps(nn.Module):
    """A tap loop over Python ints (a fixed length), which ``symbolic_trace`` unrolls."""

    def __init__(self, channels=4, k=5, length=30):
        super().__init__()
        self.w = nn.Parameter(torch.randn(channels, k))
        self.k, self.length = k, length

    def forward(self, x):
        xpad = F.pad(x, (self.k - 1, 0))
        y = 0
        for t in range(self.k):
            y = y + self.w[:, t:t + 1] * xpad[..., t:t + self.length]
        return torch.relu(y)


def test_a_loop_that_traced_is_lifted_by_optimize(fake_table):
    model, x = FixedTaps(), torch.randn(2, 4, 30)
    opt = convrewrite.optimize(model, table=fake_table(loop_specs(model, x), original_time=1e-9))
    assert_same_outputs_and_grads(model, opt, x)
    (row,) = opt.report.rewritten
    assert row.pattern == conv_loop.PATTERN and "groups=4" in row.shape


class CausalTaps(FixedTaps):
    """The same loop sliced by the input's own length (``x.shape[-1]``), as a causal depthwise
    conv over time is usually written: fx makes the bounds graph values."""

    def forward(self, x):
        length = x.shape[-1]
        xpad = F.pad(x, (self.k - 1, 0))
        y = 0
        for t in range(self.k):
            y = y + self.w[:, t:t + 1] * xpad[..., t:t + length]
        return y


def test_a_loop_sliced_by_the_inputs_sizes_is_lifted_per_signature(fake_table):
    model, x, longer = CausalTaps(), torch.randn(2, 4, 30), torch.randn(3, 4, 41)
    specs = loop_specs(model, x) + loop_specs(model, longer)
    opt = convrewrite.optimize(model, table=fake_table(specs, original_time=1e-9))
    for inputs in (x, longer, x):
        assert_same_outputs_and_grads(model, opt, inputs)
        (row,) = opt.report_for(inputs.requires_grad_()).rewritten
        assert row.pattern == conv_loop.PATTERN and "groups=4" in row.shape


def test_the_rule_does_not_time_the_code_it_lifts(monkeypatch):
    from convrewrite import measure

    def no_clock(*args, **kwargs):
        raise AssertionError("a finder read the clock")

    for name in ("time_callables", "time_code", "time_forms"):
        monkeypatch.setattr(measure, name, no_clock)
    model, x = CausalTaps(), torch.randn(2, 4, 30)
    gm = capture(model)
    with torch.no_grad():  # timed as inference: the runner returns the code's output
        annotate(gm, (x,))
    fold_sizes(gm)
    (site,) = conv_loop.find(gm)
    assert site.spec is not None and site.from_code and site.source_runner is not None
    with site.source_runner() as run:
        assert run().shape == x.shape


@pytest.mark.parametrize("mode", ["infer", "train-w", "train"])
def test_the_code_is_timed_with_the_gradients_the_model_needs(mode, monkeypatch):
    """The code is timed on operands that require grad as the model's do (``matmul`` takes
    another path for a parameter, even in inference), with a backward only where the model
    records one, and no gradient for a first layer's data."""
    flags, real = [], torch.func.functional_call

    def recorded(module, state, args, *rest, **kwargs):
        flags.append(sorted({t.requires_grad for t in (*state.values(), *args)}))
        return real(module, state, args, *rest, **kwargs)

    monkeypatch.setattr(torch.func, "functional_call", recorded)
    model, x = CausalTaps(), torch.randn(2, 4, 30, requires_grad=mode == "train")
    gm = capture(model)
    with torch.set_grad_enabled(mode != "infer"):
        annotate(gm, (x,))
    fold_sizes(gm)
    (site,) = conv_loop.find(gm)
    with site.source_runner() as run:
        out = run()
    assert site.spec.input_grad == (mode == "train") and site.spec.grad == (mode != "infer")
    assert flags[-1] == ([True] if mode == "train" else [False, True])
    assert isinstance(out, torch.Tensor) if mode == "infer" else len(out) == (2 if mode == "train" else 1)
