"""``auto``: the Edge TPU when one is present and the model has an Edge TPU build, else the CPU.

An ``.onnx`` file runs on ONNX Runtime's CPU execution provider (LiteRT cannot read it).

The choice is made per model at :meth:`AutoDevice.load` and recorded with its reason, which
:meth:`AutoDevice.describe` reports. The Edge TPU is opened (and so locked) only when a model
is about to run on it; if opening it fails (held by another process, runtime missing), the
model runs on the CPU and the reason says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._errors import DeviceError, InvalidModelError
from .._models import COMPILED_SUFFIX, base_name, resolve_model
from ._base import Device, Runner
from ._discovery import discover_edgetpus, what_was_searched
from ._spec import DeviceSpec
from .edgetpu import EdgeTPUDevice, edgetpu_pair, find_edgetpu_library
from .litert import LiteRTDevice

__all__ = ["AutoDevice"]


class AutoDevice(Device):
    """Chooses a backend per model (see the module docstring).

    ``root`` is where sysfs, ``/dev`` and ``/proc`` are read (tests use a fake tree).
    The constructor only looks (discovery, library lookup); it never fails for lack of an
    Edge TPU.
    """

    def __init__(self, spec: DeviceSpec | None = None, *, root: str = "/") -> None:
        self.spec = spec or DeviceSpec("auto")
        self._root = root
        self._cpu = LiteRTDevice(DeviceSpec("cpu"))
        self._tpu: EdgeTPUDevice | None = None
        self._onnx: Device | None = None
        self._tpu_error = ""
        self.choices: dict[str, tuple[str, str]] = {}
        devices = discover_edgetpus(root)
        library = find_edgetpu_library()
        if not devices:
            self._no_tpu = f"no Edge TPU found ({what_was_searched()})"
        elif not library.found:
            self._no_tpu = f"an Edge TPU is present but its runtime is missing: {library.reason}"
        else:
            self._no_tpu = ""
        self.edgetpus = devices

    def _open_tpu(self) -> EdgeTPUDevice | None:
        if self._tpu is None and not self._tpu_error:
            try:
                self._tpu = EdgeTPUDevice(DeviceSpec("edgetpu"), root=self._root)
            except DeviceError as exc:
                self._tpu_error = f"the Edge TPU could not be opened: {exc}"
        return self._tpu

    def load(self, model: str | Path) -> Runner:
        """Load ``model`` on the Edge TPU if usable and the model has a build for it, else the CPU.

        Blocks as the chosen backend's ``load`` (and, the first time the Edge TPU is chosen,
        while it opens).

        Raises:
            ModelNotFoundError, InvalidModelError: the model cannot be found or loaded.
            DeviceError: the chosen backend failed while loading.
        """
        path = resolve_model(model)
        if path.suffix.lower() == ".onnx":
            return self._load_onnx(path)
        try:
            plain, compiled = edgetpu_pair(path)
        except OSError as exc:  # unreadable (permissions, a /proc file...)
            raise InvalidModelError(f"cannot read model {path}: {exc}") from exc
        name = base_name(plain or compiled or path)
        why = self._no_tpu
        if not why and compiled is None:
            why = f"the model has no Edge TPU build ({name}{COMPILED_SUFFIX}.tflite beside it)"
        if not why:
            tpu = self._open_tpu()
            if tpu is not None:
                runner = tpu.load(compiled or path)
                self.choices[name] = (
                    f"edgetpu:{tpu.info.name}",
                    f"Edge TPU {tpu.info.name}: {compiled}",
                )
                return runner
            why = self._tpu_error
        if plain is None:
            # Only an Edge TPU build exists, and no Edge TPU: the CPU cannot run it either;
            # let LiteRT raise its EdgeTPUModelError, which says so.
            plain = path
        runner = self._cpu.load(plain)
        self.choices[name] = ("cpu", f"LiteRT on the CPU: {why}")
        return runner

    def _load_onnx(self, path: Path) -> Runner:
        if self._onnx is None:
            from .onnx import OnnxDevice

            self._onnx = OnnxDevice(DeviceSpec("onnx", bus="cpu"))
        runner = self._onnx.load(path)
        self.choices[base_name(path)] = (
            "onnx:cpu",
            "ONNX Runtime on the CPU: an ONNX model (neither LiteRT nor the Edge TPU reads it)",
        )
        return runner

    def describe(self) -> dict[str, Any]:
        """What was chosen for each loaded model and why, and the Edge TPUs seen."""
        return {
            **super().describe(),
            "backend": "auto",
            "edgetpus": [d.to_json() for d in self.edgetpus],
            "edgetpu_unusable": self._no_tpu or self._tpu_error or None,
            "choices": {m: {"device": d, "why": w} for m, (d, w) in self.choices.items()},
        }

    def close(self) -> None:
        """Close the Edge TPU if it was opened, and ONNX Runtime's device. Idempotent."""
        if self._onnx is not None:
            self._onnx.close()
            self._onnx = None
        if self._tpu is not None:
            self._tpu.close()
            self._tpu = None
