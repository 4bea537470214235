"""Finding Edge TPUs and the processes that hold them, without opening anything.

Everything here reads sysfs, ``/dev`` and ``/proc`` under a ``root`` (``"/"`` by default) so
that tests can point it at a fake tree.

Facts used (Coral's documentation and the libedgetpu sources):

- A USB Accelerator enumerates as ``1a6e:089a`` (Global Unichip) until libedgetpu loads its
  firmware, then re-enumerates as ``18d1:9302`` (Google). Both are usable: the first opener
  loads the firmware.
- A PCIe / M.2 Edge TPU, with the ``gasket`` and ``apex`` kernel drivers, appears as
  ``/dev/apex_N`` with ``/sys/class/apex/apex_N``.
- One process owns a device: the PCIe driver refuses a second opener ("Failed to load
  delegate from libedgetpu.so.1"), and on USB a second opener can crash the first.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._spec import DeviceSpec

__all__ = [
    "USB_IDS",
    "EdgeTPUInfo",
    "Holder",
    "discover_edgetpus",
    "find_holders",
    "select_edgetpu",
    "what_was_searched",
]

#: (vendor, product) -> state of a USB Accelerator.
USB_IDS: dict[tuple[str, str], str] = {
    ("1a6e", "089a"): "unprogrammed",  # before libedgetpu loads the firmware
    ("18d1", "9302"): "ready",  # after
}


@dataclass(frozen=True)
class EdgeTPUInfo:
    """One Edge TPU seen on this machine.

    Attributes:
        bus: ``"usb"`` or ``"pci"``.
        index: its number among the Edge TPUs of that bus (libedgetpu's ``usb:N`` / ``pci:N``).
        path: the sysfs directory (``/sys/bus/usb/devices/2-1``, ``/sys/class/apex/apex_0``),
            or the device node for a PCIe device whose sysfs entry is missing.
        state: ``"ready"``; ``"unprogrammed"`` for a USB device still waiting for its
            firmware (libedgetpu loads it on open); ``"no-device-node"`` when sysfs shows a
            PCIe device but ``/dev/apex_N`` is missing.
        node: the device node a process opens (``/dev/apex_0``, ``/dev/bus/usb/002/003``),
            or None if unknown.
        usb_id: ``vendor:product`` for a USB device, else None.
    """

    bus: str
    index: int
    path: str
    state: str
    node: str | None
    usb_id: str | None = None

    @property
    def name(self) -> str:
        """``usb:0``, ``pci:1``...: the libedgetpu device string of this device."""
        return f"{self.bus}:{self.index}"

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict of this record."""
        return {
            "bus": self.bus,
            "index": self.index,
            "name": self.name,
            "path": self.path,
            "state": self.state,
            "node": self.node,
            "usb_id": self.usb_id,
        }


@dataclass(frozen=True)
class Holder:
    """A process that has a device node open."""

    pid: int
    comm: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.comm})"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _under(root: str | os.PathLike[str], absolute: str) -> Path:
    return Path(root) / absolute.lstrip("/")


def _int(text: str | None, default: int) -> int:
    return int(text) if text is not None and text.isdigit() else default


def _usb(root: str | os.PathLike[str]) -> list[EdgeTPUInfo]:
    base = _under(root, "/sys/bus/usb/devices")
    found: list[tuple[int, int, str, EdgeTPUInfo]] = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    for entry in entries:
        vendor, product = _read(entry / "idVendor"), _read(entry / "idProduct")
        if vendor is None or product is None:
            continue  # an interface (2-1:1.0) or a hub without ids
        state = USB_IDS.get((vendor.lower(), product.lower()))
        if state is None:
            continue
        busnum, devnum = _int(_read(entry / "busnum"), 0), _int(_read(entry / "devnum"), 0)
        node = f"/dev/bus/usb/{busnum:03d}/{devnum:03d}" if busnum and devnum else None
        info = EdgeTPUInfo(
            "usb",
            0,
            f"/sys/bus/usb/devices/{entry.name}",
            state,
            node,
            f"{vendor.lower()}:{product.lower()}",
        )
        found.append((busnum, devnum, entry.name, info))
    # libusb lists devices by bus and address; number them in that order.
    found.sort(key=lambda item: item[:3])
    return [
        EdgeTPUInfo("usb", i, info.path, info.state, info.node, info.usb_id)
        for i, (_, _, _, info) in enumerate(found)
    ]


def _pci(root: str | os.PathLike[str]) -> list[EdgeTPUInfo]:
    pattern = re.compile(r"apex_(\d+)$")
    numbers: set[int] = set()
    for folder in (_under(root, "/dev"), _under(root, "/sys/class/apex")):
        try:
            names = [p.name for p in folder.iterdir()]
        except OSError:
            continue
        numbers.update(int(m.group(1)) for n in names if (m := pattern.match(n)))
    out = []
    for i, number in enumerate(sorted(numbers)):
        node = f"/dev/apex_{number}"
        sysfs = f"/sys/class/apex/apex_{number}"
        has_node = _under(root, node).exists()
        has_sysfs = _under(root, sysfs).exists()
        out.append(
            EdgeTPUInfo(
                "pci",
                i,
                sysfs if has_sysfs else node,
                "ready" if has_node else "no-device-node",
                node if has_node else None,
            )
        )
    return out


def discover_edgetpus(root: str | os.PathLike[str] = "/") -> list[EdgeTPUInfo]:
    """Every Edge TPU visible under ``root``: PCIe devices first, then USB.

    Reads sysfs and lists ``/dev``; opens no device, so a device held by another process is
    listed too. Never raises: an unreadable directory counts as empty.
    """
    return _pci(root) + _usb(root)


def what_was_searched() -> str:
    """One line naming what :func:`discover_edgetpus` looks for (for error messages)."""
    ids = " or ".join(f"{v}:{p}" for v, p in USB_IDS)
    return (
        f"looked for USB devices {ids} in /sys/bus/usb/devices and for PCIe nodes "
        f"/dev/apex_N (/sys/class/apex/apex_N)"
    )


def find_holders(
    node: str, root: str | os.PathLike[str] = "/", *, exclude_self: bool = True
) -> list[Holder]:
    """The processes that have ``node`` (an absolute device path) open, by ``/proc/*/fd``.

    Reads every readable ``/proc/PID/fd`` under ``root``; processes of other users are
    invisible without privileges and are silently skipped. With ``exclude_self`` (the
    default) this process is left out. Never raises.
    """
    proc = _under(root, "/proc")
    holders = []
    try:
        pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    except OSError:
        return []
    for pid in pids:
        if exclude_self and pid == os.getpid() and Path(root) == Path("/"):
            continue
        fd_dir = proc / str(pid) / "fd"
        try:
            links = list(fd_dir.iterdir())
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == node:
                holders.append(Holder(pid, _read(proc / str(pid) / "comm") or "?"))
                break
    return holders


def select_edgetpu(spec: DeviceSpec, devices: Sequence[EdgeTPUInfo]) -> EdgeTPUInfo | None:
    """The device an ``edgetpu`` spec names among ``devices`` (discovery order), or None:
    ``edgetpu[:N]`` counts every bus, ``edgetpu:usb[:N]`` and ``edgetpu:pci[:N]`` one."""
    pool = [d for d in devices if not spec.bus or d.bus == spec.bus]
    index = spec.index or 0
    return pool[index] if index < len(pool) else None
