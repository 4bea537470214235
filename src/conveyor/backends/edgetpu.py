"""The Coral Edge TPU (USB, M.2, PCIe) through libedgetpu as a LiteRT external delegate.

Opening checks, in this order, so that each failure says what is missing and how to fix it:

1. discovery (sysfs, ``/dev``; nothing is opened): no device -> DeviceNotFoundError, which
   also says whether libedgetpu is installed;
2. libedgetpu (``libedgetpu.so.1``, or ``$CONVEYOR_EDGETPU_LIBRARY``) -> EdgeTPURuntimeMissingError;
3. conveyor's own per-device lock -> DeviceBusyError naming the conveyor process;
4. other processes holding the device node (``/proc/*/fd``) -> DeviceBusyError naming them;
   checked before libedgetpu touches the device, because on USB a second opener can crash
   the first;
5. ``load_delegate(library, {"device": "usb:0"})`` -> DeviceBusyError / DeviceError.

Models: an Edge TPU runs a model compiled by ``edgetpu_compiler``, stored as
``name_edgetpu.tflite`` beside ``name.tflite``. :meth:`EdgeTPUDevice.load` takes either name
and runs the compiled one (:func:`edgetpu_pair`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy.typing as npt

from .._errors import (
    DeviceBusyError,
    DeviceError,
    DeviceNotFoundError,
    DeviceSpecError,
    EdgeTPURuntimeMissingError,
    InvalidModelError,
    ModelError,
    ModelNotFoundError,
)
from .._models import COMPILED_SUFFIX, base_name, resolve_model
from .._tensors import Inputs
from ._base import Device, Runner
from ._discovery import (
    EdgeTPUInfo,
    discover_edgetpus,
    find_holders,
    select_edgetpu,
    what_was_searched,
)
from ._lock import DeviceLock, acquire_device_lock
from ._spec import DeviceSpec
from .litert import LiteRTRunner, is_edgetpu_model

__all__ = [
    "DEFAULT_LIBRARY",
    "LIBRARY_ENV",
    "EdgeTPUDevice",
    "LibraryStatus",
    "edgetpu_pair",
    "find_edgetpu_library",
    "select_edgetpu",
]

DEFAULT_LIBRARY = "libedgetpu.so.1"
LIBRARY_ENV = "CONVEYOR_EDGETPU_LIBRARY"

_INSTALL_HINT = (
    "install Coral's Edge TPU runtime, the Debian package `libedgetpu1-std` from Coral's apt "
    "repository (https://coral.ai/docs/accelerator/get-started/), or set "
    f"{LIBRARY_ENV} to the path of a libedgetpu.so"
)


@dataclass(frozen=True)
class LibraryStatus:
    """Where libedgetpu is, or why it is not usable.

    Attributes:
        library: what to pass to ``load_delegate`` (a soname or a path), or None if missing.
        reason: when missing, why (names what was tried); else ``""``.
    """

    library: str | None
    reason: str = ""

    @property
    def found(self) -> bool:
        """True if the library loads."""
        return self.library is not None


#: The entry point every TFLite external delegate exports; libedgetpu does.
DELEGATE_SYMBOL = "tflite_plugin_create_delegate"
DESTROY_SYMBOL = "tflite_plugin_destroy_delegate"


def _elf_problem(path: str) -> str | None:
    """Why the file at ``path`` is no whole ELF shared library, or None.

    dlopen maps a library's loadable segments; one that runs past the end of a truncated
    file kills the process with SIGBUS when the loader touches it, so a user-given file
    is checked first: the ELF header, the program headers, and every PT_LOAD segment
    inside the file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(64)
            size = os.fstat(f.fileno()).st_size
            if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) \
                    or data[5] not in (1, 2):
                return "not an ELF file"
            wide, order = data[4] == 2, "<" if data[5] == 1 else ">"
            if wide and len(data) < 64:
                return "truncated ELF header"
            if wide:
                phoff, = struct.unpack_from(order + "Q", data, 32)
                phentsize, phnum = struct.unpack_from(order + "HH", data, 54)
                entry = order + "IIQQQQQQ"  # type, flags, offset, vaddr, paddr, filesz...
            else:
                phoff, = struct.unpack_from(order + "I", data, 28)
                phentsize, phnum = struct.unpack_from(order + "HH", data, 42)
                entry = order + "IIIIIIII"  # type, offset, vaddr, paddr, filesz...
            need = struct.calcsize(entry)
            if phnum == 0 or phentsize < need or phoff + phentsize * phnum > size:
                return f"truncated: its program headers end past its {size} bytes"
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    for i in range(phnum):
        fields = struct.unpack_from(entry, table, i * phentsize)
        kind, offset, filesz = ((fields[0], fields[2], fields[5]) if wide
                                else (fields[0], fields[1], fields[4]))
        if kind == 1 and offset + filesz > size:  # PT_LOAD
            return (f"truncated: a loadable segment ends at byte {offset + filesz}, past "
                    f"the file's {size} bytes")
    return None


