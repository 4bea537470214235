"""The simulated Edge TPU: latency from the model, parameter switches, exclusivity, no CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_edgetpu import fake_edgetpu_model

from conveyor._errors import DeviceBusyError, DeviceError, InputError
from conveyor._models import bundled_models
from conveyor.backends import open_device, parse_device
from conveyor.backends._base import zeros_like_specs
from conveyor.backends.litert import LiteRTDevice
from conveyor.backends.sim import (
    _MAX_SLACK_S,
    CACHE_BYTES,
    MOBILENET_V2,
    PROFILES,
    SimEdgeTPUDevice,
    sim_latency,
)

SHORT, FULL, LANDMARK = "face_detection_short_range", "face_detection_full_range", "face_landmark"


@pytest.fixture(autouse=True)
def private_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "locks"
    monkeypatch.setenv("CONVEYOR_LOCK_DIR", str(folder))
    return folder


def sim(profile: str = "usb3", index: int = 0) -> SimEdgeTPUDevice:
    return SimEdgeTPUDevice(parse_device(f"sim-edgetpu:{profile}"), index=index)


def test_calibration_matches_the_published_mobilenet_v2_figures() -> None:
    usb3 = sim_latency(MOBILENET_V2, PROFILES["usb3"], MOBILENET_V2)
    assert 2.3e-3 <= usb3.latency_s <= 2.6e-3
    assert sim_latency(MOBILENET_V2, PROFILES["rpi4"], MOBILENET_V2).latency_s == pytest.approx(
        4.6e-3
    )
    parts = usb3.fixed_s + usb3.compute_s + usb3.transfer_s + usb3.param_load_s
    assert parts == pytest.approx(usb3.latency_s)
    # slower bus, slower run; PCIe faster than USB 3
    order = [
        sim_latency(MOBILENET_V2, PROFILES[p], MOBILENET_V2).latency_s
        for p in ("pci", "usb3", "usb2")
    ]
    assert order == sorted(order)


def test_parameters_beyond_the_cache_stream_every_run() -> None:
    import dataclasses

    big = dataclasses.replace(MOBILENET_V2, name="big", param_bytes=CACHE_BYTES + 3_200_000)
    steady = sim_latency(big, PROFILES["usb3"], big)
    assert steady.param_load_s == pytest.approx(3_200_000 / 320e6)
    assert sim_latency(MOBILENET_V2, PROFILES["usb3"], MOBILENET_V2).param_load_s == 0


def test_describe_says_simulation() -> None:
    with_device = sim("pci")
    try:
        facts = with_device.describe()
        assert facts["simulated"] is True and with_device.simulated
        assert "simulation" in facts["description"] and facts["profile"] == "pci"
    finally:
        with_device.close()


def test_outputs_have_the_model_specs_and_the_zero_input_values() -> None:
    device = sim("pci")
    cpu = LiteRTDevice()
    try:
        runner = device.load(SHORT)
        reference = cpu.load(SHORT)
        assert runner.inputs == reference.inputs and runner.outputs == reference.outputs
        zeros = zeros_like_specs(runner.inputs)
        first = runner.run(zeros)
        expected = reference.run(zeros)
        for got, want, spec in zip(first, expected, runner.outputs):
            assert got.shape == spec.shape and got.dtype == spec.dtype
            np.testing.assert_array_equal(got, want)
        first[0][...] = 123  # callers own what they get
        assert not np.array_equal(runner.run(zeros)[0], first[0])
        with pytest.raises(InputError, match=r"expected shape \[1, 128, 128, 3\]"):
            runner.run([np.zeros((1, 3), np.float32)])
    finally:
        device.close()


def test_a_compiled_only_model_gives_zero_point_outputs(tmp_path: Path) -> None:
    path = tmp_path / "net_edgetpu.tflite"
    path.write_bytes(fake_edgetpu_model())
    device = sim("pci")
    try:
        runner = device.load(path)
        (out,) = runner.run(zeros_like_specs(runner.inputs))
        assert out.dtype == np.uint8 and out.shape == (1, 10) and set(out.ravel()) == {7}
        assert device.timing().last is not None and device.timing().last.model == "net"
    finally:
        device.close()


def _best_run(runner: object, arrays: list[np.ndarray], n: int) -> float:
    """The shortest of ``n`` runs: the simulated latency, free of scheduling delays."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        runner.run(arrays)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("model", [SHORT, FULL, LANDMARK])
