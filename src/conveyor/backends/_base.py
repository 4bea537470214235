"""The interface every backend implements.

A :class:`Device` is an opened accelerator (or the CPU); :meth:`Device.load` gives a
:class:`Runner` for one model on it. The device worker only ever talks to these two
classes, so it never knows which backend it drives.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import InvalidModelError
from .._tensors import Inputs, TensorSpec, prepare_inputs
from ._spec import DeviceSpec

__all__ = ["Device", "Runner", "copy_output"]


class Runner(abc.ABC):
    """One model loaded on one device. Not thread-safe: one ``run`` at a time."""

    model: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @abc.abstractmethod
    def run(self, arrays: Inputs) -> list[npt.NDArray[Any]]:
        """Run the model once.

        ``arrays``: one C-contiguous array per input, in model order, of the model's
        shapes and dtypes (passed as they are, checked in a microsecond), or anything
        else ``conveyor.infer`` accepts (an array for a one-input model, a dict by input
        name, float data for a quantised input), converted first. Returns the outputs in
        model order, in the model's dtypes. Blocks for the inference; the GIL is released
        while the backend computes.

        Raises:
            InputError: the inputs do not fit the model (says what it expects).
            DeviceError: the device failed.
        """

    def checked(self, arrays: Any) -> Sequence[npt.NDArray[Any]]:
        """``arrays`` as :meth:`run` needs them: as they are when they already fit the
        model exactly, else converted by ``prepare_inputs`` (which raises InputError)."""
        specs = self.inputs
        if type(arrays) in (list, tuple) and len(arrays) == len(specs):
            for arr, spec in zip(arrays, specs):
                if (type(arr) is not np.ndarray or arr.shape != spec.shape
                        or arr.dtype != spec.dtype or not arr.flags.c_contiguous):
                    break
            else:
                return arrays  # type: ignore[no-any-return]
        return prepare_inputs(specs, arrays, self.model)

    def run_into(
        self, arrays: Inputs, outputs: Sequence[npt.NDArray[Any]]
    ) -> None:
        """Run the model once and write its outputs into ``outputs`` (arrays of the
        model's output shapes and dtypes, in model order, such as shared-memory views).
        ``arrays`` as for :meth:`run`.

        The device worker calls this. The default copies what :meth:`run` returns; a
        backend that can read its results in place overrides it to save the
        intermediate arrays (for a 156 kB output, an allocation that faults in fresh
        pages and one copy: about 20 us a run measured here). Blocks and raises as
        :meth:`run` does.
        """
        for spec, dst, src in zip(self.outputs, outputs, self.run(arrays)):
            copy_output(self.model, spec, dst, src)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model's resources."""


class Device(abc.ABC):
    """An opened device that can load models."""

    spec: DeviceSpec
    #: True for a simulated device: every output that shows it says "simulation".
    simulated: bool = False

    @abc.abstractmethod
    def load(self, model: str | Path) -> Runner:
        """Load a model (bundled name or path) on this device.

        Raises:
            ModelNotFoundError, InvalidModelError, EdgeTPUModelError, DeviceError.
        """

    def describe(self) -> dict[str, Any]:
        """Facts about the device for ``status`` output."""
        return {"spec": str(self.spec), "simulated": self.simulated}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device."""


def copy_output(model: str, spec: TensorSpec, dst: npt.NDArray[Any],
                src: npt.NDArray[Any]) -> None:
    """Copy one output of a run into ``dst`` (of the shape the model declares).

    Raises:
        InvalidModelError: the run gave another shape (np.copyto would have broadcast
            it, and a pipeline quietly gave other values than the runner's own run).
    """
    if src.shape != dst.shape:
        raise InvalidModelError(
            f"{model}: output {spec.name!r} came out with shape {list(src.shape)}, but "
            f"the model declares {list(dst.shape)} (a dimension that depends on the data, "
            f"or a symbolic one taken as 1): conveyor needs outputs of fixed shapes")
    np.copyto(dst, src)


def zeros_like_specs(specs: Sequence[TensorSpec]) -> list[npt.NDArray[Any]]:
    """Zero-filled arrays of the given specs (used to warm a model up)."""
    return [np.zeros(s.shape, s.dtype) for s in specs]
