"""List the devices present and usable, and for each one that is not, why.

Looks without opening anything: Edge TPUs by sysfs and /dev (USB 1a6e:089a or 18d1:9302,
PCIe /dev/apex_N) with their bus path, state and the process holding each; libedgetpu;
the CPU (LiteRT version and cores); ONNX Runtime (version and execution providers); and the
simulated Edge TPU, which is always available and marked as a simulation.
Each line starts with the device spec to pass as --device.

examples:
  conveyor devices
  conveyor devices --json
"""

from __future__ import annotations

import argparse
import json
import os
from importlib import metadata
from typing import Any

from ..backends._discovery import discover_edgetpus, find_holders, what_was_searched
from ..backends._lock import lock_holder
from ..backends.edgetpu import find_edgetpu_library
from ..backends.sim import DEFAULT_PROFILE, PROFILES

__all__ = ["add_arguments", "run", "survey"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``conveyor devices``'s arguments on ``parser``."""
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _entry(
    spec: str, kind: str, available: bool, summary: str, why: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "spec": spec,
        "kind": kind,
        "available": available,
        "simulated": False,
        "summary": summary,
        "why": why,
        **extra,
    }


def _edgetpus(root: str) -> list[dict[str, Any]]:
    library = find_edgetpu_library()
    lib_text = f"libedgetpu: {library.library}" if library.found else library.reason
    devices = discover_edgetpus(root)
    if not devices:
        why = f"no Edge TPU found: {what_was_searched()}"
        if not library.found:
            why += f"; {library.reason}"
        return [
            _entry("edgetpu", "edgetpu", False, "not available", why=why, library=library.library)
        ]
    out = []
    for dev in devices:
        holders = [str(h) for h in find_holders(dev.node, root)] if dev.node else []
        owner = lock_holder(f"edgetpu-{dev.bus}-{dev.index}")
        if owner is not None:
            holders.insert(0, f"conveyor pid {owner}")
        reason: str | None = None
        if not library.found:
            reason = library.reason
        elif dev.node is None:
            reason = f"no device node for {dev.path} (is the apex driver loaded?)"
        elif holders:
            reason = f"busy: held by {', '.join(holders)} (share it with `conveyor serve`)"
        bus = f"USB {dev.usb_id}" if dev.bus == "usb" else "PCIe"
        summary = f"Edge TPU, {bus}, {dev.path}, {dev.state}; {lib_text}"
        out.append(
            _entry(
                f"edgetpu:{dev.name}",
                "edgetpu",
                reason is None,
                summary,
                why=reason,
                holders=holders,
                library=library.library,
                **dev.to_json(),
            )
        )
    return out


def _cpu() -> dict[str, Any]:
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cores
    version = _version("ai-edge-litert")
    if version is None:
        return _entry("cpu", "cpu", False, "not available", why="ai-edge-litert is not installed")
    return _entry(
        "cpu",
        "cpu",
        True,
        f"LiteRT {version} on the CPU, {usable} of {cores} cores",
        litert=version,
        cores=cores,
        usable_cores=usable,
    )


def _onnx() -> list[dict[str, Any]]:
    try:
        import onnxruntime as ort
    except ImportError:
        why = "onnxruntime is not installed (pip install 'conveyor[onnx]')"
        return [
            _entry("onnx:cpu", "onnx", False, "not available", why=why),
            _entry("onnx:cuda", "onnx", False, "not available", why=why),
        ]
    providers = list(ort.get_available_providers())
    version = str(ort.__version__)
    out = []
    for spec, provider in (
        ("onnx:cpu", "CPUExecutionProvider"),
        ("onnx:cuda", "CUDAExecutionProvider"),
    ):
        ok = provider in providers
        out.append(
            _entry(
                spec,
                "onnx",
                ok,
                f"ONNX Runtime {version}, {provider}" if ok else "not available",
                why=None
                if ok
                else f"onnxruntime {version} has no {provider} (available: {', '.join(providers)})",
                version=version,
                providers=providers,
            )
        )
    return out


def _sim() -> dict[str, Any]:
    profiles = [p + (" (default)" if p == DEFAULT_PROFILE else "") for p in PROFILES]
    owner = lock_holder("sim-edgetpu-0")
    entry = _entry(
        "sim-edgetpu",
        "sim-edgetpu",
        True,
        f"simulated Edge TPU (simulation, no hardware); profiles: {', '.join(profiles)}; "
        f"sim-edgetpu:N for simulated device N"
        + (f"; device 0 held by conveyor pid {owner}" if owner is not None else ""),
        profiles=list(PROFILES),
        holder=owner,
    )
    entry["simulated"] = True
    return entry


def survey(root: str = "/") -> list[dict[str, Any]]:
    """One entry per device kind (one per Edge TPU present): spec, available, summary, why.

    Opens no device and takes no lock; reads sysfs, /dev and /proc under ``root``. Never
    raises for a missing device or runtime: that becomes the entry's ``why``.
    """
    return [*_edgetpus(root), _cpu(), *_onnx(), _sim()]


def run(args: argparse.Namespace) -> int:
    """Run ``conveyor devices``: print the survey as text or JSON; always 0."""
    entries = survey()
    if args.json:
        print(json.dumps({"devices": entries}, indent=2))
        return 0
    width = max(len(e["spec"]) for e in entries) + 2
    for e in entries:
        if e["available"]:
            text = e["summary"]
        elif e["summary"] == "not available":
            text = f"not available: {e['why']}"
        else:
            text = f"{e['summary']}; not usable: {e['why']}"
        print(f"{e['spec']:<{width}}{text}")
    return 0
