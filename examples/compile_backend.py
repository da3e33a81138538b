"""The torch.compile route: ``torch.compile(model, backend="convrewrite")``.

    python examples/compile_backend.py

The backend rewrites pointwise convs inside dynamo's graph, then hands it to an inner
compiler: inductor by default, or eager (used here, so the example runs in seconds on any
machine). No ``import convrewrite`` is needed: the backend name resolves through the
``torch_dynamo_backends`` entry point of the installed package.
"""

import logging

import torch
import torch.nn as nn


def main():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 64, 1), nn.GELU(), nn.Conv1d(64, 64, 1), nn.GELU(), nn.Conv1d(64, 8, 1))
    x = torch.randn(64, 8, 512)

    logging.getLogger("convrewrite.backend").setLevel(logging.INFO)
    logging.basicConfig(format="%(message)s")
    compiled = torch.compile(model, backend="convrewrite", options={"inner": "eager", "margin": 1.1})

    y = compiled(x)  # compiles: the log shows what was rewritten
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()  # training goes through the rewritten graph too
    print("compiled output and gradients computed; output matches eager")


if __name__ == "__main__":
    main()
