"""A simulated Edge TPU, for tests and benchmarks on machines without one.

It is a **simulation** everywhere it shows (``describe()["simulated"]`` is True and its text
says "simulation"): no hardware is touched and no inference is computed per run.

What it reproduces of a real Edge TPU:

- **Latency per model**, from the model itself (see :func:`sim_latency`)::

      latency = fixed + macs / MAC_RATE + (input_bytes + output_bytes) / bus
                + param_bytes / bus                     if the model on the chip changed
                + max(0, param_bytes - CACHE) / bus     otherwise (parameters that do not
                                                         fit the cache stream every run)

  with the model's MACs, parameter bytes and 8-bit I/O bytes counted from its flatbuffer
  (:mod:`conveyor.backends._modelcost`), and per-profile ``fixed`` and ``bus`` below.
- **Parameter cache swaps**: about 8 MB of parameters stay on the chip between runs of one
  model; running another model reloads its parameters over the bus. The first run after
  opening pays the load too (Coral: "the first inference is slow").
- **Exclusive ownership**: one process per device, through the same lock as the real
  device (:mod:`conveyor.backends._lock`); a second opener gets DeviceBusyError.
- **No host CPU while running**: :meth:`SimRunner.run` sleeps until just before the
  run's deadline (``time.sleep`` blocks in the kernel and releases the GIL), by the
  wake-up lateness it measures, then yields until the deadline (tens of microseconds per
  run), so that a run never ends early. Runs on one device are serialised, as on the chip.

Outputs: for each loaded model, the real model's outputs for an all-zero input tensor
(zero-point-filled for quantised inputs, i.e. real value 0), computed once at
:meth:`SimEdgeTPUDevice.load` with LiteRT on the CPU and copied out on every run. They have
the model's shapes and dtypes and are values that post-processing handles (for the face
detectors: a blank frame, no face). A model that LiteRT cannot run on the CPU (an Edge TPU
build without its plain model beside it) gives zeros at each output's zero point.

Calibration and assumptions (sources):

- Coral, "Edge TPU performance benchmarks" (coral.ai/docs/edgetpu/benchmarks): MobileNet v2
  (224x224) about 2.3-2.6 ms on an x86 host with the USB Accelerator on USB 3, about 4.6 ms on
  a Raspberry Pi 4; SSD MobileNet v2 about 7.2 ms.
- Sandler et al., "MobileNetV2" (2018), table 4: MobileNet v2 1.0/224 has 300 M
  multiply-adds and 3.47 M parameters; table 6: SSDLite with MobileNet v2 has 0.8 G.
- ``MAC_RATE`` is fitted so that MobileNet v2 takes 2.45 ms on ``usb3`` (the middle of
  2.3-2.6). Check against SSD MobileNet v2 (300x300x3 input): with 0.8 G MACs (the
  SSDLite count, a lower bound for Coral's SSD) the formula gives 5.6 ms, or 6.2 ms if the
  raw 1917 x (4 + 91) box and class tensors cross the bus, against the published 7.2 ms,
  which also includes the detection post-processing op that runs on the host CPU and is not
  simulated.
- Bus rates are assumptions, effective (not signalling) rates: USB 3 about 320 MB/s, USB 2
  about 35 MB/s, PCIe (Gen2 x1, M.2) about 500 MB/s. Fixed per-run costs (round trips,
  driver) are assumptions too: 0.3 ms on USB 3, 0.5 ms on USB 2, 0.1 ms on PCIe.
- Parameter cache: "about 8 MB" (Coral, "Run multiple models with multiple Edge TPUs" and
  the compiler's parameter-caching notes); 8 MiB here.
- ``rpi4``: USB 3 with the fixed cost raised so that MobileNet v2 takes 4.6 ms.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import DeviceError, DeviceSpecError, InvalidModelError, ModelError
from .._models import base_name, resolve_model
from .._tensors import Inputs, TensorSpec
from ._base import Device, Runner
from ._lock import DeviceLock, acquire_device_lock
from ._modelcost import ModelCost, model_cost
from ._spec import DeviceSpec
from .edgetpu import edgetpu_pair
from .litert import _specs, check_tflite_file, is_edgetpu_model, without_xnnpack_notice

__all__ = [
    "CACHE_BYTES",
    "MAC_RATE",
    "MOBILENET_V2",
    "PROFILES",
    "SimEdgeTPUDevice",
    "SimProfile",
    "SimRunner",
    "SimStats",
    "SimTiming",
    "sim_latency",
]


@dataclass(frozen=True)
class SimProfile:
    """How the simulated device is attached.

    Attributes:
        name: the profile name used in ``sim-edgetpu:NAME``.
        bus_bytes_per_s: effective transfer rate for tensors and parameters.
        fixed_s: fixed cost of one run (bus round trips, driver, host-side work).
        description: one line for ``describe()``.
    """

    name: str
    bus_bytes_per_s: float
    fixed_s: float
    description: str


#: MobileNet v2 1.0/224, the calibration model (see the module docstring).
MOBILENET_V2 = ModelCost(
    "mobilenet_v2_1.0_224",
    param_bytes=3_470_000,
    macs=300_000_000,
    input_bytes=224 * 224 * 3,
    output_bytes=1001,
)
_USB3_BYTES_PER_S = 320e6
_USB3_FIXED_S = 0.3e-3
_MOBILENET_V2_USB3_S = 2.45e-3
#: Effective multiply-accumulates per second, fitted on MobileNet v2 over USB 3.
MAC_RATE = MOBILENET_V2.macs / (
    _MOBILENET_V2_USB3_S
    - _USB3_FIXED_S
    - (MOBILENET_V2.input_bytes + MOBILENET_V2.output_bytes) / _USB3_BYTES_PER_S
)
#: On-chip parameter cache.
CACHE_BYTES = 8 * 2**20
_RPI4_EXTRA_S = 4.6e-3 - _MOBILENET_V2_USB3_S

PROFILES: dict[str, SimProfile] = {
    p.name: p
    for p in (
        SimProfile(
            "usb3",
            _USB3_BYTES_PER_S,
            _USB3_FIXED_S,
            "USB Accelerator on a USB 3 port of an x86 host",
        ),
        SimProfile("usb2", 35e6, 0.5e-3, "USB Accelerator on a USB 2 port"),
        SimProfile("pci", 500e6, 0.1e-3, "M.2 / PCIe Edge TPU (Gen2 x1)"),
        SimProfile(
            "rpi4",
            _USB3_BYTES_PER_S,
            _USB3_FIXED_S + _RPI4_EXTRA_S,
            "USB Accelerator on a Raspberry Pi 4 (USB 3)",
        ),
    )
}
DEFAULT_PROFILE = "usb3"


@dataclass(frozen=True)
class SimTiming:
    """The simulated time of one run, by part (all in seconds).

    ``latency_s`` is the sum of the parts; ``switched`` is True when the model's parameters
    had to be loaded because another model (or none) was on the chip.
    """

    model: str
    latency_s: float
    fixed_s: float
    compute_s: float
    transfer_s: float
    param_load_s: float
    switched: bool


@dataclass(frozen=True)
class SimStats:
    """What the simulated device did since it was opened."""

    runs: int
    switches: int
    busy_s: float
    last: SimTiming | None


def sim_latency(
    cost: ModelCost, profile: SimProfile, previous: ModelCost | str | None
) -> SimTiming:
    """The simulated latency of one run of ``cost`` right after a run of ``previous``.

    ``previous`` is the model whose parameters are on the chip (a cost or its name), or None
    when none is (the first run). Pure arithmetic; see the module docstring for the formula.
    """
    bus = profile.bus_bytes_per_s
    previous_name = previous.name if isinstance(previous, ModelCost) else previous
    switched = previous_name != cost.name
    reload = cost.param_bytes if switched else max(0, cost.param_bytes - CACHE_BYTES)
    compute = cost.macs / MAC_RATE
    transfer = (cost.input_bytes + cost.output_bytes) / bus
    param_load = reload / bus
    return SimTiming(
        model=cost.name,
        latency_s=profile.fixed_s + compute + transfer + param_load,
        fixed_s=profile.fixed_s,
        compute_s=compute,
        transfer_s=transfer,
        param_load_s=param_load,
        switched=switched,
    )


def _reference_outputs(
    path: Path, data: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> list[npt.NDArray[Any]]:
    """The model's outputs for an all-zero (real 0) input, or zero-point fills if it cannot run."""
    from ai_edge_litert.interpreter import Interpreter

    if is_edgetpu_model(data):
        return [np.full(s.shape, s.zero_point if s.quantized else 0, s.dtype) for s in outputs]
    try:
        with without_xnnpack_notice():
            interp = Interpreter(model_content=data, num_threads=1)
            interp.allocate_tensors()
        for detail, spec in zip(interp.get_input_details(), inputs):
            fill = spec.zero_point if spec.quantized else 0
            interp.set_tensor(detail["index"], np.full(spec.shape, fill, spec.dtype))
        interp.invoke()
        return [np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()]
    except (ValueError, RuntimeError) as exc:
        raise InvalidModelError(f"LiteRT could not run {path} on a zero input: {exc}") from exc


