"""LiteRT (the maintained TensorFlow Lite runtime, ``ai-edge-litert``) on the CPU.

This is the default backend: it runs anywhere the wheel installs. External delegates (the
Edge TPU) reuse :class:`LiteRTRunner` with a delegate; see :mod:`conveyor.backends.edgetpu`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from .._errors import DeviceError, EdgeTPUModelError, InvalidModelError, ModelError
from .._models import base_name, resolve_model
from .._tensors import Inputs, TensorSpec
from ._base import Device, Runner, copy_output
from ._spec import DeviceSpec

__all__ = ["EDGETPU_CUSTOM_OP", "LiteRTDevice", "LiteRTRunner", "check_tflite_file"]

EDGETPU_CUSTOM_OP = b"edgetpu-custom-op"
#: The most of one LiteRT error message that a DeviceError carries.
_MAX_ERROR_CHARS = 1000


def check_tflite_file(path: Path) -> bytes:
    """Read a model file and check it is a TFLite flatbuffer; return its bytes.

    Raises:
        InvalidModelError: the file is not a TFLite model (the message shows what it found).
    """
    data = path.read_bytes()
    # A TFLite flatbuffer carries the file identifier "TFL3" at byte offset 4.
    if len(data) < 8 or data[4:8] != b"TFL3":
        hint = ""
        if path.suffix.lower() == ".onnx":
            hint = "; an ONNX model runs on ONNX Runtime: device 'onnx' (or 'auto')"
        raise InvalidModelError(
            f"{path} is not a TFLite model: expected the identifier b'TFL3' at byte 4, "
            f"found {data[4:8]!r} ({len(data)} bytes){hint}"
        )
    return data


#: What LiteRT's C++ core prints on stderr when it first applies its default CPU delegate.
_XNNPACK_NOTICE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
_notice_lock = threading.RLock()
_notice_seen = False  # LiteRT prints it once per process


@contextmanager
def without_xnnpack_notice() -> Iterator[None]:
    """Hold back LiteRT's "Created ... XNNPACK delegate" line, which no setting silences
    from Python, so it does not break into a program's output (the demo's, a progress bar).

    Until the line has been seen in this process, the C-level stderr (descriptor 2) goes
    to a temporary file while the block runs; then everything written there but that
    line goes on to the real stderr, in order, whether the block raised or not. Where
    descriptor 2 cannot be redirected (no temporary file, no descriptor 2), the block
    just runs. A process another thread starts while the block runs inherits the file as
    its stderr: what it writes after the block is lost (the block is the building of an
    interpreter, a few milliseconds, once a process).
    """
    global _notice_seen
    if _notice_seen:
        yield
        return
    with _notice_lock:
        held: IO[bytes] | None = None
        real = -1
        try:
            held = tempfile.TemporaryFile()  # noqa: SIM115 - closed at the end
            _flush_stderr()
            real = os.dup(2)
            os.dup2(held.fileno(), 2)
        except (OSError, ValueError):
            if real >= 0:
                os.close(real)
                real = -1
        try:
            yield
        finally:
            if real >= 0 and held is not None:
                _flush_stderr()
                os.dup2(real, 2)
                os.close(real)
                held.seek(0)
                text = held.read()
                if _XNNPACK_NOTICE in text:
                    _notice_seen = True
                    text = text.replace(_XNNPACK_NOTICE, b"", 1)
                with contextlib.suppress(OSError):
                    while text:
                        text = text[os.write(2, text):]
            if held is not None:
                held.close()


def _flush_stderr() -> None:
    """Flush Python's stderr, where there is one (None under pythonw and some daemons)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()


def is_edgetpu_model(data: bytes) -> bool:
    """True if the flatbuffer uses the Edge TPU custom op (compiled by edgetpu_compiler)."""
    return EDGETPU_CUSTOM_OP in data


def _specs(details: list[dict[str, Any]], path: Path) -> tuple[TensorSpec, ...]:
    specs = []
    for d in details:
        if np.dtype(d["dtype"]).kind in "OSUV":
            raise InvalidModelError(
                f"{path}: tensor {d['name']!r} holds strings or objects (dtype "
                f"{np.dtype(d['dtype'])}), which conveyor does not pass: numeric and bool "
                f"tensors only")
        scale, zero_point = d.get("quantization", (0.0, 0))
        specs.append(
            TensorSpec(
                name=str(d["name"]),
                shape=tuple(int(x) for x in d["shape"]),
                dtype=np.dtype(d["dtype"]),
                scale=float(scale),
                zero_point=int(zero_point),
            )
        )
    return tuple(specs)


