"""optimize() and explain(): semantics of the optimized module, with choices from fake tables."""

import collections
import copy
import dataclasses
import io
import pickle
import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

import convrewrite
from convrewrite.emit import site_calls
from convrewrite.forms import unregister_form
from convrewrite.kinds.channel_mix.forms import conv
from convrewrite.module import ConvRewriteModule

from .helpers import assert_same_outputs_and_grads
from .test_capture import Counting, RunningMean, Scaled


class PointNetish(nn.Module):
    """Pointwise convs of every flavour, with distractors around them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 16, 1)
        self.bn = nn.BatchNorm1d(16)
        self.b = nn.Conv1d(16, 32, 1, groups=4, bias=False)
        self.k3 = nn.Conv1d(32, 32, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.w = nn.Parameter(torch.randn(8, 32, 1) * 0.1)

    def forward(self, x):
        y = self.drop(torch.relu(self.bn(self.a(x))))
        y = self.k3(self.b(y))
        return F.conv1d(y, self.w, stride=2)


def specs_of(model, x):
    return [s.spec for s in _sites(model, x)]


def _sites(model, x):
    from convrewrite.capture import annotate, capture
    from convrewrite.rules import find_sites
    gm = capture(model)
    annotate(gm, (x,))
    return find_sites(gm)


@pytest.fixture
def model_and_table(fake_table):
    torch.manual_seed(0)
    model, x = PointNetish().eval(), torch.randn(4, 3, 50)
    with torch.no_grad():
        infer = specs_of(model, x)
    train = specs_of(model.train(), x)
    return model.eval(), x, fake_table(infer + train, winner="matmul")


def site_forms(optimized, *inputs):
    gm = optimized.graph_module(*inputs)
    return [c.form.name for c in site_calls(gm)]


def test_rewrites_every_site_to_the_table_winner(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        torch.testing.assert_close(opt(x), model(x))
        assert site_forms(opt, x) == ["matmul"] * 3
        report = opt.report
    assert [s.chosen for s in report] == ["matmul"] * 3 and all(s.source == "table" for s in report)
    assert "3 of 3 site(s) rewritten" in str(report)


def test_outputs_and_gradients_match_in_training(model_and_table):
    model, x, table = model_and_table
    model.train()
    opt = convrewrite.optimize(model, table=table)
    torch.manual_seed(1)
    model.drop.p = 0.0  # dropout masks would differ between the two runs
    assert_same_outputs_and_grads(model, opt, x)
    assert site_forms(opt, x) == ["matmul"] * 3


def test_parameters_are_shared_and_state_dict_unchanged(model_and_table):
    model, x, table = model_and_table
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = convrewrite.optimize(model, x, table=table)
    assert list(opt.state_dict()) == list(before)
    assert all(torch.equal(opt.state_dict()[k], v) for k, v in before.items())
    assert all(p is q for p, q in zip(opt.parameters(), model.parameters()))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # an optimizer over the original trains both
    opt(x).sum().backward()
    sgd.step()
    assert not torch.equal(model.a.weight, before["a.weight"])
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


def test_state_dict_loads_into_both_classes(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    fresh = PointNetish()
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    opt2 = convrewrite.optimize(PointNetish(), table=table)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))
        torch.testing.assert_close(opt2.eval()(x), model(x))


def test_train_and_eval_reach_the_original(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    opt.train()
    assert model.training and model.bn.training
    opt.eval()
    assert not model.training and not model.bn.training and not opt.training


def test_specialises_per_signature(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    with torch.no_grad():
        for inp in (x, torch.randn(2, 3, 17), torch.randn(4, 3, 50), torch.randn(2, 3, 17)):
            torch.testing.assert_close(opt(inp), model(inp))
    assert len(opt._state.specs) == 2
    opt(x)  # grad mode on: a new signature
    assert len(opt._state.specs) == 3


def test_report_for_names_the_specialisation_a_call_runs(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    small = torch.randn(2, 3, 17)
    assert opt.report_for(x) is None and opt.reports == []
    with torch.no_grad():
        opt(x), opt(small), opt(x)
        assert opt.report_for(x).signature != opt.report_for(small).signature
        assert "50" in opt.report_for(x).signature and "17" in opt.report_for(small).signature
        assert [r.signature for r in opt.reports] == [opt.report_for(x).signature, opt.report_for(small).signature]
    assert opt.report_for(x) is None  # grad mode on: not specialised yet


def test_to_dtype_respecialises(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, x, table=table)
    opt.double()
    assert model.a.weight.dtype == torch.float64 and not opt._state.specs
    with torch.no_grad():
        torch.testing.assert_close(opt(x.double()), model(x.double()))


def test_user_module_keeps_working(model_and_table):
    model, x, table = model_and_table
    with torch.no_grad():
        ref = model(x)
        opt = convrewrite.optimize(model, x, table=table)
        opt(x)
        torch.testing.assert_close(model(x), ref)
    assert type(model) is PointNetish and not isinstance(model, ConvRewriteModule)


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        convrewrite.optimize(lambda x: x)


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="valid options"):
        convrewrite.optimize(nn.Conv1d(1, 1, 1), marginn=2)


def test_options_may_be_given_as_an_options_object():
    optimized = convrewrite.optimize(nn.Conv1d(4, 8, 1), convrewrite.Options(measure=False, margin=1.5))
    assert optimized.options == convrewrite.Options(measure=False, margin=1.5)
    x = torch.randn(2, 4, 5)
    assert optimized(x).shape == (2, 8, 5) and optimized.report_for(x) is not None
    with pytest.raises(TypeError, match="not both"):
        convrewrite.optimize(nn.Conv1d(4, 8, 1), convrewrite.Options(), margin=2)


def test_verify_reverts_a_wrong_form(model_and_table, fake_table):
    model, x, _ = model_and_table

    @convrewrite.register_form("channel_mix", "test_wrong")
    def wrong(x, w, b, *, spec):
        return conv(x, w, b, spec=spec) * 1.01

    try:
        with torch.no_grad():
            table = fake_table(specs_of(model, x), winner="test_wrong")
            opt = convrewrite.optimize(model, table=table)
            torch.testing.assert_close(opt(x), model(x))
            torch.testing.assert_close(opt(x), model(x))
        assert all(s.chosen == "conv" and "differs" in s.note for s in opt.report)
    finally:
        unregister_form("channel_mix", "test_wrong")


def test_explain_reports_every_site(model_and_table):
    model, x, table = model_and_table
    with torch.no_grad():
        report = convrewrite.explain(model, x, table=table)
    assert [s.path for s in report] == ["a", "b", "conv1d"]
    assert all(s.t_original and s.t_chosen and s.t_original > s.t_chosen for s in report)
    text = str(report)
    for word in ("site", "chosen", "matmul", "[4,3,50]->16"):
        assert word in text


def test_deepcopy_and_pickle(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, x, table=table)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.original is not model and clone.a.weight is clone.original.a.weight
        with torch.no_grad():
            torch.testing.assert_close(clone(x), model(x))
            torch.testing.assert_close(clone(x), model(x))


def test_concurrent_first_calls_specialise_once(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    outs, barrier = [], threading.Barrier(4)

    def call():
        barrier.wait()
        with torch.no_grad():
            outs.append(opt(x))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opt._state.specs) == 1 and len(outs) == 4
    with torch.no_grad():
        for out in outs:
            torch.testing.assert_close(out, model(x))


def test_inference_mode_and_keyword_inputs(model_and_table):
    model, x, table = model_and_table

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, scale=1.0):
            return self.inner(x) * scale

    opt = convrewrite.optimize(Kw(), table=table)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(opt(x, scale=2.0), model(x) * 2.0)
            torch.testing.assert_close(opt(x=x), model(x))


# -- models written the way users write them -------------------------------------------------
class StochasticDepth(nn.Module):
    """Reads self.training in Python, like timm's DropPath."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            return y * 0.0
        return y


