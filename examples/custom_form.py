"""Registering your own candidate form, and seeing it profiled and chosen.

    python examples/custom_form.py

A form is a plain torch function ``fn(x, w, b, *, spec)`` computing the spec's channel mix
and returning the original conv's output layout. Once registered, the profiler times it,
the cost table ranks it, ``optimize(..., measure=True)`` may choose it, and ``verify``
checks it against the original before it is emitted.
"""

import os
import tempfile

import torch
import torch.nn as nn

import convrewrite
from convrewrite.spec import to_layout


@convrewrite.register_form("channel_mix", "einsum", supports=lambda spec: spec.groups == 1 and spec.ndim == 1
                           and not any(spec.padding) and spec.stride == (1,))
def einsum(x, w, b, *, spec):
    """The channel mix as one einsum over [N, C, L]."""
    y = torch.einsum("oc,ncl->nol", w.flatten(1), x)
    if b is not None:
        y = y + b[:, None]
    return to_layout(y, spec.out_layout)


def main():
    os.environ.setdefault("CONVREWRITE_CACHE_DIR", tempfile.mkdtemp())  # keep this demo's timings apart
    model = nn.Conv1d(16, 32, 1).eval()
    x = torch.randn(32, 16, 200)
    optimized = convrewrite.optimize(model, measure=True)  # time every legal form on this exact shape
    with torch.no_grad():
        optimized(x)
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-4, atol=1e-4)
    (site,) = optimized.report
    print(optimized.report)
    print(f"\n'einsum' was timed at {site.key} ({site.source}):")
    for name, seconds in sorted(site.times.items(), key=lambda kv: kv[1]):
        print(f"  {name:20s} {seconds * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
