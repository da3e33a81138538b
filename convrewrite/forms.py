"""The form registry: plain torch functions that compute a spec, each with a legality check.

A form is ``fn(x, *params, spec) -> y`` (for a channel mix, ``fn(x, w, b, *, spec)``). The
profiler times it and the rewrite emits the very
same function, so what is measured is what runs. Register your own with :func:`register_form`;
profiling, choosing, testing and benchmarking pick it up by name. The built-in forms live
with their spec kind, in :mod:`convrewrite.kinds`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from typing import Callable

_REGISTRY: dict[str, dict[str, "Form"]] = {}


def _always(spec) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Form:
    """One registered way to compute a spec kind."""

    kind: str
    name: str
    fn: Callable
    supports: Callable = _always

    def __call__(self, x, *params, spec):
        return self.fn(x, *params, spec=spec)

    @functools.cached_property
    def source_hash(self) -> str:
        """Hash of the form's source, so editing a form invalidates its old timings."""
        try:
            text = inspect.getsource(self.fn)
        except (OSError, TypeError):
            text = f"{self.fn.__module__}.{self.fn.__qualname__}"
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def register_form(kind: str, name: str | None = None, supports: Callable = _always) -> Callable:
    """Decorator: register ``fn(x, *params, spec)`` as a form of spec ``kind``.

    Kinds: ``"channel_mix"`` (a pointwise conv: ``fn(x, w, b, *, spec)``, ``spec`` a
    ``ChannelMixSpec``), ``"layout_chain"`` (channel-wise ops between a permute and its
    inverse: ``fn(x, *params, spec)``, a ``ChainSpec``), ``"conv"`` (a convolution lifted from
    code: ``fn(x, w, b, *, spec)``, a ``ConvSpec``), and any kind registered with
    :func:`convrewrite.kinds.register_kind`. ``supports(spec) -> bool`` says whether the form
    computes that spec exactly; a form is only timed and only chosen where it does.
    Re-registering a name replaces the old form; a name is unique across spec kinds.
    """
    from . import kinds

    if kind not in kinds.known():
        raise ValueError(f"no spec kind {kind!r}; kinds: {', '.join(kinds.known())}")

    def decorate(fn: Callable) -> Callable:
        form = Form(kind, name or fn.__name__, fn, supports)
        other = next((k for k, forms in _REGISTRY.items() if k != kind and form.name in forms), None)
        if other is not None:  # tables and options name forms without their kind
            raise ValueError(f"form name {form.name!r} is already registered for {other!r}")
        _REGISTRY.setdefault(kind, {})[form.name] = form
        return fn

    return decorate


def unregister_form(kind: str, name: str) -> None:
    """Remove a registered form (no error if it is absent)."""
    _REGISTRY.get(kind, {}).pop(name, None)


def _load_builtins() -> None:
    from .kinds import kinds

    kinds()  # each built-in kind registers its forms on import


def source_hashes() -> dict[str, str]:
    """Every registered form's source hash, by name (names are unique across kinds)."""
    _load_builtins()
    return {name: f.source_hash for forms in _REGISTRY.values() for name, f in forms.items()}


def get_form(kind: str, name: str) -> Form:
    """The form registered under ``name`` for spec ``kind``."""
    _load_builtins()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise KeyError(f"no form {name!r} for {kind!r}; registered: {sorted(_REGISTRY.get(kind, {}))}") from None


def registered_names(kind: str | None = None) -> set[str]:
    """Names of the forms registered for spec ``kind`` (every kind if None)."""
    _load_builtins()
    return {name for k, forms in _REGISTRY.items() if kind in (None, k) for name in forms}


def forms_for(spec) -> list[Form]:
    """Every registered form that computes ``spec`` exactly, in registration order."""
    _load_builtins()
    return [f for f in _REGISTRY.get(spec.kind, {}).values() if f.supports(spec)]
