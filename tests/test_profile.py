"""The profile CLI, on a tiny grid (its figures are not checked, only that it builds a table)."""

import subprocess
import sys

import pytest

from convrewrite import profile
from convrewrite.kinds.channel_mix import ChannelMixSpec
from convrewrite.table import CostTable, fingerprint, user_table_path


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


@pytest.mark.parametrize("argv, message", [(["--mode", "both"], "--mode"), (["--dtype", "fp16"], "not a torch float dtype"),
                                           (["--dtype", "int32"], "not a torch float dtype"),
                                           (["--specs", "0"], "0 only with --plot")])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        profile.main(argv)
    assert message in capsys.readouterr().err


def test_dtype_aliases_are_normalised(tmp_path):
    out = tmp_path / "t.json"
    assert profile.main(["--quick", "--specs", "1", "--mode", "infer", "--dtype", "float", "--out", str(out)]) == 0
    assert all("|float32|" in key for key in CostTable.read(out).entries)


def test_help_explains_the_command():
    out = subprocess.run([sys.executable, "-m", "convrewrite.profile", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("--device", "--dtype", "--quick", "--out", "cost table"):
        assert word in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        profile.main(["--device", "cuda"])
    assert "--device cuda: not available here" in capsys.readouterr().err


def test_specs_timed_under_load_are_left_out_and_said(tmp_path, clock, capsys):
    clock.busy = 1.0
    out = tmp_path / "t.json"
    assert profile.main(["--quick", "--specs", "2", "--mode", "infer", "--out", str(out)]) == 0
    assert CostTable.read(out).entries == {} and clock.calls == 2 * (1 + profile.RETRIES)
    assert "2 spec(s) left out" in capsys.readouterr().out


def test_summary_is_not_set_by_one_noisy_figure():
    table = CostTable(fingerprint("cpu"))
    for i in range(11):  # one bucket: baddbmm 2x faster than the conv, except one figure timed under noise (500x)
        table.add(ChannelMixSpec(2, 8, 8 + i, (16,)).key(), {"conv": 0.5 if i == 3 else 2e-3, "baddbmm": 1e-3}, {})
    out = profile.summary(table)
    assert "90th percentile" in out and "500.00x" not in out
    assert out.splitlines()[-1].split()[-2:] == ["2.00x", "2.00x"]
