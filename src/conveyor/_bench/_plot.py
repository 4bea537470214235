"""The bench's picture: where the device idles, and what each design gets done.

Top: for each design tutorials teach and for conveyor, one above the other, a timeline
over a short window: the device's
busy spans on the first row, with every moment it idles shaded red, and below it each CPU
worker's spans. Bottom: items/s per design as bars, with the device alone (the physical
bound) as a dashed line. Needs matplotlib (the ``plot`` extra); draws off-screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._measure import Result, Span, busy_within

__all__ = ["CONVEYOR_DESIGNS", "TIMELINES", "WINDOW_MS", "plot", "plot_format"]

#: Length of the timeline window in milliseconds: short enough that a gap of a tenth of a
#: millisecond between two runs is still a visible red mark.
WINDOW_MS = 40.0

_DEVICE = "#2e7d32"
_IDLE = "#e53935"
_CPU = "#1e88e5"
_MAIN = "#8e24aa"
_BAR = "#90a4ae"
_BAR_CONVEYOR = "#43a047"
#: Designs built on conveyor (drawn green in the bar chart); the others are tutorial designs.
CONVEYOR_DESIGNS = ("conveyor", "server_1", "server_4", "two_programs")

# Tracks shown per design, in order; the device is always first.
_HIDDEN = ("device calls",)


#: The designs whose timelines are drawn, one above the other: the ones tutorials
#: teach, then conveyor.
TIMELINES = ("sequential", "asyncio", "threads", "threads_queues", "conveyor")


def plot_format(path: str | Path) -> str:
    """The image format for ``path``: its extension, or ``png`` without one.

    Raises:
        ValueError: matplotlib cannot write that format (the message lists what it can).
        ModuleNotFoundError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = Path(path).suffix.lower().lstrip(".") or "png"
    known = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in known:
        raise ValueError(f"cannot write .{fmt} images; use .png, or one of "
                         f"{', '.join('.' + k for k in sorted(known))}")
    return fmt


def _window(result: Result, window_ns: int) -> tuple[int, int]:
    """A window of ``window_ns`` in the middle of the result's measured run."""
    mid = (result.start_ns + result.end_ns) // 2
    start = max(result.start_ns, mid - window_ns // 2)
    return start, min(result.end_ns, start + window_ns)


def _clip(spans: Sequence[Span], lo: int, hi: int) -> list[tuple[float, float]]:
    """Spans inside [lo, hi] as (start_ms, width_ms) from ``lo``."""
    out = []
    for s, e in spans:
        a, b = max(s, lo), min(e, hi)
        if b > a:
            out.append(((a - lo) / 1e6, (b - a) / 1e6))
    return out


def _gaps(spans: list[tuple[float, float]], length: float) -> list[tuple[float, float]]:
    """The complement of ``spans`` (sorted, not overlapping) within [0, length]."""
    gaps = []
    at = 0.0
    for s, w in sorted(spans):
        if s > at:
            gaps.append((at, s - at))
        at = max(at, s + w)
    if at < length:
        gaps.append((at, length - at))
    return gaps


def _timeline(ax: Any, result: Result, window_ms: float) -> None:
    lo, hi = _window(result, int(window_ms * 1e6))
    length = (hi - lo) / 1e6
    tracks = [name for name in result.timeline.tracks if name not in _HIDDEN and name != "device"]
    rows = ["device", *tracks]
    height = 0.7
    for row, name in enumerate(rows):
        y = len(rows) - 1 - row
        spans = _clip(result.timeline.tracks.get(name, []), lo, hi)
        if name == "device":
            ax.broken_barh(
                _gaps(spans, length),
                (y - height / 2, height),
                facecolors=_IDLE,
                linewidth=0,
            )
            ax.broken_barh(spans, (y - height / 2, height), facecolors=_DEVICE)
        else:
            color = _MAIN if name == "main" else _CPU
            ax.broken_barh(
                spans, (y - height / 2, height), facecolors=color, edgecolor="white", linewidth=0.4
            )
    labels = [
        "device" if n == "device" else ("caller (finish)" if n == "main" else n) for n in rows
    ]
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(reversed(labels)), fontsize=8)
    ax.set_xlim(0, window_ms)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    busy = busy_within(result.timeline.tracks.get("device", []), lo, hi) / max(hi - lo, 1)
    ax.set_title(
        f"{result.name}: {result.items_per_s:.0f} items/s; device busy "
        f"{result.duty_cycle:.0%} of the run ({busy:.0%} in this window)",
        fontsize=10,
        loc="left",
    )
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)


