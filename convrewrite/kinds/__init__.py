"""Spec kinds: each kind of computation a site can perform is one registered unit.

A :class:`Kind` ties together its spec class (the :class:`~convrewrite.spec.Spec` protocol,
and :class:`~convrewrite.spec.Predictable` where the table predicts unseen shapes), the name
of its original form, and the generator of the shapes ``python -m convrewrite.profile``
times. Each built-in kind is a package here holding all of that and its forms:

- ``channel_mix``: a pointwise (1x1) convolution, however the source wrote it;
- ``layout_chain``: channel-wise ops between a permutation and its inverse;
- ``conv``: a convolution lifted from code that computes one.

A new kind is a package like these that calls :func:`register_kind` (``register_form(kind,
...)`` accepts known kinds only), and a rule that emits its specs. The cost table, the decision and the report read kinds through this registry.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

BUILTIN = ("channel_mix", "layout_chain", "conv")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One spec kind: ``spec`` is its class, ``original`` the form that computes what the
    source wrote, ``grid`` (optional) the module whose ``random_spec(rng, device, dtype,
    mode, realistic)`` and ``bucket(spec)`` the profiler and its summary use."""

    name: str
    spec: type
    original: str
    grid: ModuleType | None = None

    @property
    def predictable(self) -> bool:
        return self.spec.predictable


_KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Register ``kind`` (replacing one of the same name) and return it."""
    if kind.spec.kind != kind.name:
        raise ValueError(f"kind {kind.name!r}: its spec class says kind {kind.spec.kind!r}")
    _KINDS[kind.name] = kind
    return kind


def known() -> tuple[str, ...]:
    """The names of the built-in and the registered kinds (without importing any)."""
    return tuple(dict.fromkeys((*BUILTIN, *_KINDS)))


def get_kind(name: str) -> Kind:
    """The kind registered as ``name``."""
    _load_builtins()
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"no spec kind {name!r}; kinds: {', '.join(sorted(_KINDS))}") from None


def kinds() -> tuple[Kind, ...]:
    """Every registered kind."""
    _load_builtins()
    return tuple(_KINDS.values())


def parse_key(key: str):
    """The spec of a table key of a predictable kind; None for keys of other kinds, of
    unknown kinds or of an older key format."""
    _load_builtins()
    kind = _KINDS.get(key.split("|", 1)[0])
    if kind is None or not kind.predictable:
        return None
    try:
        return kind.spec.from_key(key)
    except (ValueError, KeyError, IndexError):
        return None


def _load_builtins() -> None:
    for name in BUILTIN:
        importlib.import_module(f"{__name__}.{name}")
