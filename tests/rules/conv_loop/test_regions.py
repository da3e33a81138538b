"""Regions of unrolled code in dynamo graphs: what is a candidate for lifting, and what is not."""

import operator
import threading

import pytest
import torch
import torch._dynamo
import torch.nn as nn

from convrewrite.backend import annotate_from_meta
from convrewrite.rules.conv_loop import regions
from tests import loops


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def dynamo_regions(model, *inputs) -> tuple[list[regions.Region], torch.fx.GraphModule]:
    """The candidate regions of ``model``'s (one) dynamo graph."""
    found = []

    def backend(gm, example_inputs):
        annotate_from_meta(gm)
        found.append((regions.candidates(gm), gm))
        return gm.forward

    torch.compile(model, backend=backend)(*inputs)
    (result,) = found
    return result


def names(nodes) -> list[str]:
    return [n.name for n in nodes]


class Residual(nn.Module):
    """A tap loop under a residual add and a scale, in the parent's code."""

    def __init__(self):
        super().__init__()
        self.taps = loops.TapLoop(4, 5)

    def forward(self, x):
        return x + 0.5 * self.taps(x)


class WritesItsInput(loops.TapLoop):
    """A tap loop that also scales its input in place."""

    def forward(self, x):
        y = super().forward(x)
        x.mul_(2)
        return y


class ChangesItsInputMidway(nn.Module):
    """Two taps with an in-place ReLU of the data between them."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))

    def forward(self, x):
        y = self.w[0] * x[..., :-1]
        x.relu_()
        return y + self.w[1] * x[..., 1:]


class ReadsBeforeDone(nn.Module):
    """Reads its output buffer (through a ReLU) between two writes to it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))

    def forward(self, x):
        out = torch.zeros_like(x)
        out[..., 1:] = self.w[0] * x[..., :-1]
        seen = torch.relu(out)
        out[..., :-1] += self.w[1] * x[..., 1:]
        return out, seen


def test_a_tap_loop_is_one_region_of_its_data_and_weight():
    model = loops.TapLoop(4, 5)
    (region,), gm = dynamo_regions(model, torch.randn(2, 4, 30))
    assert sorted(names(region.inputs)) == ["l_self_parameters_w_", "l_x_"]
    assert region.output is list(gm.graph.nodes)[-1].args[0][0]
    # the per-tap slices of the weight are in it, though the partitioner takes them for a tuple's
    assert sum(n.target.__name__ == "getitem" for n in region.nodes) == 10


def test_a_per_pixel_loop_writing_into_a_buffer_is_one_region_ending_in_the_buffer():
    (region,), _ = dynamo_regions(loops.PerPixel(), torch.randn(1, 1, 5, 5))
    assert region.output.target is torch.zeros
    assert len(region.nodes) == 2 + 4 * 25  # pad, zeros, and slice, multiply, sum, write per pixel


def test_a_loop_module_under_parent_ops_is_also_a_region_of_its_own():
    found, _ = dynamo_regions(Residual(), torch.randn(2, 4, 30))
    whole, part = found
    assert len(part.nodes) < len(whole.nodes) and set(part.nodes) < set(whole.nodes)
    assert regions.path(part).startswith("taps:")


@pytest.mark.parametrize("model", [WritesItsInput(3, 2), ChangesItsInputMidway(), ReadsBeforeDone()])
def test_code_that_writes_to_its_inputs_or_reads_a_half_written_buffer_is_not_a_region(model):
    found, _ = dynamo_regions(model, torch.randn(2, 3, 8))
    assert found == []


def test_integer_data_and_huge_tensors_are_not_regions(monkeypatch):
    assert dynamo_regions(loops.TapLoop(4, 5), torch.randint(0, 9, (2, 4, 30)))[0] == []
    torch._dynamo.reset()
    monkeypatch.setattr(regions, "MAX_ELEMENTS", 2 * 4 * 30 - 1)
    assert dynamo_regions(loops.TapLoop(4, 5), torch.randn(2, 4, 30))[0] == []


def test_as_module_computes_what_the_region_does_and_leaves_the_graph_alone():
    model, x = loops.PerPixel(), torch.randn(1, 1, 5, 5)
    (region,), gm = dynamo_regions(model, x)
    before = str(gm.graph)
    module, inputs = regions.as_module(gm, region)
    values = {"l_x_": x, "l_self_parameters_weight_": model.weight}
    torch.testing.assert_close(module(*(values[n.name] for n in inputs)), model(x))
    assert str(gm.graph) == before


class Positions(nn.Module):
    """A table read at positions that a polynomial op made, as Whisper's decoder reads its embeddings."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))

    def forward(self, ids):
        return self.table[ids.unsqueeze(0).repeat(2, 1)] * 2


def test_a_getitem_that_reads_two_partitions_does_not_hang_the_partitioner():
    # torch's partitioner moves a getitem into the partition of what it reads: back and forth
    # forever when it reads a node in a partition (the positions) and one in none (the table)
    found = []
    worker = threading.Thread(target=lambda: found.append(dynamo_regions(Positions(), torch.arange(3))), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "candidates() did not return"
    (candidates, gm), = found
    assert any(n.target is operator.getitem and len(n.all_input_nodes) == 2 for n in gm.graph.nodes)
    assert candidates == []  # one tensor read, nothing that computes a convolution


class ReturnsItsInput(nn.Module):
    def forward(self, x):
        return x


def test_a_graph_of_no_ops_has_no_regions():
    gm = torch.fx.symbolic_trace(ReturnsItsInput())  # a copy of it without the output node had no code
    assert regions.candidates(gm) == []