def _bars(ax: Any, results: Sequence[Result], device_alone: float, title: str) -> None:
    names = [r.name for r in results]
    values = [r.items_per_s for r in results]
    colors = [_BAR_CONVEYOR if r.name in CONVEYOR_DESIGNS else _BAR for r in results]
    ypos = list(range(len(results)))[::-1]
    ax.barh(ypos, values, color=colors, height=0.65)
    top = max([device_alone, *values]) * 1.3
    for y, r in zip(ypos, results):
        share = r.items_per_s / device_alone if device_alone > 0 else 0.0
        text = f"{r.items_per_s:.0f}/s = {share:.0%} of alone; device busy {r.duty_cycle:.0%} "
        if r.items_per_s > 0.45 * top:  # room inside the bar
            ax.text(r.items_per_s, y, text, va="center", ha="right", fontsize=8)
        else:
            ax.text(r.items_per_s, y, " " + text, va="center", ha="left", fontsize=8)
    ax.axvline(device_alone, color="black", linestyle="--", linewidth=1.2)
    ax.text(
        device_alone,
        len(results) - 0.45,
        f"device alone (the bound): {device_alone:.0f}/s ",
        fontsize=8,
        va="bottom",
        ha="right",
    )
    ax.set_yticks(ypos)
    ax.set_yticklabels(names, fontsize=9)
    ax.set_xlim(0, top)
    ax.set_ylim(-0.6, len(results) + 0.2)
    ax.set_xlabel("items per second (higher is better)", fontsize=9)
    ax.set_title(title, fontsize=10, loc="left")
    ax.tick_params(axis="x", labelsize=8)


def plot(
    path: Path,
    results: Sequence[Result],
    device_alone: float,
    *,
    title: str,
    timelines: Sequence[str] = TIMELINES,
    window_ms: float = WINDOW_MS,
) -> Path:
    """Draw the picture for ``results`` into the file at ``path``; returns ``path``.

    ``timelines`` names the designs whose timelines are drawn (those present). The
    format is the file name's extension (see :func:`plot_format`), PNG without one.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (``pip install conveyor[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    by_name = {r.name: r for r in results}
    shown = [by_name[n] for n in timelines if n in by_name]
    rows = [
        1 + len([t for t in r.timeline.tracks if t not in _HIDDEN and t != "device"]) for r in shown
    ]
    heights = [max(r, 2) * 0.42 + 0.5 for r in rows] + [0.38 * len(results) + 1.0]
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(11, sum(heights) + 0.9), gridspec_kw={"height_ratios": heights}
    )
    axes = list(axes) if len(heights) > 1 else [axes]
    for ax, r in zip(axes, shown):
        _timeline(ax, r, window_ms)
    if shown:
        axes[len(shown) - 1].set_xlabel(
            f"milliseconds ({window_ms:.0f} ms from the middle of each run)", fontsize=9
        )
        axes[0].legend(
            handles=[
                Patch(color=_DEVICE, label="device running the model"),
                Patch(color=_IDLE, label="device idle"),
                Patch(color=_CPU, label="CPU worker: prepare"),
                Patch(color=_MAIN, label="caller: finish"),
            ],
            loc="lower right",
            bbox_to_anchor=(1.0, 1.12),
            ncol=4,
            fontsize=8,
            frameon=False,
        )
    _bars(axes[-1], results, device_alone, "items/s per design")
    axes[-1].legend(
        handles=[
            Patch(color=_BAR, label="designs tutorials teach"),
            Patch(color=_BAR_CONVEYOR, label="built on conveyor"),
        ],
        loc="lower right",
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format=plot_format(path))
    plt.close(fig)
    return path
