"""rewrite_exported: a torch.export program in, an equal one out, with the chosen forms as ATen ops.

AOTInductor compiling, loading and running a rewritten program: tests/test_package.py runs
examples/export_aoti.py in its own process (a package loaded into this one outlives the test).
"""

import dataclasses

import pytest
import torch
import torch.nn as nn

from convrewrite.capture import annotate, capture
from convrewrite.export import rewrite_exported
from convrewrite.rules import find_sites

ATEN_CONV1D = torch.ops.aten.conv1d.default


class ConvThenLinear(nn.Module):
    """A pointwise conv, then a Linear between transposes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.linear = nn.Conv1d(8, 16, 1), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.linear(torch.relu(self.norm(self.conv(x))).transpose(1, 2)).transpose(1, 2)


def forcing(fake_table, model, x, executor, winner="matmul"):
    """A table where ``winner`` is fastest for every site of ``model`` run by ``executor``, in
    inference (what rewrite_exported decides for)."""
    gm = capture(model)
    with torch.no_grad():
        annotate(gm, (x,))
    return str(fake_table([dataclasses.replace(s.spec, executor=executor) for s in find_sites(gm)], winner=winner))


def conv_ops(ep) -> list:
    return [n for n in ep.graph.nodes if n.target is ATEN_CONV1D]


@pytest.mark.parametrize("executor", ["inductor", "eager"])
def test_the_chosen_form_replaces_the_aten_conv_and_the_program_stays_equal(fake_table, executor):
    model, x = ConvThenLinear().eval(), torch.randn(2, 8, 12)
    ep = torch.export.export(model, (x,))
    new, report = rewrite_exported(ep, executor=executor, table=forcing(fake_table, model, x, executor))
    assert [s.chosen for s in report.rewritten] == ["matmul"] and conv_ops(ep) and not conv_ops(new)
    torch.testing.assert_close(new.module()(x), model(x))
    assert new.state_dict.keys() == ep.state_dict.keys()
    assert new.graph_signature.buffers == ep.graph_signature.buffers


def test_sites_are_decided_for_inference_whatever_the_callers_grad_mode(fake_table):
    model, x = ConvThenLinear().eval(), torch.randn(2, 8, 12)
    ep = torch.export.export(model, (x,))
    assert torch.is_grad_enabled()
    _, report = rewrite_exported(ep, table=forcing(fake_table, model, x, "inductor"))
    assert len(report) == 2 and all("|infer|" in s.key for s in report) and report.rewritten


def test_nothing_faster_returns_the_same_program(fake_table):
    model, x = ConvThenLinear().eval(), torch.randn(2, 8, 12)
    ep = torch.export.export(model, (x,))
    new, report = rewrite_exported(ep, table=forcing(fake_table, model, x, "inductor", winner=None))
    assert new is ep and len(report) == 2 and not report.rewritten


@pytest.mark.parametrize("check", [True, False])
def test_a_rewritten_program_slower_as_a_whole_is_not_returned_unless_unchecked(fake_table, check_times, check):
    check_times.result = {"original": 1e-3, "rewritten": 2e-3}
    model, x = ConvThenLinear().eval(), torch.randn(2, 8, 12)
    ep = torch.export.export(model, (x,))
    new, report = rewrite_exported(ep, executor="eager", check=check, table=forcing(fake_table, model, x, "eager"))
    if check:
        assert new is ep and not report.rewritten and "2.000 ms rewritten, 1.000 ms as exported" in report.note
    else:
        assert new is not ep and report.rewritten and not conv_ops(new)


def test_a_program_with_dynamic_dimensions_is_returned_as_it_is():
    model, x = ConvThenLinear().eval(), torch.randn(2, 8, 12)
    ep = torch.export.export(model, (x,), dynamic_shapes=({2: torch.export.Dim("length", min=2)},))
    new, report = rewrite_exported(ep)
    assert new is ep and "dynamic dimensions" in report.note


def test_bad_arguments_are_clear_errors():
    ep = torch.export.export(ConvThenLinear().eval(), (torch.randn(2, 8, 12),))
    with pytest.raises(ValueError, match="executor must be one of"):
        rewrite_exported(ep, executor="tensorrt")
    with pytest.raises(TypeError, match="unknown convrewrite option"):
        rewrite_exported(ep, marjin=1.2)


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's block as transformers writes it: permute, LayerNorm, Linear, GELU, Linear,
    a layer scale, permute back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.up, self.down = nn.LayerNorm(8, eps=1e-6), nn.Linear(8, 32), nn.Linear(32, 8)
        self.scale = nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x):
        y = self.down(nn.functional.gelu(self.up(self.norm(x.permute(0, 2, 3, 1)))))
        return x + (self.scale * y).permute(0, 3, 1, 2)


def test_a_layout_chain_of_aten_ops_is_found_and_stays_equal():
    model, x = ChannelsLastBlock().eval(), torch.randn(2, 8, 5, 5)
    ep = torch.export.export(model, (x,))
    new, report = rewrite_exported(ep, executor="eager", measure=True)
    assert [s.pattern for s in report] == ["layout chain"]
    torch.testing.assert_close(new.module()(x), model(x), rtol=1e-4, atol=1e-5)
