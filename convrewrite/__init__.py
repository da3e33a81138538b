"""convrewrite: rewrite pointwise convolutions into their fastest equal form on this device.

    model = convrewrite.optimize(model)          # fx pass, specialised per input signature
    print(convrewrite.explain(model, x))         # what was chosen at each site, and why
    python -m convrewrite.profile                # rebuild this machine's cost table

Importing this package loads nothing but torch: no CUDA initialisation, no inductor.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "optimize": "api", "explain": "api", "Options": "options", "Report": "report",
    "register_form": "forms", "unregister_form": "forms", "ChannelMixSpec": "spec",
    "ConvRewriteModule": "module", "load_table": "table",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'convrewrite' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
