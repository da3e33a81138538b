import collections

import pytest
import torch
import torch.nn as nn

import convrewrite
from convrewrite.capture import (META, OPAQUE, ROOT, SECONDS, SIZE, CaptureError, annotate, capture, fold_sizes, info,
                                 opaque_root)
from convrewrite.spec import CHANNELS_LAST

from .helpers import assert_same_outputs_and_grads


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, scale=2.0):
        return self.conv(x) * scale


def test_annotate_records_every_tensor_and_returns_the_output():
    model = Model()
    gm = capture(model)
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    out = annotate(gm, (x, 3.0))
    torch.testing.assert_close(out, model(x, 3.0))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    meta = info(conv)
    assert meta.shape == (2, 4, 5, 5) and meta.dtype == torch.float32 and meta.device.type == "cpu"
    assert info(conv.args[0]).layout == CHANNELS_LAST and meta.requires_grad


def test_graph_shares_the_module_parameters():
    model = Model()
    assert capture(model).conv.weight is model.conv.weight


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_root_is_one_opaque_call():
    gm = capture(Branchy())
    (call,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert call.target == ROOT and "symbolic_trace failed" in opaque_root(gm)
    x = torch.randn(3, 4)
    torch.testing.assert_close(annotate(gm, (x,)), Branchy()(x))
    assert call.meta[SECONDS] > 0 and info(call).shape == (3, 4)


def test_untraceable_submodule_is_an_opaque_leaf_and_the_rest_is_traced():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.inner = nn.Conv1d(3, 3, 1), nn.Sequential(nn.ReLU(), Branchy())

        def forward(self, x):
            return self.inner(self.conv(x)) * 2

    gm = capture(Outer())
    opaque = [n.target for n in gm.graph.nodes if OPAQUE in n.meta]
    assert opaque == ["inner.1"] and opaque_root(gm) is None
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "inner.0", "inner.1"]


def test_variadic_untraceable_root_raises_capture_error():
    class Variadic(nn.Module):
        def forward(self, *xs):
            return xs[0] if xs[0].sum() > 0 else -xs[0]

    with pytest.raises(CaptureError, match="symbolic_trace failed"):
        capture(Variadic())


def test_non_tensor_nodes_are_not_annotated():
    gm = capture(Model())
    annotate(gm, (torch.randn(1, 3, 2, 2), 2.0))
    scale = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "scale")
    assert META not in scale.meta and info(None) is None


