"""The channel-mix shapes ``python -m convrewrite.profile`` times: seeded random pointwise
convs (1D/2D/3D, batch, channels, spatial size, groups, stride, input layout; half of them
with sizes rounded the way models are written), and the buckets its summary groups them by."""

from __future__ import annotations

import math
import random

import torch

from ...spec import CHANNELS_FIRST, CHANNELS_LAST, STRIDED, layout_of
from .forms import channels_last_backward_may_crash, conv
from .spec import ChannelMixSpec

MAX_MACS = 1e8  # keeps every timed call within milliseconds on a small CPU


def _log_uniform(rng: random.Random, lo: float, hi: float) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def random_spec(rng: random.Random, device="cpu", dtype="float32", mode="infer", realistic=False) -> ChannelMixSpec:
    """One random pointwise-conv spec, its work capped by MAX_MACS.

    Sizes are log-uniform integers; ``realistic`` rounds them the way models are written
    (channels to multiples of 8, batch to a power of two, square images, lengths to
    multiples of 8). ``mode``: infer, train or train-w (see ``ChannelMixSpec.mode``).
    """
    grad = mode != "infer"
    while True:
        ndim = rng.choices((1, 2, 3), (0.45, 0.45, 0.1))[0]
        side_max = {1: 16384, 2: 128, 3: 24}[ndim]
        sides = [_log_uniform(rng, 1, side_max) for _ in range(1 if realistic and ndim > 1 else ndim)]
        cin, cout, batch = _log_uniform(rng, 3, 1024), _log_uniform(rng, 3, 1024), _log_uniform(rng, 1, 128)
        if realistic:
            cin, cout = (_multiple(c, 8) for c in (cin, cout))
            batch = 2 ** round(math.log2(batch))
            sides = [_multiple(s, 8) if ndim == 1 else s for s in sides] * (ndim if ndim > 1 else 1)
        groups = 1
        if rng.random() < 0.15:
            groups = rng.choice([g for g in (2, 4, 8, math.gcd(cin, cout)) if cin % g == 0 and cout % g == 0])
        stride = (2,) * ndim if rng.random() < 0.1 and min(sides) > 1 else (1,) * ndim
        in_layout = rng.choices((CHANNELS_FIRST, CHANNELS_LAST, STRIDED), (0.7, 0.25, 0.05))[0]
        spec = ChannelMixSpec(batch, cin, cout, tuple(sides), groups, stride, bias=rng.random() < 0.8,
                              dtype=dtype, device=device, in_layout=in_layout, grad=grad, input_grad=mode != "train-w")
        macs = spec.batch * math.prod(spec.out_spatial) * cin * cout / groups
        crashes = in_layout == CHANNELS_LAST and spec.ndim > 1 and channels_last_backward_may_crash(spec)
        if macs <= MAX_MACS * (0.3 if grad else 1.0) and not crashes:
            return with_out_layout(spec)


def _multiple(v: int, m: int) -> int:
    return max(m, m * round(v / m)) if v >= m else v


def with_out_layout(spec: ChannelMixSpec) -> ChannelMixSpec:
    """``spec`` with ``out_layout`` set to what the original conv returns for its input layout."""
    x, w, b = spec.example_inputs()
    with torch.no_grad():
        out = conv(x, w, b, spec=spec)
    return ChannelMixSpec(**{**spec.__dict__, "out_layout": layout_of(out)})


def bucket(spec: ChannelMixSpec) -> dict[str, str]:
    """The summary's group of ``spec``: executor, dims, input layout, mode and work."""
    size = math.log10(max(1.0, spec.batch * math.prod(spec.out_spatial) * spec.in_channels * spec.out_channels
                          / spec.groups))
    return {"executor": spec.executor, "dims": f"{spec.ndim}d", "input": spec.in_layout, "mode": spec.mode,
            "size": "<1e6 MAC" if size < 6 else "1e6-1e8 MAC" if size < 8 else ">=1e8 MAC"}