class SimRunner(Runner):
    """One model on a :class:`SimEdgeTPUDevice`. Outputs are fixed (see the module docstring)."""

    def __init__(self, device: SimEdgeTPUDevice, path: Path, cost: ModelCost) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._device = device
        self.path = path
        self.model = cost.name
        self.cost = cost
        data = check_tflite_file(path)
        try:
            # Building an interpreter reads the tensors without allocating or running.
            details = Interpreter(model_content=data)
            self.inputs = _specs(details.get_input_details(), path)
            self.outputs = _specs(details.get_output_details(), path)
        except (ValueError, RuntimeError) as exc:
            raise InvalidModelError(f"LiteRT could not read {path}: {exc}") from exc
        self._fixed = _reference_outputs(path, data, self.inputs, self.outputs)
        self._closed = False

    def run(self, arrays: Inputs) -> list[npt.NDArray[Any]]:
        """Simulate one run: wait (asleep) for the simulated latency, return the fixed outputs.

        Blocks for the latency of :func:`sim_latency`, plus the wait for any run of another
        runner on this device (runs are serialised). Uses no CPU while waiting.

        Raises:
            InputError: the inputs do not fit the model.
            DeviceError: the runner or device is closed.
        """
        self._execute(self.checked(arrays))
        return [out.copy() for out in self._fixed]

    def run_into(
        self, arrays: Inputs, outputs: Sequence[npt.NDArray[Any]]
    ) -> None:
        """As :meth:`run`, copying the fixed outputs straight into ``outputs``."""
        self._execute(self.checked(arrays))
        for dst, src in zip(outputs, self._fixed):
            np.copyto(dst, src)

    def _execute(self, arrays: Sequence[npt.NDArray[Any]]) -> None:
        if self._closed:
            raise DeviceError(f"model {self.model} on {self._device.spec} is closed")
        self._device._execute(self.cost)

    def close(self) -> None:
        """Forget the model. Idempotent."""
        self._closed = True


