"""Real models, built by their libraries' own constructors (random weights), as written and optimized.

    python bench/models.py                     # every installed library's models
    python bench/models.py --busy-cores 1      # first calls with a core spinning

For each model: sites found and rewritten at the first call, the output checked against the
model's, eager and optimized timed side by side (quiet), and the forms chosen in 3 fresh
processes (each with its own cache dir) compared. timm, torchvision and transformers are used
when installed (timm and torchvision need a torch with a matching torchvision); models of a
missing library are listed as skipped. Results go to bench/RESULTS.md's real-models section.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

import convrewrite
from convrewrite.progress import bar
from convrewrite.measure import time_callables
from convrewrite.table import fingerprint

sys.path.insert(0, str(Path(__file__).parent))
from figures import busy, command_line, publish  # noqa: E402

HERE = Path(__file__).parent
ORIGINAL = "original"  # a site left as written, whatever its original is called
MODELS = {  # name: (library, constructor call, input size: an image's side, a text's tokens or audio samples)
    "repvgg_a0": ("timm", "timm.create_model('repvgg_a0')", 224),
    "mobilevit_xxs": ("timm", "timm.create_model('mobilevit_xxs')", 256),
    "mobilenetv3_small_100": ("timm", "timm.create_model('mobilenetv3_small_100')", 224),
    "convnext_atto": ("timm", "timm.create_model('convnext_atto')", 224),
    "mobilenet_v2": ("torchvision", "torchvision.models.mobilenet_v2()", 224),
    "squeezenet1_0": ("torchvision", "torchvision.models.squeezenet1_0()", 224),
    "shufflenet_v2_x1_0": ("torchvision", "torchvision.models.shufflenet_v2_x1_0()", 224),
    # transformers: forward(**kwargs) and ModelOutput, captured through dynamo
    "hf-squeezebert": ("transformers", "transformers.SqueezeBertModel(transformers.SqueezeBertConfig())", 128),
    "hf-convbert": ("transformers", "transformers.ConvBertModel(transformers.ConvBertConfig())", 128),
    "hf-mobilevit-small": ("transformers", "transformers.MobileViTModel(transformers.MobileViTConfig())", 256),
    "hf-convnext-tiny": ("transformers", "transformers.ConvNextModel(transformers.ConvNextConfig())", 224),
    "hf-segformer-b0": ("transformers", "transformers.SegformerModel(transformers.SegformerConfig())", 224),
    "hf-wav2vec2-base": ("transformers", "transformers.Wav2Vec2Model(transformers.Wav2Vec2Config())", 16000),
}
TEXT = ("hf-squeezebert", "hf-convbert")  # inputs are token ids
AUDIO = ("hf-wav2vec2-base",)  # inputs are samples


def build(name: str):
    library, call, size = MODELS[name]
    module = importlib.import_module(library)
    torch.manual_seed(0)
    model = eval(call, {library: module}).eval()  # noqa: S307 (a constructor from the table above)
    generator = torch.Generator().manual_seed(1)
    if name in TEXT:
        return model, torch.randint(0, 1000, (1, size), generator=generator)
    if name in AUDIO:
        return model, torch.randn(1, size, generator=generator)
    return model, torch.randn(1, 3, size, size, generator=generator)


def chosen_forms(name: str, busy_cores: int, cache: str | None = None) -> list[str]:
    """The form chosen at each site of ``name`` at its first call (``ORIGINAL`` where it was
    left as written), with the cache dir ``cache`` (a fresh one if None)."""
    os.environ["CONVREWRITE_CACHE_DIR"] = cache or tempfile.mkdtemp(prefix="convrewrite-models-")
    model, x = build(name)
    optimized = convrewrite.optimize(model)
    with busy(busy_cores), torch.no_grad():
        optimized(x)
    return [s.chosen if s.chosen != s.original else ORIGINAL for s in optimized.report or ()]


def bench_model(name: str, busy_cores: int) -> dict:
    os.environ["CONVREWRITE_CACHE_DIR"] = tempfile.mkdtemp(prefix="convrewrite-models-")
    model, x = build(name)
    optimized = convrewrite.optimize(model)
    with busy(busy_cores), torch.no_grad():
        start = time.perf_counter()
        out = optimized(x)
        first_s = time.perf_counter() - start
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
        times = time_callables({"eager": lambda: model(x), "optimized": lambda: optimized(x)}, rounds=15,
                               block_s=0.05)
    report = optimized.report
    runs = [_decided_in_a_process(name, busy_cores) for _ in range(3)]
    kept = tempfile.mkdtemp(prefix="convrewrite-models-")
    runs_kept = [_decided_in_a_process(name, busy_cores, kept) for _ in range(3)]
    return {"model": name, "sites": len(report or ()), "rewritten": len(report.rewritten) if report else 0,
            "speedup": times["eager"] / times["optimized"], "eager_ms": times["eager"] * 1e3,
            "rewritten_per_process": [sum(c != ORIGINAL for c in r) for r in runs],
            "same_sites": _same(runs), "max_sites": max(map(len, runs)), "first_s": first_s,
            "rewritten_per_process_kept": [sum(c != ORIGINAL for c in r) for r in runs_kept],
            "same_sites_kept": _same(runs_kept)}


def _decided_in_a_process(name: str, busy_cores: int, cache: str | None = None) -> list[str]:
    command = [sys.executable, __file__, "--decide", name, "--busy-cores", str(busy_cores)]
    return json.loads(subprocess.run(command + (["--cache", cache] if cache else []), capture_output=True,
                                     text=True, check=True).stdout)


def _same(runs: list[list[str]]) -> int:
    """How many sites got the same form in every run."""
    return sum(len({tuple(r)[i] if i < len(r) else None for r in runs}) == 1 for i in range(max(map(len, runs))))


def marks(busy_cores: int, libraries: str) -> tuple[str, str]:
    """RESULTS.md's section for runs of ``libraries``' models with ``busy_cores`` (one each)."""
    return f"<!-- bench:models{busy_cores}:{libraries} -->", f"<!-- /bench:models{busy_cores}:{libraries} -->"


def section(rows: list[dict], skipped: list[str], command: str, busy_cores: int, libraries: str) -> str:
    fp = fingerprint("cpu")
    lines = [marks(busy_cores, libraries)[0], f"## Real models ({libraries}), {busy_cores} busy core(s) at the first call",
             "", f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
             f"- machine: {fp['model']} ({fp['isa']}, {fp['threads']} threads), torch {torch.__version__}",
             f"- command: `{command}`", f"- busy cores during each first call: {busy_cores}", "",
             "Random weights, batch 1, inference. speedup: eager over optimized, timed side by side after the first "
             "call. first call: seconds of the optimized model's first call (capture, measurements, check). "
             "rewritten in 3 processes: sites not left on the original in each of 3 fresh processes, each with "
             "its own empty cache dir; same: sites whose form agreed in all 3. The same with one cache dir "
             "kept across the 3 (as a user's later runs on one machine find it): the figures the first "
             "process kept clean decide in the next. Where nothing is rewritten the optimized model runs the "
             "model's own forward, so a speedup off 1.00x there is this comparison's noise.", "",
             tabulate([(r["model"], r["sites"], r["rewritten"], f"{r['eager_ms']:.1f}", f"{r['speedup']:.2f}x",
                        f"{r['first_s']:.1f}", ", ".join(map(str, r["rewritten_per_process"])),
                        f"{r['same_sites']}/{r['max_sites']}", ", ".join(map(str, r["rewritten_per_process_kept"])),
                        f"{r['same_sites_kept']}/{r['max_sites']}")
                       for r in rows],
                      ["model", "sites", "rewritten", "eager ms", "speedup", "first call s", "rewritten in 3 processes",
                       "same", "rewritten, cache kept", "same, cache kept"],
                      tablefmt="github"), ""]
    if skipped:
        lines += [f"Not installed here, skipped: {', '.join(skipped)}.", ""]
    return "\n".join(lines + [marks(busy_cores, libraries)[1]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="a model name (repeatable)")
    p.add_argument("--busy-cores", type=int, default=0)
    p.add_argument("--decide", help=argparse.SUPPRESS)  # one process of the stability comparison
    p.add_argument("--cache", help=argparse.SUPPRESS)  # its cache dir
    args = p.parse_args(argv)
    if args.decide:
        print(json.dumps(chosen_forms(args.decide, args.busy_cores, args.cache)))
        return 0
    names = [n for n in MODELS if not args.only or n in args.only]
    available = [n for n in names if importlib.util.find_spec(MODELS[n][0]) is not None]
    rows = []
    for name in bar(available, desc="models", unit="model"):
        rows.append(bench_model(name, args.busy_cores))
        print(rows[-1], file=sys.stderr)
    command = command_line("models.py", argv)
    libraries = "+".join(sorted({MODELS[n][0] for n in available}))
    text = section(rows, [n for n in names if n not in available], command, args.busy_cores, libraries)
    publish(text, marks(args.busy_cores, libraries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
