"""The channel-mix spec: keys, validation, sizes and example inputs."""

import pytest

from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.spec import CHANNELS_FIRST, CHANNELS_LAST, STRIDED, layout_of


def test_key_round_trips_every_field():
    spec = ChannelMixSpec(3, 8, 16, (5, 7), groups=2, stride=(2, 1), padding=(1, 0), bias=False,
                          dtype="bfloat16", in_layout=CHANNELS_LAST, out_layout=CHANNELS_LAST, grad=True,
                          executor="inductor")
    assert ChannelMixSpec.from_key(spec.key()) == spec


def test_keys_differ_when_any_field_differs():
    base = ChannelMixSpec(2, 4, 4, (8,))
    variants = [ChannelMixSpec(2, 4, 4, (8,), bias=False), ChannelMixSpec(2, 4, 4, (8,), grad=True),
                ChannelMixSpec(2, 4, 4, (8,), in_layout=CHANNELS_LAST), ChannelMixSpec(2, 4, 4, (8,), stride=(2,)),
                ChannelMixSpec(2, 4, 4, (8,), dtype="float64"), ChannelMixSpec(2, 4, 4, (8,), groups=2),
                ChannelMixSpec(2, 4, 4, (8,), executor="inductor")]
    assert len({base.key(), *(v.key() for v in variants)}) == len(variants) + 1


@pytest.mark.parametrize("bad", [dict(spatial=()), dict(groups=3), dict(stride=(1, 1))])
def test_invalid_specs_are_refused(bad):
    with pytest.raises(ValueError):
        ChannelMixSpec(**{**dict(batch=1, in_channels=4, out_channels=4, spatial=(4,)), **bad})


def test_from_key_refuses_foreign_keys():
    with pytest.raises(ValueError):
        ChannelMixSpec.from_key("conv|n1")


def test_out_spatial_follows_padding_and_stride():
    assert ChannelMixSpec(1, 2, 2, (7, 8), stride=(2, 3), padding=(1, 0)).out_spatial == (5, 3)


@pytest.mark.parametrize("layout", [CHANNELS_FIRST, CHANNELS_LAST, STRIDED])
def test_example_inputs_have_the_spec_layout(layout):
    x, w, b = ChannelMixSpec(2, 3, 5, (4, 6), in_layout=layout).example_inputs()
    assert layout_of(x) == layout and w.shape == (5, 3, 1, 1) and b.shape == (5,)
