"""Import cost, the README's commands, and the examples."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_import_is_cheap_and_initialises_nothing():
    code = ("import sys, torch, convrewrite, torch.nn as nn; m = convrewrite.optimize(nn.Conv1d(2, 2, 1));"
            "m(torch.randn(1, 2, 3)); m(torch.randn(1, 2, 3));"
            "assert 'torch._inductor' not in sys.modules, 'inductor imported';"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in readme and "pytest -q" in ci


def test_quickstart_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert "outputs match" in out and "optimized" in out
    # how many sites win depends on this machine's speed today: found is what the test asserts
    assert re.search(r"convrewrite: \d+ of 6 site\(s\) rewritten", out), out
    for pattern in ("conv loop", "layout chain", "pointwise conv"):
        assert pattern in out


def test_compile_backend_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "compile_backend.py")], capture_output=True,
                         text=True, check=True, timeout=300)
    assert "output matches eager" in out.stdout and "rewritten" in out.stderr


def test_custom_form_example_times_the_new_form():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_form.py")], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert "'einsum' was timed" in out and "  einsum " in out


def test_export_example_compiles_the_rewritten_program_with_aotinductor():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "export_aoti.py")], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    assert "site(s) rewritten" in out and "output matches the model's" in out
