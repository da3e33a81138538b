"""The kinds registry: one unit per kind, found by name and by table key."""

import dataclasses
from typing import ClassVar

import pytest

import convrewrite
from convrewrite import kinds
from convrewrite.forms import forms_for, registered_names, unregister_form
from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.spec import Spec, SpecBase


def test_every_builtin_kind_is_registered_with_its_original_form():
    registered = {k.name: k for k in kinds.kinds()}
    assert set(kinds.BUILTIN) <= set(registered)
    for kind in registered.values():
        assert kind.spec.kind == kind.name and issubclass(kind.spec, SpecBase)
        assert kind.original in registered_names(kind.name)
    assert registered["channel_mix"].predictable and not registered["conv"].predictable


def test_table_keys_parse_to_their_kind_and_others_to_none():
    spec = ChannelMixSpec(2, 4, 8, (5,))
    assert kinds.parse_key(spec.key()) == spec
    assert kinds.parse_key("layout_chain|2x4|first|mix,4,4,True|float32|cpu|cf|infer|eager") is None
    assert kinds.parse_key("nokind|1") is None and kinds.parse_key("channel_mix|garbled") is None


def test_forms_of_an_unknown_kind_are_refused_with_the_kinds_listed():
    with pytest.raises(ValueError, match="no spec kind 'channel-mix'; kinds: channel_mix, layout_chain, conv"):
        convrewrite.register_form("channel-mix")(lambda x, w, b, *, spec: x)


@dataclasses.dataclass(frozen=True)
class Doubling(SpecBase):
    kind: ClassVar[str] = "doubling"
    predictable: ClassVar[bool] = False
    n: int
    dtype: str = "float32"
    device: str = "cpu"
    grad: bool = False
    input_grad: bool = True
    executor: str = "eager"

    def key(self):
        return f"{self.kind}|{self.n}|{self.dtype}|{self.device}|{self.mode}|{self.executor}"

    def describe(self):
        return f"double [{self.n}]"

    def example_inputs(self, generator=None):
        import torch
        return (torch.randn(self.n, generator=generator),)


def test_a_new_kind_is_one_registration_and_its_forms(monkeypatch):
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))
    with pytest.raises(ValueError, match="says kind 'doubling'"):
        kinds.register_kind(kinds.Kind("other", Doubling, "add"))
    kinds.register_kind(kinds.Kind("doubling", Doubling, "add"))
    convrewrite.register_form("doubling", "add")(lambda x, *, spec: x + x)
    try:
        spec = Doubling(3)
        assert isinstance(spec, Spec) and [f.name for f in forms_for(spec)] == ["add"]
        assert kinds.get_kind("doubling").original == "add"
    finally:
        unregister_form("doubling", "add")