#: The most a simulated run's last sleep is cut short by (then waited out, see _execute).
_MAX_SLACK_S = 0.0005


def _sleep_overshoot(samples: int = 7) -> float:
    """How late ``time.sleep`` wakes on this machine (median of a few 0.3 ms sleeps).

    On the VMs measured here it is about 0.1 ms: uncorrected, a simulated 0.7 ms run would
    take 0.8 ms and the simulation would understate what the device can do.
    """
    late = []
    for _ in range(samples):
        t0 = time.monotonic()
        time.sleep(0.0003)
        late.append(time.monotonic() - t0 - 0.0003)
    late.sort()
    return max(0.0, min(late[len(late) // 2], _MAX_SLACK_S))


class SimEdgeTPUDevice(Device):
    """A simulated Edge TPU (see the module docstring): timing, cache swaps and ownership.

    Simulated devices are told apart by number, each with its own lock: the spec's index
    (``sim-edgetpu:1``, ``sim-edgetpu:pci:1``), else ``index`` (0: ``sim-edgetpu``).

    Raises (from the constructor):
        DeviceSpecError: an unknown profile (the message lists the profiles).
        DeviceBusyError: another process (or open) holds this simulated device.
    """

    simulated = True

    def __init__(self, spec: DeviceSpec | None = None, *, index: int = 0) -> None:
        self.spec = spec or DeviceSpec("sim-edgetpu")
        name = self.spec.profile or DEFAULT_PROFILE
        if self.spec.kind != "sim-edgetpu" or name not in PROFILES:
            raise DeviceSpecError(
                f"unknown simulation profile {name!r} in {str(self.spec)!r}; profiles: "
                + ", ".join(f"sim-edgetpu:{p}" for p in PROFILES)
            )
        self.profile = PROFILES[name]
        self.index = index if self.spec.index is None else self.spec.index
        self._run_lock = threading.Lock()
        self._overshoot = _sleep_overshoot()
        self._on_chip: str | None = None
        # Runs, switches, busy seconds and the last run's timing, replaced as a whole
        # after each run: timing() reads a consistent snapshot without the lock.
        self._counts: tuple[int, int, float, SimTiming | None] = (0, 0, 0.0, None)
        # The timing of a run by (model, model on the chip before): pure arithmetic.
        self._timings: dict[tuple[str, str | None], tuple[ModelCost, SimTiming]] = {}
        self._lock: DeviceLock | None = acquire_device_lock(
            f"sim-edgetpu-{self.index}", f"simulated Edge TPU {self.index} (simulation)"
        )

    def expected_latency(
        self, model: str | Path | ModelCost, previous_model: str | Path | ModelCost | None = None
    ) -> SimTiming:
        """The simulated time of a run of ``model`` after one of ``previous_model``.

        Models are bundled names, paths or :class:`ModelCost` records; ``previous_model`` None
        means nothing on the chip (the first run). Reads the model files (cached).

        Raises:
            ModelNotFoundError, InvalidModelError: a model cannot be found or read.
        """
        previous = None if previous_model is None else self._cost(previous_model)
        return sim_latency(self._cost(model), self.profile, previous)

    def _cost(self, model: str | Path | ModelCost) -> ModelCost:
        if isinstance(model, ModelCost):
            return model
        path = resolve_model(model)
        plain, compiled = edgetpu_pair(path)
        # The plain model's graph is countable; a compiled one hides it in the custom op.
        # Either way the model is named after the plain file, so that switching between
        # the two names is not a switch.
        cost = model_cost(plain or path)
        base = base_name(plain or compiled or path)
        return replace(cost, name=base) if cost.name != base else cost

    def load(self, model: str | Path) -> SimRunner:
        """Load ``model`` (bundled name or path): read its cost and compute its fixed outputs.

        Blocks for one LiteRT run on the CPU (the reference outputs).

        Raises:
            ModelNotFoundError, InvalidModelError: the model cannot be found or read.
            DeviceError: the device is closed.
        """
        if self._lock is None:
            raise DeviceError(f"{self.spec} (simulation) is closed")
        try:
            path = resolve_model(model)
            plain, _ = edgetpu_pair(path)
            # Run the plain model when there is one: its outputs stand in for the compiled one.
            return SimRunner(self, plain or path, self._cost(path))
        except ModelError:
            raise
        except OSError as exc:
            raise InvalidModelError(f"cannot read model {model}: {exc}") from exc

    def _execute(self, cost: ModelCost) -> SimTiming:
        """Occupy the device for one run of ``cost``; blocks (asleep) until it is done."""
        with self._run_lock:
            if self._lock is None:
                raise DeviceError(f"{self.spec} (simulation) is closed")
            key = (cost.name, self._on_chip)
            known = self._timings.get(key)
            if known is None or known[0] is not cost:
                known = self._timings[key] = (
                    cost, sim_latency(cost, self.profile, self._on_chip))
            timing = known[1]
            deadline = time.monotonic() + timing.latency_s
            # Sleep until the deadline. A sleep wakes late by about the overshoot, so ask
            # for that much less, and learn the overshoot from each sleep (it depends on
            # the thread's scheduling policy and the machine's load). Then wait out what
            # is left, yielding the GIL: a run never ends early, and a wake-up later than
            # the deadline counts as the device idle, as it would on the chip.
            slack = self._overshoot
            while (left := deadline - time.monotonic()) > slack:
                asked = left - slack
                slept = time.monotonic()
                time.sleep(asked)
                # One very late wake-up (a preempted thread) moves the estimate a little.
                late = min(max(time.monotonic() - slept - asked, 0.0), _MAX_SLACK_S)
                slack = self._overshoot = slack + (late - slack) / 8
            while time.monotonic() < deadline:
                pass
            self._on_chip = cost.name
            runs, switches, busy_s, _ = self._counts
            self._counts = (runs + 1, switches + timing.switched, busy_s + timing.latency_s,
                            timing)
            return timing

    def timing(self) -> SimStats:
        """Runs, parameter switches, simulated busy time and the last run's breakdown."""
        return SimStats(*self._counts)

    def describe(self) -> dict[str, Any]:
        """The profile and the model's constants; says "simulation" and ``simulated: True``."""
        return {
            **super().describe(),
            "backend": "simulation",
            "description": f"simulated Edge TPU (simulation, no hardware): "
            f"{self.profile.description}",
            "profile": self.profile.name,
            "index": self.index,
            "bus_mb_per_s": self.profile.bus_bytes_per_s / 1e6,
            "fixed_ms": self.profile.fixed_s * 1e3,
            "mac_rate_gmacs": MAC_RATE / 1e9,
            "cache_bytes": CACHE_BYTES,
            "pid": os.getpid(),
        }

    def close(self) -> None:
        """Release the simulated device. Idempotent; waits for a run in progress to end."""
        with self._run_lock:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
