"""The profile CLI, on a tiny grid (its figures are not checked, only that it builds a table)."""

import subprocess
import sys

import pytest

from convrewrite import profile
from convrewrite.spec import ChannelMixSpec
from convrewrite.table import CostTable, user_table_path


def test_quick_profile_writes_a_table(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert profile.main(["--quick", "--specs", "3", "--mode", "infer,train", "--out", str(out)]) == 0
    table = CostTable.read(out)
    assert len(table.entries) == 6 and not table.profiled
    assert all("conv" in times for times in table.entries.values())
    assert "fastest form" in capsys.readouterr().out


def test_default_output_is_the_user_table(isolated_cache):
    assert profile.main(["--quick", "--specs", "1", "--mode", "infer"]) == 0
    assert len(CostTable.read(user_table_path("cpu")).entries) == 1


def test_random_specs_are_seeded_and_bounded():
    import random
    a = [profile.random_spec(random.Random(5)).key() for _ in range(3)]
    b = [profile.random_spec(random.Random(5)).key() for _ in range(3)]
    assert a == b
    for _ in range(50):
        spec = profile.random_spec(random.Random(_))
        assert isinstance(spec, ChannelMixSpec)
        assert spec.batch * spec.in_channels * spec.out_channels / spec.groups <= profile.MAX_MACS


def test_help_explains_the_command():
    out = subprocess.run([sys.executable, "-m", "convrewrite.profile", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("--device", "--dtype", "--quick", "--out", "cost table"):
        assert word in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        profile.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err
