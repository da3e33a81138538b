"""The device layer: what convrewrite needs to know of each device type, in one place.

A device type is one :class:`DeviceType` entry: what identifies its timings (the table's
fingerprint), which table ships for it, how large a buffer evicts its cache between timed
calls, and whether it is present. CPU is one entry; CUDA, XPU and MPS are entries built from
their ``torch.<type>`` modules. Adding a device is a :func:`register_device` call, not a
branch in each stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from pathlib import Path
from typing import Callable

import torch
import torch.utils._pytree as pytree

CPU_CACHE_BYTES = 4 << 20  # more than the L2 cache of the cores a graph runs on
ACCELERATOR_CACHE_BYTES = 256 * 2**20  # where the device does not report its L2 size


@dataclasses.dataclass(frozen=True)
class DeviceType:
    """One device type: ``fingerprint(device)`` says whose figures a table holds,
    ``cache_bytes(device)`` how large a buffer flushes its cache, ``available()`` whether one
    is here; ``table_name(fingerprint)`` names the table shipped for it."""

    name: str
    fingerprint: Callable[[torch.device], dict]
    cache_bytes: Callable[[torch.device], int]
    available: Callable[[], bool]
    table_name: Callable[[dict], str]


def _cpu_fingerprint(device: torch.device) -> dict:
    return {"device": "cpu", "model": _cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _accelerator(name: str) -> DeviceType:
    """The entry of an accelerator torch exposes as ``torch.<name>`` (cuda, xpu, mps)."""
    module = lambda: getattr(torch, name)  # noqa: E731  (read late: torch.xpu is absent from some builds)

    def index(device: torch.device) -> int:
        return device.index if device.index is not None else getattr(module(), "current_device", lambda: 0)()

    def fingerprint(device: torch.device) -> dict:
        fp = {"device": name, "torch": torch.__version__}
        if hasattr(module(), "get_device_name"):
            fp["name"] = module().get_device_name(index(device))
        if name == "cuda":
            fp.update(capability=list(torch.cuda.get_device_capability(index(device))), cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version())
        return fp

    def cache_bytes(device: torch.device) -> int:
        props = getattr(module(), "get_device_properties", None)
        size = getattr(props(index(device)), "L2_cache_size", 0) if props else 0
        return size or ACCELERATOR_CACHE_BYTES

    def table_name(fp: dict) -> str:
        label = "".join(c if c.isalnum() else "-" for c in fp.get("name", "").lower())
        return f"{name}-{label}.json" if label else f"{name}.json"

    def available() -> bool:
        return hasattr(torch, name) and module().is_available()

    return DeviceType(name, fingerprint, cache_bytes, available, table_name)


_TYPES: dict[str, DeviceType] = {
    "cpu": DeviceType("cpu", _cpu_fingerprint, lambda device: CPU_CACHE_BYTES, lambda: True, lambda fp: "cpu.json"),
    **{name: _accelerator(name) for name in ("cuda", "xpu", "mps")},
}
DEVICE_TYPES = tuple(_TYPES)


def register_device(entry: DeviceType) -> None:
    """Add (or replace) a device type."""
    global DEVICE_TYPES
    _TYPES[entry.name] = entry
    DEVICE_TYPES = tuple(_TYPES)


def device_type(device: str | torch.device) -> DeviceType:
    """The entry of ``device``'s type (``"cuda:1"`` -> cuda's)."""
    kind = torch.device(device).type
    if kind not in _TYPES:
        raise ValueError(f"convrewrite has no entry for device type {kind!r} (known: {', '.join(_TYPES)}); "
                         "add one with convrewrite.device.register_device")
    return _TYPES[kind]


def fingerprint(device: str | torch.device = "cpu") -> dict:
    """What identifies a machine's timings on ``device``: on CPU the model, ISA, threads and
    torch version; on an accelerator its name (CUDA: capability, CUDA/cuDNN versions) and torch's."""
    return device_type(device).fingerprint(torch.device(device))


def generator(device: str | torch.device, seed: int) -> torch.Generator:
    """A seeded generator for random example inputs on ``device``."""
    return torch.Generator(device).manual_seed(seed)


def cache_flush(values) -> Callable[[], object]:
    """A call that evicts the cache of the device ``values``' tensors live on (the first
    accelerator among them, else the CPU), as triton's ``do_bench`` does between calls:
    called back to back, a graph finds its working set still in cache, as it does not when
    called through dynamo's frame or between other work (a 0.1 ms loop's grouped conv read
    7% ahead of inductor's kernel back to back and 13% behind through the frame; flushed,
    the two tie)."""
    device = next(iter(accelerators(values)), torch.device("cpu"))
    size = device_type(device).cache_bytes(device)
    return torch.empty(size // 4, dtype=torch.int, device=device).zero_


def accelerators(values) -> list[torch.device]:
    """The non-CPU devices of ``values``' tensors (any nesting), in order of first use."""
    devices = (t.device for t in pytree.tree_leaves(values) if isinstance(t, torch.Tensor))
    return list(dict.fromkeys(d for d in devices if d.type not in ("cpu", "meta")))


@contextlib.contextmanager
def rng_kept(values):
    """Restores the RNG state of the CPU and of the accelerators of ``values`` on exit."""
    devices = accelerators(values)
    kind = devices[0].type if devices else "cuda"
    with torch.random.fork_rng(devices=[d.index or 0 for d in devices if d.type == kind], device_type=kind):
        yield