def test_measured_latency_matches_the_model_within_20_percent(model: str) -> None:
    device = sim("usb2")
    try:
        runner = device.load(model)
        arrays = zeros_like_specs(runner.inputs)
        runner.run(arrays)  # the first run loads the parameters
        expected = device.expected_latency(model, model).latency_s
        measured = _best_run(runner, arrays, 5)
        # A run never ends before its modelled latency (the sim yields out the rest of a
        # sleep that woke early), and wakes late by little.
        assert expected <= measured <= 1.2 * expected, (model, expected, measured)
        assert device.timing().last.latency_s == pytest.approx(expected)  # type: ignore[union-attr]
    finally:
        device.close()


def test_switch_cost_appears_only_when_the_model_changes() -> None:
    device = sim("usb2")
    try:
        a, b = device.load(SHORT), device.load(LANDMARK)
        xa, xb = zeros_like_specs(a.inputs), zeros_like_specs(b.inputs)
        flags = []
        for runner, arrays in ((a, xa), (a, xa), (b, xb), (b, xb), (a, xa)):
            runner.run(arrays)
            last = device.timing().last
            assert last is not None
            flags.append((last.model, last.switched, last.param_load_s > 0))
        assert flags == [
            (SHORT, True, True),
            (SHORT, False, False),
            (LANDMARK, True, True),
            (LANDMARK, False, False),
            (SHORT, True, True),
        ]
        assert device.timing().runs == 5 and device.timing().switches == 3

        switch = device.expected_latency(LANDMARK, SHORT)
        steady = device.expected_latency(LANDMARK, LANDMARK)
        assert switch.latency_s - steady.latency_s == pytest.approx(switch.param_load_s)
        took = []
        for _ in range(3):
            a.run(xa)
            start = time.perf_counter()
            b.run(xb)  # after a run of SHORT: pays the switch, about 17 ms on USB 2
            took.append(time.perf_counter() - start)
        assert switch.latency_s <= min(took) <= 1.2 * switch.latency_s
    finally:
        device.close()


def test_running_uses_no_cpu() -> None:
    device = sim("usb2")
    try:
        runner = device.load(FULL)
        arrays = zeros_like_specs(runner.inputs)
        runner.run(arrays)
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(20):  # about 110 ms of simulated work
            runner.run(arrays)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        assert wall >= 20 * device.expected_latency(FULL, FULL).latency_s
        assert cpu < 0.1 * wall, f"{cpu * 1e3:.1f} ms CPU in {wall * 1e3:.1f} ms"
    finally:
        device.close()


