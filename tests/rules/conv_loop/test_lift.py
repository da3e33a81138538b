import pytest
import torch
import torch.nn.functional as F

from convrewrite.kinds.conv.forms import conv_direct
from convrewrite.rules.conv_loop.lift import NotLiftable, Operand, lift
from tests import loops


def analyse(module, *inputs):
    """Lift ``module`` on these inputs; return (lifted, output of its direct conv, module output)."""
    names = [f"arg{i}" for i in range(len(inputs))]
    params = dict(module.named_parameters())
    operands = [Operand(n, tuple(x.shape), True) for n, x in zip(names, inputs)]
    operands += [Operand(n, tuple(p.shape), False) for n, p in params.items()]

    def run(values):
        return torch.func.functional_call(module, {n: values[n] for n in params}, tuple(values[n] for n in names))

    with torch.no_grad():
        want = module(*inputs)
        lifted = lift(run, operands, tuple(want.shape), dtype="float32")
        values = {**dict(zip(names, inputs)), **params}
        got = conv_direct(values[lifted.x], values[lifted.w], values[lifted.b] if lifted.b else None, spec=lifted.spec)
    return lifted, got, want


CASES = {
    "seed002 full convolve": (loops.FullConvolve(), (torch.randn(40, 9), torch.randn(40, 5)), "groups=40 flipped"),
    "seed004 per pixel": (loops.PerPixel(), (torch.randn(1, 1, 30, 30),), "conv2d"),
    "per pixel 5x5 float64 output": (loops.PerPixel(5, torch.float64), (torch.randn(1, 1, 20, 20),), "conv2d"),
    "unfold mul sum": (loops.UnfoldMulSum(), (torch.randn(2, 3, 20, 20),), "conv2d"),
    "unfold mul sum strided padded": (loops.UnfoldMulSum(stride=2, padding=1), (torch.randn(2, 3, 21, 19),), "stride=(2, 2)"),
    "unfold matmul": (loops.UnfoldMatmul(), (torch.randn(2, 3, 20, 20),), "conv2d"),
    "unfold matmul dilated": (loops.UnfoldMatmul(stride=2, padding=2, dilation=2), (torch.randn(2, 3, 24, 24),),
                              "dilation=(2, 2)"),
    "causal taps": (loops.TapLoop(), (torch.randn(2, 4, 60),), "groups=4"),
    "centred taps": (loops.TapLoop(causal=False), (torch.randn(2, 4, 60),), "groups=4"),
    "channels-last taps": (loops.ChannelsLastTaps(), (torch.randn(2, 50, 3),), "flipped"),
}


@pytest.mark.parametrize("name", CASES)
def test_lifted_conv_equals_the_code(name):
    module, inputs, feature = CASES[name]
    lifted, got, want = analyse(module, *inputs)
    assert feature in lifted.spec.describe()
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


def test_full_convolve_is_the_grouped_flipped_conv1d_of_the_forum_answer():
    a, v = torch.randn(30, 9), torch.randn(30, 5)
    lifted, got, _ = analyse(loops.FullConvolve(), a, v)
    answer = F.conv1d(a.unsqueeze(0), v.unsqueeze(1).flip(2), padding=v.shape[1] - 1, groups=a.shape[0])
    assert (lifted.x, lifted.w, lifted.b) == ("arg0", "arg1", None)
    torch.testing.assert_close(got, answer.squeeze(0))


def test_bias_is_found_and_padding_reads_exactly():
    lifted, _, _ = analyse(loops.UnfoldMulSum(stride=2, padding=1), torch.randn(1, 3, 10, 10))
    assert lifted.b == "bias" and lifted.spec.pads == ((1, 0), (1, 0))  # the last row and column are never read


@pytest.mark.parametrize("module, why", [
    (loops.WithRelu(), "relu, which is not a polynomial op"),
    (loops.DataDependent(), "not a polynomial op"),
    (loops.OuterProduct(), "sliding-window"),
    (loops.Scaled(), "reads no data|differs"),
])
def test_code_that_is_not_a_convolution_is_not_lifted(module, why):
    x = torch.randn(1, 1, 12, 12) if isinstance(module, loops.PerPixel) else \
        torch.randn(2, 4, 30) if isinstance(module, loops.TapLoop) else torch.randn(3, 7)
    with pytest.raises(NotLiftable, match=why):
        analyse(module, x)


def test_large_sizes_are_probed_small_then_proven_at_the_real_size():
    seen = []

    class Recording(loops.PerPixel):
        def forward(self, x):
            seen.append(x.shape[-1])
            return super().forward(x)

    analyse(Recording(), torch.randn(1, 1, 64, 64))
    small = [s for s in seen if s < 64]
    assert len(small) >= 4 and seen.count(64) >= 3  # probes run small; the proof runs at 64 too


def test_code_that_fixes_its_sizes_is_probed_at_the_real_size():
    class Fixed(loops.PerPixel):
        def forward(self, x):
            assert x.shape[-1] == 20, "this code only takes 20x20"
            return super().forward(x)

    lifted, got, want = analyse(Fixed(), torch.randn(1, 1, 20, 20))
    torch.testing.assert_close(got, want)


def test_lifting_leaves_rng_and_default_dtype_alone():
    module, x = loops.TapLoop(), torch.randn(2, 4, 30)
    state = torch.get_rng_state()
    analyse(module, x)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_default_dtype() == torch.float32


def test_an_off_by_one_loop_is_not_lifted():
    class SkipsLastColumn(loops.PerPixel):
        def forward(self, x):
            out = super().forward(x)
            out[..., -1] = 0
            return out

    with pytest.raises(NotLiftable, match="padding"):
        analyse(SkipsLastColumn(), torch.randn(1, 1, 12, 12))


def test_code_that_changes_above_the_probed_size_fails_the_proof_at_the_real_size():
    class BigDoubles(loops.TapLoop):
        def forward(self, x):
            y = super().forward(x)
            return y * 2 if x.shape[-1] > 40 else y

    analyse(BigDoubles(), torch.randn(2, 4, 30))
    with pytest.raises(NotLiftable, match="differs from the derived"):
        analyse(BigDoubles(), torch.randn(2, 4, 60))
