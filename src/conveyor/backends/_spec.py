"""The device spec grammar, one for the API, the command line and the server.

Valid forms::

    cpu                 LiteRT on the CPU, default thread count
    cpu:N               LiteRT on the CPU with N threads
    edgetpu             the first Edge TPU found
    edgetpu:N           the N-th Edge TPU found (any bus)
    edgetpu:usb         the first USB Edge TPU;  edgetpu:usb:N the N-th
    edgetpu:pci         the first PCIe Edge TPU; edgetpu:pci:N the N-th
    sim-edgetpu         a simulated Edge TPU (profile usb3); sim-edgetpu:PROFILE for
                        another profile (usb3, usb2, pci, rpi4); sim-edgetpu:N and
                        sim-edgetpu:PROFILE:N for simulated device N (each its own device)
    onnx:cpu            ONNX Runtime, CPU execution provider (``onnx`` alone means this)
    onnx:cuda           ONNX Runtime, CUDA execution provider (onnx:cuda:N for GPU N)
    auto                an Edge TPU when one is present and the model has an Edge TPU build,
                        else the CPU; an .onnx file on ONNX Runtime's CPU provider
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import DeviceSpecError

__all__ = ["SIM_PROFILES", "VALID_FORMS", "DeviceSpec", "parse_device"]

#: The simulation profiles of ``sim-edgetpu:PROFILE`` (modelled in :mod:`.sim`).
SIM_PROFILES = ("usb3", "usb2", "pci", "rpi4")

VALID_FORMS = (
    "cpu",
    "cpu:N",
    "edgetpu",
    "edgetpu:N",
    "edgetpu:usb",
    "edgetpu:usb:N",
    "edgetpu:pci",
    "edgetpu:pci:N",
    "sim-edgetpu",
    "sim-edgetpu:PROFILE",
    "sim-edgetpu:N",
    "sim-edgetpu:PROFILE:N",
    "onnx:cpu",
    "onnx:cuda",
    "onnx:cuda:N",
    "auto",
)


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed device spec.

    Attributes:
        kind: ``cpu``, ``edgetpu``, ``sim-edgetpu``, ``onnx`` or ``auto``.
        bus: for ``edgetpu``: ``usb``, ``pci`` or ``""`` (any); for ``onnx``: the provider
            (``cpu`` or ``cuda``).
        index: the device number, or None for "the first" / default (for
            ``sim-edgetpu``: which simulated device, each with its own lock).
        profile: the simulation profile for ``sim-edgetpu``.
        threads: the CPU thread count for ``cpu``, or None for the default.
    """

    kind: str
    bus: str = ""
    index: int | None = None
    profile: str = ""
    threads: int | None = None

    def __str__(self) -> str:
        if self.kind == "cpu":
            return "cpu" if self.threads is None else f"cpu:{self.threads}"
        if self.kind == "edgetpu":
            parts = ["edgetpu"] + ([self.bus] if self.bus else [])
            parts += [] if self.index is None else [str(self.index)]
            return ":".join(parts)
        if self.kind == "sim-edgetpu":
            return ("sim-edgetpu" + (f":{self.profile}" if self.profile else "")
                    + ("" if self.index is None else f":{self.index}"))
        if self.kind == "onnx":
            return f"onnx:{self.bus}" + ("" if self.index is None else f":{self.index}")
        return self.kind

    @property
    def edgetpu_device_string(self) -> str:
        """The libedgetpu ``device`` option: ``""``, ``:N``, ``usb``, ``usb:N``, ``pci``..."""
        if self.bus:
            return self.bus if self.index is None else f"{self.bus}:{self.index}"
        return "" if self.index is None else f":{self.index}"


def _bad(spec: str, why: str) -> DeviceSpecError:
    return DeviceSpecError(
        f"invalid device spec {spec!r}: {why}; valid forms: {', '.join(VALID_FORMS)}"
    )


def _index(spec: str, text: str, what: str = "a device number") -> int:
    if not (text.isascii() and text.isdigit()):
        raise _bad(spec, f"{text!r} is not {what}")
    return int(text)


def parse_device(spec: str | DeviceSpec) -> DeviceSpec:
    """Parse a device spec string.

    Raises:
        DeviceSpecError: the message lists the valid forms.
    """
    if isinstance(spec, DeviceSpec):
        return spec
    if not isinstance(spec, str):
        raise DeviceSpecError(f"a device spec is a string such as 'cpu' or 'edgetpu:usb', "
                              f"got {type(spec).__name__} {spec!r}")
    if not spec.strip():
        raise _bad(spec, "empty")
    parts = spec.strip().lower().split(":")
    kind, rest = parts[0], parts[1:]
    if kind == "cpu":
        if not rest:
            return DeviceSpec("cpu")
        if len(rest) == 1:
            threads = _index(spec, rest[0], "a thread count")
            if threads < 1:
                raise _bad(spec, "the thread count must be at least 1")
            return DeviceSpec("cpu", threads=threads)
    elif kind == "edgetpu":
        if not rest:
            return DeviceSpec("edgetpu")
        if len(rest) == 1 and rest[0].isascii() and rest[0].isdigit():
            return DeviceSpec("edgetpu", index=int(rest[0]))
        if rest[0] in ("usb", "pci") and len(rest) <= 2:
            return DeviceSpec(
                "edgetpu", bus=rest[0], index=_index(spec, rest[1]) if len(rest) == 2 else None
            )
    elif kind == "sim-edgetpu":
        index = None
        if rest and rest[-1].isascii() and rest[-1].isdigit():
            index = int(rest.pop())
        if len(rest) <= 1:
            profile = rest[0] if rest else ""
            if rest and profile.lstrip("+-").isdigit():
                raise _bad(spec, f"{profile!r} is not a device number")
            if rest and profile not in SIM_PROFILES:
                profiles = ", ".join(f"sim-edgetpu:{p}" for p in SIM_PROFILES)
                raise _bad(spec, f"unknown simulation profile {profile!r} (profiles: "
                                 f"{profiles})")
            return DeviceSpec("sim-edgetpu", profile=profile, index=index)
    elif kind == "onnx":
        if not rest:
            return DeviceSpec("onnx", bus="cpu")
        if len(rest) == 1 and rest[0] in ("cpu", "cuda"):
            return DeviceSpec("onnx", bus=rest[0])
        if len(rest) == 2 and rest[0] == "cuda":
            return DeviceSpec("onnx", bus="cuda", index=_index(spec, rest[1]))
    elif kind == "auto" and not rest:
        return DeviceSpec("auto")
    raise _bad(spec, "not a known form")
