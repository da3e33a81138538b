"""The channel-mix grid the profiler times: seeded, bounded, rounded like models' sizes."""

import math
import random

import pytest

from convrewrite.kinds.channel_mix import ChannelMixSpec, grid


@pytest.mark.parametrize("realistic", [False, True])
def test_random_specs_are_seeded_and_bounded(realistic):
    def draw(seed):
        rng = random.Random(seed)
        return [grid.random_spec(rng, realistic=realistic) for _ in range(20)]

    first = draw(5)
    assert [s.key() for s in first] == [s.key() for s in draw(5)]
    assert len({s.key() for s in first}) == 20
    for spec in first:
        macs = spec.batch * math.prod(spec.out_spatial) * spec.in_channels * spec.out_channels / spec.groups
        assert isinstance(spec, ChannelMixSpec) and macs <= grid.MAX_MACS
        if realistic:
            assert spec.in_channels % 8 == 0 or spec.in_channels < 8
            assert spec.batch & (spec.batch - 1) == 0