def test_runs_on_one_device_are_serialised() -> None:
    device = sim("usb2")
    try:
        runner = device.load(SHORT)
        arrays = zeros_like_specs(runner.inputs)
        runner.run(arrays)
        each = device.expected_latency(SHORT, SHORT).latency_s

        def work() -> None:
            for _ in range(4):
                runner.run(arrays)

        threads = [threading.Thread(target=work) for _ in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert time.perf_counter() - start >= 8 * each
        assert device.timing().runs == 9
    finally:
        device.close()


def test_exclusive_across_processes(private_locks: Path, src_env: dict[str, str]) -> None:
    script = (
        "import sys\n"
        "from conveyor.backends import open_device\n"
        "device = open_device('sim-edgetpu')\n"
        "print('READY', flush=True)\n"
        "sys.stdin.read()\n"
        "device.close()\n"
    )
    env = {**src_env, "CONVEYOR_LOCK_DIR": str(private_locks)}
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as other:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "READY"
        with pytest.raises(DeviceBusyError) as info:
            open_device("sim-edgetpu:usb2")  # any profile: it is the same device 0
        assert f"conveyor process {other.pid}" in str(info.value)
        assert "conveyor serve" in str(info.value)
        sim(index=1).close()  # another simulated device is free
        other.communicate("", timeout=10)
    device = open_device("sim-edgetpu")  # free once the holder has gone
    device.close()


def test_a_device_held_by_a_pipeline_is_named_by_its_program_not_its_worker(
        tmp_path: Path) -> None:
    # The lock is taken in the pipeline's device worker: the busy error named that
    # worker's pid (killing it frees nothing: it is restarted) and told the program to
    # "close the other program" when the holder was the program itself.
    import conveyor

    holder = tmp_path / "holder.py"
    holder.write_text(
        "import sys, conveyor\n"
        "with conveyor.Pipeline(conveyor.infer('face_detection_short_range',\n"
        "                                      device='sim-edgetpu')):\n"
        "    print('READY', flush=True)\n"
        "    sys.stdin.read()\n")
    with subprocess.Popen([sys.executable, str(holder)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as other:
        assert other.stdout is not None and other.stdout.readline().strip() == "READY"
        with pytest.raises(DeviceBusyError) as info:
            open_device("sim-edgetpu")
        said = str(info.value)
        assert f"in use by conveyor process {other.pid} (" in said and "holder.py" in said
        assert ", through its device worker " in said
        other.communicate("", timeout=30)
    first, second = (conveyor.Pipeline(conveyor.infer(SHORT, device="sim-edgetpu"))
                     for _ in range(2))
    with first, pytest.raises(DeviceBusyError, match=(
            rf"already open in this program \(pid {os.getpid()}\): a pipeline's device "
            rf"worker \(pid \d+\) holds it")):
        second.start()


def test_numbered_simulated_devices_are_separate_devices() -> None:
    """``sim-edgetpu:N`` is simulated device N: two open at once in one process, and a
    server serves both; the same one twice is refused as already open here."""
    from test_server_support import ServeProcess, socket_dir

    import conveyor

    first, second = open_device("sim-edgetpu:0"), open_device("sim-edgetpu:pci:1")
    try:
        assert (first.index, second.index) == (0, 1)  # type: ignore[attr-defined]
        with pytest.raises(DeviceBusyError, match="already open in this program"):
            open_device("sim-edgetpu")
    finally:
        first.close()
        second.close()
    with socket_dir() as folder, ServeProcess(
        folder / "s.sock", "--device", "sim-edgetpu:0", "--device", "sim-edgetpu:1",
        "--model", SHORT,
    ) as server, conveyor.connect(server.path) as client:
        x = np.zeros((1, 128, 128, 3), np.float32)
        futures = [client.submit(SHORT, x) for _ in range(40)]
        for f in futures:
            f.result(timeout=30)
        devices = client.status()["devices"]
    assert [d["spec"] for d in devices] == ["sim-edgetpu:0", "sim-edgetpu:1"]
    assert all(d["items"] > 0 for d in devices), devices  # both did work


def test_closed_device_refuses_work() -> None:
    device = sim()
    runner = device.load(SHORT)
    device.close()
    device.close()
    with pytest.raises(DeviceError, match="closed"):
        runner.run(zeros_like_specs(runner.inputs))
    with pytest.raises(DeviceError, match="closed"):
        device.load(SHORT)
    assert SHORT in bundled_models()


def test_run_into_writes_the_fixed_outputs() -> None:
    device = sim()
    try:
        runner = device.load(SHORT)
        arrays = zeros_like_specs(runner.inputs)
        dst = [np.full(o.shape, 7, o.dtype) for o in runner.outputs]
        runner.run_into(arrays, dst)
        for got, want in zip(dst, runner.run(arrays)):
            np.testing.assert_array_equal(got, want)
        assert device.timing().runs == 2
    finally:
        device.close()


def test_a_run_never_ends_early_and_the_wake_up_lateness_is_learnt() -> None:
    device = sim()
    try:
        runner = device.load(SHORT)
        arrays = zeros_like_specs(runner.inputs)
        runner.run(arrays)
        expected = device.expected_latency(SHORT, SHORT).latency_s
        device._overshoot = _MAX_SLACK_S  # as if wake-ups came 0.5 ms late
        start = time.perf_counter()
        runner.run(arrays)
        assert time.perf_counter() - start >= expected  # the rest is waited out
        for _ in range(30):
            runner.run(arrays)
        # Learnt from the sleeps themselves (wake-ups here are late by well under 0.3 ms).
        assert device._overshoot < 0.0003
    finally:
        device.close()


def test_damaged_model_files_are_invalid_models(tmp_path: Path) -> None:
    """Cut short anywhere, a model fails as InvalidModelError naming the file, never as
    an error from deep inside the flatbuffer reader."""
    from conveyor import InvalidModelError, resolve_model

    data = resolve_model("face_detection_full_range").read_bytes()
    dev = open_device("sim-edgetpu")
    try:
        for i, cut in enumerate(range(64, len(data), len(data) // 12)):
            bad = tmp_path / f"cut{i}.tflite"
            bad.write_bytes(data[:cut])
            with pytest.raises(InvalidModelError, match=str(bad)):
                dev.load(bad)
    finally:
        dev.close()


def test_a_compiled_model_path_runs_in_a_pipeline_and_through_a_server(
    tmp_path: Path, no_leaks: None
) -> None:
    """A model given by the path of its Edge TPU build (``name_edgetpu.tflite``) is served
    as ``name``; asking by that path, file name or base name finds it."""
    from test_server_support import ThreadServer

    import conveyor

    path = tmp_path / "net_edgetpu.tflite"
    path.write_bytes(fake_edgetpu_model())
    x = np.zeros((1, 8, 8, 3), np.uint8)
    with conveyor.Pipeline(conveyor.infer(str(path), device="sim-edgetpu")) as pipe:
        (out,) = next(iter(pipe.map([x])))
    assert out.shape == (1, 10) and set(out.ravel()) == {7}
    device = sim("pci")
    with ThreadServer(tmp_path / "s.sock", [device], [str(path)]), \
            conveyor.connect(tmp_path / "s.sock") as client:
        for name in (str(path), "net_edgetpu", "net_edgetpu.tflite", "net"):
            (out,) = client.infer(name, x)
            assert set(out.ravel()) == {7}, name
        with pytest.raises(conveyor.ModelNotFoundError, match=r"device server at .* serves"):
            client.infer("other", x)


def test_a_link_whose_model_lookup_fails_ends_its_device_worker(
    monkeypatch: pytest.MonkeyPatch, no_leaks: None
) -> None:
    """If the inference stage fails after its device worker started, the worker ends with
    it and the device is free for the next pipeline (it used to be held until exit)."""
    import conveyor
    from conveyor._device._client import DeviceClient

    def refuse(self: DeviceClient, model: str) -> None:
        raise conveyor.ModelNotFoundError(f"no {model}")

    with monkeypatch.context() as patch:
        patch.setattr(DeviceClient, "model_info", refuse)
        with pytest.raises(conveyor.ModelNotFoundError), \
                conveyor.Pipeline(conveyor.infer(SHORT, device="sim-edgetpu")):
            pass
    with conveyor.Pipeline(conveyor.infer(SHORT, device="sim-edgetpu")) as pipe:
        (boxes, _scores) = next(iter(pipe.map([np.zeros((1, 128, 128, 3), np.float32)])))
    assert boxes.shape == (1, 896, 16)
