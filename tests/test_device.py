"""The device layer: each device type is one entry, and unknown ones are a clear error."""

import pytest
import torch

from convrewrite import device
from convrewrite.table import shipped_table_path


def test_cpu_fingerprint_names_what_changes_its_timings():
    fp = device.fingerprint("cpu")
    assert fp["device"] == "cpu" and fp["threads"] == torch.get_num_threads() and fp["torch"] == torch.__version__
    assert shipped_table_path("cpu").name == "cpu.json"


def test_accelerators_are_entries_not_branches():
    assert {"cpu", "cuda", "xpu", "mps"} <= set(device.DEVICE_TYPES)
    cuda = device.device_type("cuda:1")
    assert cuda.name == "cuda" and cuda.table_name({"device": "cuda", "name": "NVIDIA H200"}) == "cuda-nvidia-h200.json"
    assert cuda.available() == torch.cuda.is_available()


def test_an_unknown_device_type_is_a_clear_error():
    with pytest.raises(ValueError, match="no entry for device type 'meta'.*register_device"):
        device.fingerprint("meta")


def test_a_registered_device_is_used_by_the_table(monkeypatch):
    monkeypatch.setattr(device, "_TYPES", dict(device._TYPES))
    monkeypatch.setattr(device, "DEVICE_TYPES", device.DEVICE_TYPES)
    entry = device.DeviceType("meta", lambda d: {"device": "meta", "torch": torch.__version__}, lambda d: 1024,
                              lambda: True, lambda fp: "meta.json")
    device.register_device(entry)
    assert device.fingerprint("meta")["device"] == "meta" and shipped_table_path("meta").name == "meta.json"
    assert "meta" in device.DEVICE_TYPES


def test_the_cache_flush_writes_a_buffer_larger_than_the_cache():
    flush = device.cache_flush([torch.zeros(2)])
    assert flush().numel() * 4 >= device.CPU_CACHE_BYTES and device.accelerators([torch.zeros(2), 3]) == []


def test_the_rng_is_restored():
    with device.rng_kept([torch.zeros(1)]):
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        with device.rng_kept([]):
            torch.rand(3)
        assert torch.equal(torch.rand(3), expected)
