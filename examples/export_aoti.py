"""The deployment route: torch.export, the pass on the exported program, AOTInductor.

    python examples/export_aoti.py

``convrewrite.rewrite_exported`` takes an ``ExportedProgram`` and returns an equal one with
each rewritable site in its chosen form (as ATen ops), decided on the program's example
inputs; AOTInductor then compiles it as any other program. The figures come from the cost
table for the inductor executor: where it has none for a site, the site stays as exported
(the report says so).
"""

import tempfile
from pathlib import Path

import torch
import torch.nn as nn

import convrewrite


class PointwiseBlock(nn.Module):
    """Two pointwise convs around a GELU, as in a ConvNeXt or PointNet block."""

    def __init__(self):
        super().__init__()
        self.expand, self.project = nn.Conv1d(64, 256, 1), nn.Conv1d(256, 64, 1)

    def forward(self, x):
        return x + self.project(torch.nn.functional.gelu(self.expand(x)))


def main():
    torch.manual_seed(0)
    model, x = PointwiseBlock().eval(), torch.randn(8, 64, 256)
    exported = torch.export.export(model, (x,))
    rewritten, report = convrewrite.rewrite_exported(exported)
    print(report)
    with tempfile.TemporaryDirectory() as tmp:
        package = torch._inductor.aoti_compile_and_package(rewritten, package_path=str(Path(tmp) / "block.pt2"))
        compiled = torch._inductor.aoti_load_package(package)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    print("AOTInductor package compiled, loaded and run; output matches the model's")


if __name__ == "__main__":
    main()