class LiteRTRunner(Runner):
    """A model in a LiteRT interpreter, optionally with external delegates."""

    def __init__(
        self,
        model: str | Path,
        *,
        threads: int | None = None,
        delegates: Sequence[Any] = (),
        allow_edgetpu_ops: bool = False,
    ) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = resolve_model(model)
        self.model = base_name(self.path)  # name_edgetpu.tflite serves as name
        data = check_tflite_file(self.path)
        if is_edgetpu_model(data) and not allow_edgetpu_ops:
            raise EdgeTPUModelError(
                f"{self.path} is compiled for the Edge TPU (it uses the custom op "
                f"'edgetpu-custom-op'); open it on an Edge TPU device (device='edgetpu'), "
                f"or use the plain model it was compiled from on the CPU"
            )
        try:
            with without_xnnpack_notice():
                self._interp = Interpreter(
                    model_content=data,
                    num_threads=threads,
                    experimental_delegates=list(delegates) or None,
                )
                self._interp.allocate_tensors()
            # (A tensor name that is not UTF-8 fails here, as a ValueError.)
            self._in = self._interp.get_input_details()
            self._out = self._interp.get_output_details()
        except (ValueError, RuntimeError) as exc:
            raise InvalidModelError(f"LiteRT could not load {self.path}: {exc}") from exc
        self._last_error = ""  # LiteRT's text of the last failed run (see _failed)
        self.inputs = _specs(self._in, self.path)
        self.outputs = _specs(self._out, self.path)
        self._in_idx = [int(d["index"]) for d in self._in]
        self._out_idx = [int(d["index"]) for d in self._out]

    def run(self, arrays: Inputs) -> list[npt.NDArray[Any]]:
        arrays = self.checked(arrays)
        try:
            self._invoke(arrays)
            return [self._interp.get_tensor(idx) for idx in self._out_idx]
        except (ValueError, RuntimeError) as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: Exception) -> DeviceError:
        """The error for a failed run, with LiteRT's message of this failure only.

        The interpreter's error reporter keeps every message it was given and repeats
        them all in the next exception, so the Nth failure's text holds N copies: the
        text of the failure before is cut off the front, and what is left is capped.
        """
        full = str(exc)
        previous, self._last_error = self._last_error, full
        text = full
        if previous and len(full) > len(previous) and full.startswith(previous):
            text = full[len(previous):]
        if len(text) > _MAX_ERROR_CHARS:
            text = text[:_MAX_ERROR_CHARS] + f"... ({len(text) - _MAX_ERROR_CHARS} more)"
        return DeviceError(f"LiteRT failed running {self.model}: {text}")

    def run_into(
        self, arrays: Inputs, outputs: Sequence[npt.NDArray[Any]]
    ) -> None:
        """Run once and copy the outputs from the interpreter's own buffers into
        ``outputs`` (no intermediate arrays). Raises as :meth:`run` does."""
        arrays = self.checked(arrays)
        try:
            self._invoke(arrays)
        except (ValueError, RuntimeError) as exc:
            raise self._failed(exc) from exc
        for idx, spec, dst in zip(self._out_idx, self.outputs, outputs):
            # A view of the interpreter's buffer, dropped at once: LiteRT refuses to
            # invoke again while one is alive.
            copy_output(self.model, spec, dst, self._interp.tensor(idx)())

    def _invoke(self, arrays: Sequence[npt.NDArray[Any]]) -> None:
        if self._interp is None:
            raise DeviceError(f"the runner of {self.model} is closed")
        for idx, arr in zip(self._in_idx, arrays):
            self._interp.set_tensor(idx, arr)
        self._interp.invoke()  # releases the GIL while it runs

    def close(self) -> None:
        self._interp = None


class LiteRTDevice(Device):
    """The CPU through LiteRT (XNNPACK kernels)."""

    def __init__(self, spec: DeviceSpec | None = None) -> None:
        self.spec = spec or DeviceSpec("cpu")

    def load(self, model: str | Path) -> Runner:
        try:
            return LiteRTRunner(model, threads=self.spec.threads)
        except ModelError:
            raise
        except OSError as exc:
            raise InvalidModelError(f"cannot read model {model}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": "litert", "cpus": os.cpu_count()}
