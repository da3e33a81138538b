"""The crossover map: which channel-mix form is fastest over (channels, spatial size).

A regular grid of pointwise convs (batch 8, C -> C channels, channels-first input; 1D over
length L and 2D over an S x S image; inference and training) is timed form by form by
``python -m convrewrite.profile --plot`` (or the bench) and drawn as one coloured cell per
shape: the colour names the fastest form, the label its speedup over the plain conv. Cells
whose work exceeds ``MAX_MACS`` are left grey (not timed). Drawing needs matplotlib (``pip install "convrewrite[plot]"``).
"""

from __future__ import annotations

from pathlib import Path

from ...forms import registered_names
from .forms import ORIGINAL
from .spec import ChannelMixSpec

BATCH = 8
MAX_MACS = 1e9
SIZES = {1: (8, 32, 128, 512, 2048, 8192), 2: (4, 8, 16, 32, 64, 128)}  # L, or the side S of S x S
CHANNELS = (8, 16, 32, 64, 128, 256, 512, 1024)
MODES = ("infer", "train")


def grid(device="cpu", dtype="float32") -> list[ChannelMixSpec]:
    """The map's specs, in panel order (1D infer, 1D train, 2D infer, 2D train), work capped."""
    specs = []
    for ndim in (1, 2):
        for mode in MODES:
            for size in SIZES[ndim]:
                for c in CHANNELS:
                    if BATCH * size ** ndim * c * c <= MAX_MACS:
                        specs.append(ChannelMixSpec(BATCH, c, c, (size,) * ndim, dtype=dtype, device=device,
                                                    grad=mode == "train"))
    return specs


def cells(specs: list[ChannelMixSpec], entries: dict[str, dict[str, float]]) -> list[dict]:
    """The map's cells: each spec's figures from a cost table's ``entries``, with its coordinates."""
    return [{"ndim": s.ndim, "mode": s.mode, "channels": s.in_channels, "size": s.spatial[0], "times": entries[s.key()]}
            for s in specs if s.key() in entries]


def title(fp: dict, dtype: str) -> str:
    """The map's title: the machine of a table fingerprint, torch and the dtype."""
    where = fp.get("name") or f"{fp['model']}, {fp['threads']} threads"
    return f"convrewrite crossover map: {where}, torch {fp['torch']}, {dtype}"


def draw(cells: list[dict], path: str | Path, title: str) -> Path:
    """Draw ``cells`` (from ``measure``) as a 2 x 2 map (rows: mode; columns: 1D, 2D) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window or need a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    # one colour per form name, the same in every map of this install
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(sorted(registered_names(ChannelMixSpec.kind)))}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), squeeze=False)
    for col, ndim in enumerate((1, 2)):
        for row, mode in enumerate(MODES):
            _panel(axes[row][col], [c for c in cells if c["ndim"] == ndim and c["mode"] == mode], ndim, mode, colours)
    winners = sorted({min(c["times"], key=c["times"].get) for c in cells})
    fig.legend(handles=[Patch(color=colours[n], label=n) for n in winners], loc="lower center",
               ncol=len(winners), title="fastest form (label: its speedup over conv)")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _panel(ax, cells: list[dict], ndim: int, mode: str, colours: dict) -> None:
    if not cells:
        ax.set_axis_off()
        return
    channels = sorted({c["channels"] for c in cells})
    sizes = sorted({c["size"] for c in cells})
    ax.set_facecolor("0.93")  # cells not timed (over MAX_MACS) stay this grey
    for c in cells:
        best = min(c["times"], key=c["times"].get)
        x, y = channels.index(c["channels"]), sizes.index(c["size"])
        ax.add_patch(_cell(x, y, colours[best]))
        ax.text(x, y, f"{c['times'][ORIGINAL] / c['times'][best]:.1f}x", ha="center", va="center", fontsize=9)
    ax.set_xlim(-0.5, len(channels) - 0.5)
    ax.set_ylim(-0.5, len(sizes) - 0.5)
    ax.set_xticks(range(len(channels)), [str(c) for c in channels])
    ax.set_yticks(range(len(sizes)), [f"{s}" if ndim == 1 else f"{s}x{s}" for s in sizes])
    ax.set_xlabel("channels (C -> C)")
    ax.set_ylabel("length L" if ndim == 1 else "image S x S")
    ax.set_title(f"{ndim}D [{BATCH}, C, {'L' if ndim == 1 else 'S, S'}], {mode}"
                 f" ({'forward + backward' if mode == 'train' else 'forward'})")


def _cell(x: int, y: int, colour):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, color=colour)
