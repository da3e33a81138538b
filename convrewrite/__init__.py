"""convrewrite: rewrite convolution-shaped code into its fastest equal form on this device.

It finds three patterns in a model's graph and rewrites each into the fastest equivalent
form, chosen from a per-device cost table of measured figures, where verified equal:

- pointwise convs (``Conv1d/2d/3d(kernel_size=1)``, ``F.conv*``, ``Linear`` between
  transposes): conv, channels-last conv, matmul, baddbmm, linear or addmm;
- channel-wise chains between a permute and its inverse (``permute -> LayerNorm -> Linear ->
  GELU -> Linear -> permute``): as written, or in the input's own layout without the copies;
- convolutions written as code (loops over taps or pixels, unfold + multiply + sum): one
  conv op.

    model = convrewrite.optimize(model)              # per input signature; fx, or dynamo where fx cannot
    torch.compile(model, backend="convrewrite")      # the same pass under dynamo, then inductor
    ep, report = convrewrite.rewrite_exported(ep)    # the pass on a torch.export program (AOTInductor)
    print(convrewrite.explain(model, x))             # what was chosen at each site, and why
    python -m convrewrite.profile                    # rebuild this machine's cost table
    python -m convrewrite.table show                 # see, check, prune or reset it

Importing this package loads nothing but torch: no CUDA initialisation, no inductor.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "optimize": "api", "explain": "api", "Options": "options", "Report": "report",
    "register_form": "forms", "unregister_form": "forms", "register_kind": "kinds",
    "ChannelMixSpec": "kinds.channel_mix", "ChainSpec": "kinds.layout_chain", "ConvSpec": "kinds.conv",
    "ConvRewriteModule": "module", "load_table": "table", "rewrite_exported": "export",
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