def test_python_reads_of_training_follow_train_and_eval(fake_table):
    model, x = StochasticDepth(), torch.randn(2, 4, 6)
    opt = convrewrite.optimize(model)
    with torch.no_grad():
        for mode in (True, False, True, False):
            opt.train(mode)
            torch.testing.assert_close(opt(x), model(x))
            torch.testing.assert_close(opt(x), model(x))
        model.train()  # switching the original itself counts too
        torch.testing.assert_close(opt(x), torch.zeros(2, 4, 6))


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x, mask=None, residual: bool = False, scale: float = 1.0):
        y = self.conv(x) * scale
        if mask is not None:
            y = y * mask
        if residual:
            y = y + x
        return y


def test_none_bool_and_float_arguments():
    model, x = Masked(), torch.randn(2, 4, 6)
    opt = convrewrite.optimize(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for kwargs in ({}, {"mask": torch.ones(1, 1, 6)}, {"residual": True}, {"mask": None, "residual": True}, {}):
            torch.testing.assert_close(opt(x, **kwargs), model(x, **kwargs))
            torch.testing.assert_close(opt(x, **kwargs), model(x, **kwargs))
        n = len(opt._state.specs)
        for t in (0.1, 0.2, 0.3):  # a float (a diffusion timestep, say) must not re-specialise
            torch.testing.assert_close(opt(x, scale=t), model(x, scale=t))
        assert len(opt._state.specs) == n


def test_reassigned_parameters_and_submodules_are_used(fake_table):
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, 1))
            self.block = nn.Sequential(nn.Conv1d(4, 4, 1))

        def forward(self, x):
            return self.block(F.conv1d(x, self.w))

    model, x = Nested(), torch.randn(2, 4, 6)
    opt = convrewrite.optimize(model)
    with torch.no_grad():
        opt(x)
        opt(x)
        model.w = nn.Parameter(torch.randn(4, 4, 1))
        torch.testing.assert_close(opt(x), model(x))
        model.block[0] = nn.Conv1d(4, 4, 1)
        torch.testing.assert_close(opt(x), model(x))
        opt.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()}, assign=True)
        torch.testing.assert_close(opt(x), model(x))


