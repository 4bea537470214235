"""Show what a device server is doing: devices, models, clients, queues, rates, latency.

Rates, duty cycle and p50/p99 latency cover the last few seconds; counts cover the
server's life. Exits with status 1 and says so if no server answers at the socket.

examples:
  conveyor status
  conveyor status --socket /run/conveyor/tpu.sock
  conveyor status --json | jq '.devices[0].duty_cycle'
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from .._errors import ConveyorError

__all__ = ["add_arguments", "fetch", "render", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``conveyor status``' arguments on ``parser``."""
    parser.add_argument("--socket", metavar="PATH", type=socket_path,
                        help="the server's socket (default: as for conveyor serve)")
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")
    parser.add_argument("--timeout", metavar="S", type=positive_seconds, default=5.0,
                        help="seconds to wait for the server (default 5)")


def socket_path(text: str) -> str:
    """An argparse type: a socket path, not empty (that was taken as the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no socket")
    from .._device._client import long_socket_path

    why = long_socket_path(text)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return text


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def fetch(socket_path: str | None, timeout: float) -> dict[str, Any]:
    """One status snapshot. Raises ServerGone (no server) or another ConveyorError."""
    from .._device._client import query_status

    return query_status(socket_path, timeout)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _ms(value: float) -> str:
    if value <= 0:
        return "-"  # nothing ran in the window
    return f"{value:.2f}ms" if value < 100 else f"{value:.0f}ms"


def table(rows: list[list[str]]) -> list[str]:
    """Rows (the first is the header) as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render(status: dict[str, Any], client_rates: dict[int, float] | None = None) -> list[str]:
    """Human-readable lines of a status snapshot. ``client_rates`` (requests/s by client
    id) adds a column; by default the server's own per-client rates, where it gives them."""
    srv, totals = status["server"], status["totals"]
    if client_rates is None and status["clients"] and all(
            "requests_per_s" in c for c in status["clients"]):
        client_rates = {c["id"]: float(c["requests_per_s"]) for c in status["clients"]}
    req = totals["requests"]
    lines = [
        f"conveyor server pid {srv['pid']} v{srv['version']} up {_duration(srv['uptime_s'])}"
        f"  socket {srv.get('socket') or '-'}" + ("  STOPPING" if srv.get("stopping") else ""),
        f"requests: {req.get('ok', 0)} ok, {totals['errors']} errors"
        + "".join(f", {n} {k.replace('_', ' ')}" for k, n in sorted(req.items())
                  if k != "ok" and n)
        + f"  |  {totals['items_per_s']:.1f}/s  queue {totals['queue_depth']}"
        f"  running {totals['running']}  clients {totals['clients']}",
        "",
    ]
    rows = [["DEV", "SPEC", "STATE", "MODEL", "REQ/S", "DUTY", "P50", "P99", "SWITCHES",
             "ERRORS", "DONE"]]
    for d in status["devices"]:
        spec = str(d.get("spec", "?")) + (" (simulation)" if d.get("simulated") else "")
        rows.append([str(d["index"]), spec, d["state"], d.get("current_model") or "-",
                     f"{d['items_per_s']:.1f}", f"{100 * d['duty_cycle']:.1f}%",
                     _ms(d["p50_ms"]), _ms(d["p99_ms"]), str(d["model_switches"]),
                     str(d["errors"]), str(d["items"])])
    lines += table(rows)
    for d in status["devices"]:
        if d.get("failure"):
            lines.append(f"  device {d['index']} failed: {d['failure']}")
        if d.get("scheduling", "normal") != "normal":
            lines.append(f"  device {d['index']} thread: {d['scheduling']}")
        for model, choice in sorted((d.get("choices") or {}).items()):  # what auto chose
            lines.append(f"  device {d['index']} runs {model} on {choice.get('device')}: "
                         f"{choice.get('why')}")
    lines.append("")
    rows = [["MODEL", "DEVICES", "OK", "FAILED", "QUEUE AVG", "COMPUTE AVG"]]
    for m in status["models"]:
        ok = m["requests"].get("ok", 0)
        failed = sum(n for k, n in m["requests"].items() if k != "ok")
        q, c = m["queue"], m["compute"]
        rows.append([m["name"], ",".join(str(i) for i in m["devices"]), str(ok), str(failed),
                     _ms(1e3 * q["sum_s"] / q["count"]) if q["count"] else "-",
                     _ms(1e3 * c["sum_s"] / c["count"]) if c["count"] else "-"])
    lines += table(rows)
    lines.append("")
    header = ["CLIENT", "PID", "UID", "NAME", "QUEUED", "RUNNING", "DONE", "FAILED", "BUSY",
              "EXPIRED", "DEVICE TIME"]
    if client_rates is not None:
        header.append("REQ/S")
    rows = [header]
    for c in status["clients"]:
        row = [str(c["id"]), str(c["pid"]), str(c["uid"]), c["name"] or "-", str(c["queued"]),
               str(c["running"]), str(c["completed"]), str(c["failed"]), str(c["busy"]),
               str(c["deadline_exceeded"]), f"{c['device_s']:.2f}s"]
        if client_rates is not None:
            row.append(f"{client_rates.get(c['id'], 0.0):.1f}")
        rows.append(row)
    if len(rows) == 1:
        lines.append("no clients connected")
    else:
        lines += table(rows)
    return lines


def socket_to_use(given: str | None, command: str) -> str | None:
    """``--socket``, else the default path; None (and why printed) where the default
    cannot name a socket (an ``$XDG_RUNTIME_DIR`` too deep for a Unix socket's path)."""
    if given is not None:
        return given  # checked by the option's type
    from .._device._client import default_socket_path, long_socket_path

    path = str(default_socket_path())
    why = long_socket_path(path)
    if why is not None:
        print(f"conveyor {command}: {why} (the default path; pass --socket)", file=sys.stderr)
        return None
    return path


def run(args: argparse.Namespace) -> int:
    """Run ``conveyor status``: 0 on success, 1 if no server answers, 2 if the socket
    path cannot be one."""
    path = socket_to_use(args.socket, "status")
    if path is None:
        return 2
    try:
        status = fetch(path, args.timeout)
    except ConveyorError as exc:
        print(f"conveyor status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print("\n".join(render(status)))
    return 0