def _loads(name: str) -> str | None:
    """None if ``name`` loads with dlopen and is a TFLite delegate, else why not."""
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        return str(exc)
    for symbol in (DELEGATE_SYMBOL, DESTROY_SYMBOL):  # LiteRT calls both
        if not hasattr(lib, symbol):
            return f"it has no {symbol}: not a TFLite delegate such as libedgetpu"
    return None


def find_edgetpu_library() -> LibraryStatus:
    """Find libedgetpu: ``$CONVEYOR_EDGETPU_LIBRARY``, else ``libedgetpu.so.1`` on the loader path.

    Loads the library (dlopen) to prove it is usable; opens no device. Never raises.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            what = ("a folder, not a library file" if path.is_dir() else
                    "not a regular file" if path.exists() else "no such file")
            return LibraryStatus(None, f"{LIBRARY_ENV}={override}: {what}")
        # The file checked is the file loaded: a name without a slash would make dlopen
        # search the loader's path instead (and say "no such file" of one that is here).
        resolved = str(path.resolve())
        error = _elf_problem(resolved) or _loads(resolved)
        if error is not None:
            return LibraryStatus(None, f"{LIBRARY_ENV}={override} is not usable: {error}")
        return LibraryStatus(resolved)
    if _loads(DEFAULT_LIBRARY) is None:
        return LibraryStatus(DEFAULT_LIBRARY)
    found = ctypes.util.find_library("edgetpu")
    if found is not None and _loads(found) is None:
        return LibraryStatus(found)
    return LibraryStatus(
        None,
        f"{DEFAULT_LIBRARY} not found (the dynamic loader cannot load it"
        + (f"; ldconfig lists {found}, which does not load)" if found else ")"),
    )


def _device_list(devices: Sequence[EdgeTPUInfo]) -> str:
    if not devices:
        return "none"
    return ", ".join(f"{d.name} ({d.path}, {d.state})" for d in devices)


def edgetpu_pair(path: Path) -> tuple[Path | None, Path | None]:
    """``(plain, compiled)`` for a model file: ``name.tflite`` and ``name_edgetpu.tflite``.

    Either may be None when that file does not exist. A file is taken as compiled if its
    name ends in ``_edgetpu.tflite`` or it contains the Edge TPU custom op. Reads the file
    given (only when its name does not tell).
    """
    stem = path.stem
    if stem.endswith(COMPILED_SUFFIX):
        plain = path.with_name(stem[: -len(COMPILED_SUFFIX)] + path.suffix)
        return (plain if plain.is_file() else None, path if path.is_file() else None)
    if path.is_file() and is_edgetpu_model(path.read_bytes()):
        return (None, path)
    compiled = path.with_name(stem + COMPILED_SUFFIX + path.suffix)
    return (path if path.is_file() else None, compiled if compiled.is_file() else None)


class EdgeTPURunner(Runner):
    """A compiled model on an Edge TPU: a LiteRT interpreter with its own delegate."""

    def __init__(self, path: Path, delegate: Any, name: str) -> None:
        self._delegate = delegate
        self._litert = LiteRTRunner(path, delegates=[delegate], allow_edgetpu_ops=True)
        self.path = self._litert.path
        self.model = name
        self.inputs = self._litert.inputs
        self.outputs = self._litert.outputs

    def run(self, arrays: Inputs) -> list[npt.NDArray[Any]]:
        """Run once on the Edge TPU; blocks (GIL released) for the invoke.

        Raises:
            DeviceError: the device failed (for instance a USB device was unplugged).
        """
        return self._litert.run(arrays)

    def run_into(
        self, arrays: Inputs, outputs: Sequence[npt.NDArray[Any]]
    ) -> None:
        """As :meth:`run`, writing the outputs into ``outputs`` (see Runner.run_into)."""
        self._litert.run_into(arrays, outputs)

    def close(self) -> None:
        """Drop the interpreter, then its delegate (in that order: the delegate must outlive it)."""
        self._litert.close()
        self._delegate = None


class EdgeTPUDevice(Device):
    """One Edge TPU, owned by this process until :meth:`close`.

    ``root`` is where sysfs, ``/dev`` and ``/proc`` are read from (tests use a fake tree).
    Opening blocks only for discovery, the lock and loading libedgetpu's delegate (which
    loads the USB firmware on first use: up to a few seconds).

    Raises (from the constructor):
        DeviceSpecError: ``spec`` is not an ``edgetpu`` spec.
        DeviceNotFoundError: no Edge TPU matches the spec (lists what was found and searched).
        EdgeTPURuntimeMissingError: a device is present but libedgetpu is not installed.
        DeviceBusyError: another process holds the device (named when it can be).
        DeviceError: libedgetpu failed to open the device for another reason.
    """

    def __init__(self, spec: DeviceSpec | None = None, *, root: str = "/") -> None:
        self.spec = spec or DeviceSpec("edgetpu")
        if self.spec.kind != "edgetpu":
            raise DeviceSpecError(f"EdgeTPUDevice needs an edgetpu spec, got {self.spec}")
        self._root = root
        self._lock: DeviceLock | None = None
        self._delegate: Any = None
        devices = discover_edgetpus(root)
        library = find_edgetpu_library()
        info = select_edgetpu(self.spec, devices)
        if info is None:
            runtime = (
                f"libedgetpu: {library.library}"
                if library.found
                else f"also, the runtime is missing: {library.reason}; {_INSTALL_HINT}"
            )
            raise DeviceNotFoundError(
                f"no Edge TPU for device spec {str(self.spec)!r}: found {_device_list(devices)} "
                f"({what_was_searched()}); plug in a Coral USB Accelerator or install the "
                f"PCIe driver (gasket-dkms); {runtime}"
            )
        if library.library is None:
            raise EdgeTPURuntimeMissingError(
                f"Edge TPU {info.name} ({info.path}) is present but its runtime is missing: "
                f"{library.reason}; {_INSTALL_HINT}"
            )
        if info.node is None:
            raise DeviceError(
                f"Edge TPU {info.name} ({info.path}) has no device node /dev/"
                f"{Path(info.path).name}: is the apex driver loaded and udev running? (see "
                f"Coral's M.2 / PCIe setup guide)"
            )
        self.info = info
        self.library = library.library
        self._lock = acquire_device_lock(
            f"edgetpu-{info.bus}-{info.index}", f"Edge TPU {info.name}"
        )
        try:
            self._refuse_if_held()
            self._delegate = self._load_delegate()
        except BaseException:
            self._lock.release()
            raise

    def _busy_message(self, holders: Sequence[Any]) -> str:
        names = ", ".join(str(h) for h in holders)
        return (
            f"Edge TPU {self.info.name} ({self.info.node}) is held by {names}; a device "
            f"serves one process at a time: stop that process, or share the device by "
            f"running `conveyor serve` and connecting to it"
        )

    def _refuse_if_held(self) -> None:
        assert self.info.node is not None
        holders = find_holders(self.info.node, self._root)
        if holders:
            raise DeviceBusyError(self._busy_message(holders))

    def _load_delegate(self) -> Any:
        """A new libedgetpu delegate for this device; blocks while libedgetpu opens it."""
        from ai_edge_litert.interpreter import load_delegate

        assert self.info.node is not None
        try:
            return load_delegate(self.library, {"device": self.info.name})
        except AttributeError as exc:  # no delegate entry point: not libedgetpu after all
            raise EdgeTPURuntimeMissingError(
                f"{self.library} is not an Edge TPU runtime ({exc}); {_INSTALL_HINT}"
            ) from exc
        except (ValueError, RuntimeError, OSError) as exc:
            holders = find_holders(self.info.node, self._root)
            if holders:
                raise DeviceBusyError(self._busy_message(holders)) from exc
            if not os.access(Path(self._root) / self.info.node.lstrip("/"), os.R_OK | os.W_OK):
                group = "apex" if self.info.bus == "pci" else "plugdev"
                raise DeviceError(
                    f"no permission to open {self.info.node} for Edge TPU {self.info.name}: "
                    f"add your user to the {group!r} group (Coral's udev rules), then log in "
                    f"again"
                ) from exc
            raise DeviceError(
                f"libedgetpu could not open Edge TPU {self.info.name} ({self.info.path}): "
                f"{str(exc).strip()}; it may be held by a process this user cannot see "
                f"(another user's), or need a replug"
            ) from exc

    def load(self, model: str | Path) -> Runner:
        """Load the Edge TPU build of ``model`` (a bundled name or a path, plain or compiled).

        Blocks while libedgetpu sends the model's parameters to the device.

        Raises:
            ModelNotFoundError: neither the model nor its ``_edgetpu.tflite`` build exists.
            InvalidModelError: the file is not a TFLite model LiteRT can load.
            DeviceError: the device is closed, or libedgetpu failed.
        """
        if self._delegate is None:
            raise DeviceError(f"Edge TPU {self.spec} is closed")
        path = resolve_model(model)
        plain, compiled = edgetpu_pair(path)
        if compiled is None:
            raise ModelNotFoundError(
                f"no Edge TPU build of {path.name}: expected {path.stem}{COMPILED_SUFFIX}"
                f"{path.suffix} beside it (compile it with Coral's edgetpu_compiler), or run "
                f"the plain model on the CPU (device 'cpu' or 'auto')"
            )
        try:
            return EdgeTPURunner(compiled, self._load_delegate(), base_name(plain or compiled))
        except ModelError:
            raise
        except OSError as exc:
            raise InvalidModelError(f"cannot read model {compiled}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        """The device's bus, path, node, state and library."""
        return {
            **super().describe(),
            "backend": "edgetpu",
            **self.info.to_json(),
            "library": self.library,
        }

    def close(self) -> None:
        """Release the delegate and the device lock. Idempotent; never blocks."""
        self._delegate = None
        if self._lock is not None:
            self._lock.release()