def test_hooks_run(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    with torch.no_grad():
        opt(x)
        opt(x)
        handle = model.a.register_forward_hook(lambda m, i, o: o * 0)  # on a rewritten conv, after specialising
        torch.testing.assert_close(opt(x), model(x))
        handle.remove()
        calls = []
        model.register_forward_pre_hook(lambda m, i: calls.append(1))  # on the root
        torch.testing.assert_close(opt(x), model(x))
        assert len(calls) == 2


def test_hooks_on_the_optimized_module_and_global_hooks_run_once(model_and_table):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    calls = []
    with torch.no_grad():
        opt(x)
        own = opt.register_forward_hook(lambda m, i, o: calls.append("own"))
        every = nn_module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
        try:
            torch.testing.assert_close(opt(x), model(x))
        finally:
            own.remove()
            every.remove()
    assert calls.count("own") == 1 and calls.count("ConvRewriteModule") == 1


class GeneralDispatch(Exception):
    pass


def general_dispatch(*args):
    raise GeneralDispatch


@pytest.mark.parametrize("grad", [False, True])
def test_a_one_tensor_call_after_the_first_is_dispatched_without_the_general_path(model_and_table, monkeypatch, grad):
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    with torch.set_grad_enabled(grad):
        opt(x)
        monkeypatch.setattr(type(opt), "_dispatch", general_dispatch)
        torch.testing.assert_close(opt(x), model(x))
        with pytest.raises(GeneralDispatch):  # a new signature goes the general way
            opt(x[:2])


@pytest.mark.parametrize("trace", ["torch.compile", "Module.compile", "jit.trace"])
def test_traced_or_compiled_first_calls_run_the_original(trace):
    model, x = nn.Sequential(nn.Conv1d(4, 4, 1), nn.ReLU()), torch.randn(2, 4, 6)
    opt = convrewrite.optimize(model)
    if trace == "torch.compile":
        run = torch.compile(opt, backend="eager")
    elif trace == "Module.compile":
        opt.compile(backend="eager")
        run = opt
    else:
        run = torch.jit.trace(opt, x, check_trace=False)  # the check would call opt outside the trace
    torch.testing.assert_close(run(x), model(x))
    assert opt.report is None  # nothing was specialised inside the trace


def test_parametrized_weights_give_no_warning_and_train():
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 1))
    model, x = nn.Sequential(conv), torch.randn(2, 4, 6)
    opt = convrewrite.optimize(model, forms=("matmul",), measure=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_outputs_and_grads(model, opt, x, calls=3)


def test_original_attributes_methods_and_indexing_stay_reachable():
    class WithApi(nn.Sequential):
        num_classes = 10

        def encode(self, x):
            return self[0](x)

    model = WithApi(nn.Conv1d(2, 2, 1))
    opt = convrewrite.optimize(model)
    x = torch.randn(1, 2, 3)
    assert opt.num_classes == 10 and opt[0] is model[0] and len(opt) == 1 and list(opt) == [model[0]]
    torch.testing.assert_close(opt.encode(x), model.encode(x))
    with pytest.raises(AttributeError):
        opt.no_such_attribute


def test_an_optimized_module_is_true_as_its_original_is():
    assert convrewrite.optimize(nn.Conv1d(2, 2, 1))  # a module without __len__: `if model:` holds
    assert not convrewrite.optimize(nn.Sequential())


@pytest.mark.parametrize("bad, error", [
    (dict(forms=("matmull",)), "unknown form name"), (dict(forms="baddbmm"), "sequence of form names"),
    (dict(table="/no/such/table.json"), "no cost-table file"), (dict(margin=True), "margin must be"),
])
def test_bad_options_are_refused(bad, error):
    with pytest.raises((TypeError, ValueError, FileNotFoundError), match=error):
        convrewrite.optimize(nn.Conv1d(1, 1, 1), **bad)


def test_measuring_with_restricted_forms_still_times_every_form(isolated_cache):
    from convrewrite.table import GRAPH_KEY, CostTable, user_table_path
    model, x = nn.Conv1d(4, 8, 1), torch.randn(2, 4, 16)
    with torch.no_grad():
        convrewrite.optimize(model, x, forms=("linear",), measure=True)
    entries = CostTable.read(user_table_path("cpu")).entries
    (times,) = [t for key, t in entries.items() if not key.startswith(GRAPH_KEY)]  # the whole-model check's too
    assert {"conv", "matmul", "baddbmm", "linear", "addmm"} <= set(times)


# -- layout chains end to end (chains are measured at specialisation, never predicted) ---------
from .rules.test_layout_chain import (  # noqa: E402
    ConvFFN,
    ConvNeXtBlock,
    FeatureProjection,
    PatchTokens,
    Regrouped,
    Seed000,
    UsedTwice,
)


class ChainOut(nn.Module):
    """A chain the model returns: its permute back makes a channels-last view, which the
    caller gets whatever form computes it."""

    def __init__(self):
        super().__init__()
        self.norm, self.mix = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.mix(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


@pytest.mark.parametrize("model, x", [(Seed000(), torch.randn(8, 8, 33)), (ConvFFN(), torch.randn(4, 9, 8)),
                                      (ConvNeXtBlock(), torch.randn(2, 8, 6, 6)), (UsedTwice(), torch.randn(2, 4, 5)),
                                      (FeatureProjection(), torch.randn(2, 8, 6)), (PatchTokens(), torch.randn(2, 8, 3, 3)),
                                      (ChainOut(), torch.randn(2, 8, 3, 3))])
def test_chains_keep_outputs_and_gradients(model, x):
    opt = convrewrite.optimize(model)
    assert_same_outputs_and_grads(model, opt, x)
    with torch.no_grad():
        got, expected = opt(x), model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.stride() == expected.stride()  # the layout the model as written returns
    chains = [s for s in opt.report if s.pattern == "layout chain"]
    assert len(chains) == 1
    assert all(s.source == "measured" and s.t_original for s in chains)
    assert len(opt.report.rewritten) == len(chains)


Pair = collections.namedtuple("Pair", "out aux")


@dataclasses.dataclass
class Out:
    out: torch.Tensor


@pytest.mark.parametrize("wrap", [lambda y: {"out": y}, lambda y: [y], lambda y: Pair(y, None), Out],
                         ids=["dict", "list", "namedtuple", "dataclass"])
def test_a_chain_returned_inside_a_container_keeps_its_layout(wrap):
    class Wrapped(nn.Module):
        """A pointwise conv, then a chain whose permute back makes the sum channels-last."""

        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.mix = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.Linear(6, 6)

        def forward(self, x):
            y = self.bn(self.conv(x)).relu()
            return wrap(self.mix(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x)

    model, x = Wrapped().eval(), torch.randn(2, 6, 3, 5, requires_grad=True)
    optimized = convrewrite.optimize(model)
    optimized(x)  # the first call's output is the captured graph's, as written
    got, expected = optimized(x), model(x)
    assert type(got) is type(expected)
    got, expected = (o["out"] if isinstance(o, dict) else o[0] if isinstance(o, list) else o.out for o in (got, expected))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.stride() == expected.stride()


def test_forced_chain_rewrite_removes_the_permutes(fake_table, tmp_path):
    from convrewrite.table import CostTable, fingerprint
    model, x = ConvNeXtBlock(), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        (site,) = [s for s in convrewrite.explain(model, x) if s.pattern == "layout chain"]
    table = CostTable(fingerprint("cpu"), profiled=True)
    table.add(site.key, {"as_written": 2.0, "channels_first_matmul": 1.0, "channels_first_conv": 3.0}, {})
    table.write(tmp_path / "t.json")
    opt = convrewrite.optimize(model, table=tmp_path / "t.json")
    with torch.no_grad():
        opt(x)
        gm = opt.graph_module(x)
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
    assert not [n for n in gm.graph.nodes if n.target == "permute"]
    (chain,) = [s for s in opt.report if s.pattern == "layout chain"]
    assert chain.chosen == "channels_first_matmul" and "removes 2 permutes" in chain.note


def test_a_table_file_written_again_is_read_again(tmp_path):
    from convrewrite.table import CostTable, fingerprint
    model, x = Seed000(), torch.randn(2, 8, 5)
    with torch.no_grad():
        (site,) = convrewrite.explain(model, x, measure=False)
    chosen = []
    for winner in ("channels_first_conv", "channels_first_matmul"):
        table = CostTable(fingerprint("cpu"), profiled=True)
        table.add(site.key, {"as_written": 2.0, "channels_first_conv": 3.0, "channels_first_matmul": 3.0, winner: 1.0}, {})
        table.write(tmp_path / "t.json", merge=False)
        opt = convrewrite.optimize(model, table=tmp_path / "t.json")
        with torch.no_grad():
            opt(x)
        chosen += [s.chosen for s in opt.report]
    assert chosen == ["channels_first_conv", "channels_first_matmul"]


@pytest.mark.parametrize("form", ["channels_first_conv", "channels_first_matmul"])  # the input is not channels-last
def test_a_chain_with_regrouped_pixels_is_rewritten_exactly(form, tmp_path):
    from convrewrite.forms import registered_names
    from convrewrite.table import CostTable, fingerprint
    model = Regrouped(lambda x, n, h, w: x.permute(0, 2, 3, 1).reshape(n, h * w, -1),
                      lambda y, n, h, w: y.reshape(n, h, w, -1).permute(0, 3, 1, 2))
    x = torch.randn(2, 4, 3, 5)
    table = CostTable(fingerprint("cpu"), profiled=True)
    for grad, xi in ((False, x), (True, x.clone().requires_grad_()), (True, x)):
        with torch.set_grad_enabled(grad):
            (site,) = convrewrite.explain(model, xi, measure=False)
        table.add(site.key, {**dict.fromkeys(registered_names("layout_chain"), 3.0), "as_written": 2.0, form: 1.0}, {})
    table.write(tmp_path / "t.json")
    opt = convrewrite.optimize(model, table=tmp_path / "t.json")
    assert_same_outputs_and_grads(model, opt, x)
    assert [s.chosen for s in opt.report] == [form]
    assert not [n for n in opt.graph_module(x).graph.nodes if n.target in ("reshape", "permute")]


def test_specialising_leaves_the_global_random_stream_alone():
    model, x = nn.Sequential(nn.Conv1d(4, 8, 1), nn.Dropout(0.5), nn.Conv1d(8, 8, 1)), torch.randn(2, 4, 16)
    opt = convrewrite.optimize(model, measure=True)  # measures and verifies on its first call
    torch.manual_seed(0)
    with torch.no_grad():
        out = opt(x)
    after = torch.rand(4)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(after, torch.rand(4))


def test_a_call_in_another_thread_while_fx_traces_still_specialises(model_and_table, monkeypatch):
    """fx's tracing flag is process-wide: while one thread captures, a call in another thread
    (real tensors, not Proxies) must specialise as usual, not run the original through fx's
    patched nn.Module (the tracer would record it)."""
    model, x, table = model_and_table
    opt = convrewrite.optimize(model, table=table)
    monkeypatch.setattr(convrewrite.module, "_fx_tracing", lambda: True)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    assert len(opt._state.specs) == 1


class CountingThenBranching(Counting):
    """Counts its calls, then branches on the data: fx counts once and fails after."""

    def forward(self, x):
        self.calls += 1
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


@pytest.mark.parametrize("make", [Counting, CountingThenBranching, RunningMean, Scaled,
                                  lambda: Scaled(lambda: torch.autocast("cpu", torch.bfloat16))],
                         ids=["buffer changed in place", "fx fails after", "buffer assigned", "no_grad", "autocast"])
def test_a_model_changing_its_buffers_or_modes_in_forward_runs_as_written(make):
    torch.manual_seed(0)
    model = make().train()
    reference = copy.deepcopy(model)
    optimized = convrewrite.optimize(model)
    for _ in range(3):
        x = torch.randn(2, 3, 4, 4)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, got = reference(xr), optimized(xo)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), xo), torch.autograd.grad(want.sum(), xr))
        for (name, buffer), expected in zip(model.named_buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(buffer, expected, msg=name)
            assert buffer.grad_fn is None and not buffer.requires_grad
    assert optimized.report.rewritten and "not traced by fx" in optimized.report.note


def test_calls_under_autocast_run_the_original_and_other_calls_keep_their_rewrite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    optimized, x = convrewrite.optimize(model, forms=["matmul"]), torch.randn(2, 4, 6, 5)
    torch.testing.assert_close(optimized(x), model(x))
    assert optimized.report.rewritten
    with torch.autocast("cpu", torch.bfloat16):
        with pytest.warns(UserWarning, match="torch.autocast run the original"):
            got = optimized(x)
        torch.testing.assert_close(got, model(x))  # bfloat16, as the original's
        assert "torch.autocast" in optimized.report_for(x).note and not optimized.report_for(x).rewritten
    torch.testing.assert_close(optimized(x), model(x))
    assert optimized.report_for(x).rewritten


def test_untraceable_code_analysed_and_kept_as_written_gives_no_warning(clock):
    class TapLoop(nn.Module):
        """A causal depthwise conv as a loop over taps, their number read from the weight."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8))

        def forward(self, x):
            steps, taps = x.shape[1], self.w.shape[0]  # range() of a Proxy: fx fails
            padded = F.pad(x, (0, 0, taps - 1, 0))
            return sum(self.w[t] * padded[:, t:t + steps] for t in range(taps))

    clock.seconds = lambda spec, name: 1.0  # every form slower than the loop as written
    model, x = TapLoop(), torch.randn(2, 16, 8)
    optimized = convrewrite.optimize(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(optimized(x), model(x))
    assert optimized.report.sites and not optimized.report.rewritten
    assert "not traced: torch.fx.symbolic_trace failed" in optimized.report.note


def test_each_sites_shape_in_the_report_names_the_mode_its_figures_are_for():
    model, x = nn.Sequential(nn.Conv1d(4, 8, 1), nn.ReLU(), nn.Conv1d(8, 4, 1)), torch.randn(2, 4, 6)
    optimized = convrewrite.optimize(model)
    with torch.no_grad():
        optimized(x)
        assert [s.shape.split()[-1] for s in optimized.report_for(x)] == ["infer", "infer"]
    optimized(x)  # the first layer's input needs no gradient: its weights' alone
    assert [s.shape.split()[-1] for s in optimized.report_for(x)] == ["train-w", "train"]