def test_a_submodule_that_calls_unfold_is_kept_whole_for_lifting():
    class Patches(nn.Module):
        def forward(self, x):
            return x.unfold(2, 3, 1).sum(-1)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.patches, self.conv = Patches(), nn.Conv1d(2, 2, 1)

        def forward(self, x):
            return self.conv(self.patches(x)) + x.sum()

    gm = capture(Outer())
    assert [n.target for n in gm.graph.nodes if OPAQUE in n.meta] == ["patches"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["sum"]


class CachesBias(nn.Module):
    """Caches a tensor computed from a parameter in a dict keyed by device, as timm's LeViT
    caches its attention bias."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(4, 4, 1)
        self.bias_table = nn.Parameter(torch.randn(4))
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias_table * 2
        return self.proj(x) + self.cache[key][:, None, None]


def test_tracing_leaves_nothing_in_the_module():
    model = CachesBias()
    attrs = set(vars(model))
    capture(model)
    assert model.cache == {} and set(vars(model)) == attrs


def test_a_module_that_caches_is_optimized_twice_and_stays_equal():
    model, x = CachesBias().eval(), torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        expected = CachesBias.forward(model, x)
        model.cache.clear()
        for _ in range(2):
            torch.testing.assert_close(convrewrite.optimize(model)(x), expected)
    assert all(type(v) is torch.Tensor for v in model.cache.values())


class TensorConstant(nn.Module):
    """A tensor made in forward from Python values: fx keeps it as a constant it sets on the
    root while tracing (as timm's Swin and torchvision's MaxViT have them)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(4, 8, 1)
        self.register_buffer("offset", torch.ones(8, 1, 1))

    def forward(self, x):
        return self.proj(x) * torch.tensor([0.5, 2.0]).repeat(4)[:, None, None] + self.offset


def test_tensor_constants_stay_in_the_graph_and_out_of_the_module():
    model, x = TensorConstant(), torch.randn(2, 4, 3, 3)
    attrs = set(vars(model))
    gm = capture(model)
    assert set(vars(model)) == attrs and list(model.state_dict()) == ["offset", "proj.weight", "proj.bias"]
    torch.testing.assert_close(gm(x), model(x))
    opt = convrewrite.optimize(model)
    assert_same_outputs_and_grads(model, opt, x, calls=2)
    assert opt.report.rewritten and list(opt.state_dict()) == list(model.state_dict())


class Output(collections.OrderedDict):
    """A dict subclass that also indexes by position, as transformers' ModelOutput does."""

    def __getitem__(self, k):
        return list(self.values())[k] if isinstance(k, int) else super().__getitem__(k)


class ReturnsContainers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv1d(4, 8, 1)

    def forward(self, x):
        y = self.proj(x)
        return Output(hidden=y, extra={"pair": (y, y + 1), "all": [y]}), Pair(y, {"z": y})


Pair = collections.namedtuple("Pair", "a b")


def assert_same_structure(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        for k in expected:
            assert_same_structure(got[k], expected[k])
    elif isinstance(expected, (tuple, list)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_same_structure(g, e)


@pytest.mark.parametrize("measure", [False, True])
def test_outputs_keep_their_container_types(measure):
    model, x = ReturnsContainers().eval(), torch.randn(2, 4, 16)
    with torch.no_grad():
        expected = model(x)
        assert_same_structure(capture(model)(x), expected)
        opt = convrewrite.optimize(model, measure=measure)
        for _ in range(2):  # the annotating first call, then the rewritten graph
            out = opt(x)
            assert_same_structure(out, expected)
            torch.testing.assert_close(out[0][0], expected[0]["hidden"])
    assert opt.report.rewritten or not measure


class SizeArithmetic(nn.Module):
    def forward(self, x):
        n, c = x.shape[0], x.size(1)
        half = (x.shape[-1] + 1) // 2
        return x[..., :half].reshape(n * c, -1) * x.dim() + x.new_ones(x.numel(), 1).sum() * x.sum()


def test_fold_sizes_puts_the_annotated_sizes_in_the_graph():
    model, x = SizeArithmetic(), torch.randn(2, 3, 7)
    gm = capture(model)
    annotate(gm, (x,))
    assert sum(SIZE in n.meta for n in gm.graph.nodes) >= 7
    fold_sizes(gm)
    kinds = {(n.op, getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes}
    assert not {("call_function", "getattr"), ("call_method", "size"), ("call_method", "dim"),
                ("call_method", "numel"), ("call_function", "floordiv")} & kinds
    torch.testing.assert_close(gm(x), model(x))
    assert any(n.args[1:] == (6, -1) for n in gm.graph.nodes if n.target == "reshape")


def test_fold_sizes_keeps_integers_read_from_tensor_data():
    class Data(nn.Module):
        def forward(self, x):
            count = (x > 0).long().sum().item()  # an int, from the data: differs between calls
            return x * (count + x.shape[0])

    model, x = Data(), torch.randn(2, 3)
    gm = capture(model)
    annotate(gm, (x,))
    fold_sizes(gm)
    item = next(n for n in gm.graph.nodes if n.target == "item")
    assert SIZE not in item.meta and all(SIZE not in u.meta for u in item.users)
    torch.testing.assert_close(gm(-x), model(-x))


def test_fold_sizes_keeps_the_sizes_of_tensors_shaped_by_their_data():
    class Selected(nn.Module):
        def forward(self, x):
            picked = x[x > 0]  # as many elements as x has positive ones
            return picked * picked.shape[0] + x[x.shape[0] - 1:].sum()

    model, x = Selected(), torch.randn(4, 3)
    gm = capture(model)
    annotate(gm, (x,))
    fold_sizes(gm)
    shapes_read = [n.args[0] for n in gm.graph.nodes if n.target is getattr]
    assert [n.name for n in shapes_read] == ["getitem"]  # picked's, not x's: x's shape is folded
    torch.testing.assert_close(gm(-x), model(-x))
    torch.testing.assert_close(gm(x.abs()), model(x.abs()))


class Counting(nn.Module):
    """Counts its calls in a buffer: code fx runs for real while it traces (no Proxy in it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


class RunningMean(nn.Module):
    """Keeps a running mean of its inputs by assigning the buffer again (VQ-VAE's codebook, say)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("mean", torch.zeros(3))

    def forward(self, x):
        self.mean = 0.9 * self.mean + 0.1 * x.detach().mean((0, 2, 3))
        return self.conv(x - self.mean[:, None, None])


class Scaled(nn.Module):
    """Computes its scale in another mode (without grad, under autocast): a context fx does not record."""

    def __init__(self, context=torch.no_grad):
        super().__init__()
        self.conv, self.context = nn.Conv2d(3, 3, 1), context

    def forward(self, x):
        with self.context():
            scale = self.conv(x).abs().amax()
        return self.conv(x) / scale


def _in_bfloat16():
    return torch.autocast("cpu", torch.bfloat16)


@pytest.mark.parametrize("inner", [Counting, RunningMean, Scaled, lambda: Scaled(_in_bfloat16)],
                         ids=["buffer changed in place", "buffer assigned", "no_grad", "autocast"])
def test_code_fx_cannot_record_is_kept_opaque_and_the_module_left_as_it_was(inner):
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.inner = nn.Conv2d(3, 3, 1), inner()

        def forward(self, x):
            return self.inner(self.pre(x))

    model = Outer()
    state = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    gm = capture(model)
    assert [n.target for n in gm.graph.nodes if OPAQUE in n.meta] == ["inner"]
    assert "fx does not record" in gm.graph.find_nodes(op="call_module", target="inner")[0].meta[OPAQUE]
    now = model.state_dict(keep_vars=True)
    assert now.keys() == state.keys() and all(now[k] is tensor for k, (tensor, _) in state.items())
    assert all(torch.equal(tensor, value) for tensor, value in state.values())


def test_a_root_whose_forward_changes_its_buffer_is_one_opaque_call():
    model = Counting()
    gm = capture(model)
    assert "calls in place, which fx does not record" in opaque_root(gm) and model.calls.item() == 0
