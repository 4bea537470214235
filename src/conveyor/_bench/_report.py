"""The bench's results as a table for people and as the JSON object of ``--json``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._measure import Result

__all__ = ["as_json", "headline", "table"]


def as_json(
    device: str, model: str, machine: dict[str, Any], alone: Result, results: Sequence[Result]
) -> dict[str, Any]:
    """``{"device", "model", "machine", "device_alone_items_per_s", "scenarios"}``.

    Each scenario has ``items_per_s``, ``duty_cycle``, ``p50_ms``, ``p99_ms``,
    ``cpu_cores``, ``ratio_to_device_alone`` and a few more (see :meth:`Result.summary`).
    """
    bound = alone.items_per_s
    return {
        "device": device,
        "model": model,
        "machine": machine,
        "device_alone_items_per_s": round(bound, 2),
        "scenarios": {r.name: r.summary(bound) for r in results},
    }


def table(data: dict[str, Any]) -> str:
    """The results as an aligned text table, with the device-alone bound first."""
    head = ("scenario", "items/s", "x alone", "device busy", "p50 ms", "p99 ms", "CPU cores")
    rows = [
        head,
        ("device alone", f"{data['device_alone_items_per_s']:.1f}", "1.00", "", "", "", ""),
    ]
    for name, s in data["scenarios"].items():
        rows.append(
            (
                name,
                f"{s['items_per_s']:.1f}",
                f"{s['ratio_to_device_alone']:.2f}",
                f"{s['duty_cycle']:.0%}",
                f"{s['p50_ms']:.1f}",
                f"{s['p99_ms']:.1f}",
                f"{s['cpu_cores']:.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def headline(data: dict[str, Any]) -> str:
    """One line: conveyor against threads_queues and the device alone."""
    sc = data["scenarios"]
    conv, tq = sc.get("conveyor"), sc.get("threads_queues")
    if conv is None or tq is None or not tq["items_per_s"]:
        return ""
    return (
        f"conveyor: {conv['items_per_s'] / tq['items_per_s']:.2f}x the items/s of "
        f"threads_queues, device busy {conv['duty_cycle']:.0%} "
        f"(threads_queues: {tq['duty_cycle']:.0%}), "
        f"{conv['ratio_to_device_alone']:.0%} of the device alone"
    )
