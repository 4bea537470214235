"""The Edge TPU backend without an Edge TPU: discovery, holders, locks and every error path.

Discovery and ``/proc`` scans run against fake trees under tmp_path; libedgetpu and its
delegate are replaced where a test needs them "present".
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor._errors import (
    ConveyorError,
    DeviceBusyError,
    DeviceError,
    DeviceNotFoundError,
    EdgeTPUModelError,
    EdgeTPURuntimeMissingError,
    ModelNotFoundError,
)
from conveyor._models import bundled_models
from conveyor.backends import DeviceSpec, open_device, parse_device
from conveyor.backends import auto as auto_mod
from conveyor.backends import edgetpu as edgetpu_mod
from conveyor.backends._discovery import discover_edgetpus, find_holders
from conveyor.backends._lock import acquire_device_lock, lock_holder
from conveyor.backends.edgetpu import (
    EdgeTPUDevice,
    LibraryStatus,
    edgetpu_pair,
    find_edgetpu_library,
)
from conveyor.backends.litert import LiteRTDevice, check_tflite_file, is_edgetpu_model

CORAL_UNPROGRAMMED = ("1a6e", "089a")
CORAL_READY = ("18d1", "9302")


# --- fakes --------------------------------------------------------------------------------


def fake_edgetpu_model(in_shape: tuple[int, ...] = (1, 8, 8, 3)) -> bytes:
    """A valid TFLite flatbuffer whose one op is the Edge TPU custom op (uint8 in and out)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    def tensor(name: str, shape: tuple[int, ...]) -> Any:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), schema.TensorType.UINT8, 0
        q = schema.QuantizationParametersT()
        q.scale, q.zeroPoint = [0.5], [7]
        t.quantization = q
        return t

    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode, code.version = "edgetpu-custom-op", 1
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    op.customOptions = list(b"compiled executable would be here")
    graph = schema.SubGraphT()
    graph.tensors = [tensor("image", in_shape), tensor("scores", (1, 10))]
    graph.inputs, graph.outputs, graph.operators, graph.name = [0], [1], [op], "main"
    model = schema.ModelT()
    model.version, model.description = 3, "test model compiled for the Edge TPU"
    model.operatorCodes, model.subgraphs, model.buffers = [code], [graph], [schema.BufferT()]
    builder = flatbuffers.Builder(512)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def add_usb(root: Path, name: str, ids: tuple[str, str], busnum: int, devnum: int) -> None:
    folder = root / "sys/bus/usb/devices" / name
    folder.mkdir(parents=True)
    (folder / "idVendor").write_text(ids[0] + "\n")
    (folder / "idProduct").write_text(ids[1] + "\n")
    (folder / "busnum").write_text(f"{busnum}\n")
    (folder / "devnum").write_text(f"{devnum}\n")
    node = root / f"dev/bus/usb/{busnum:03d}/{devnum:03d}"
    node.parent.mkdir(parents=True, exist_ok=True)
    node.touch()


def add_pci(root: Path, number: int, *, node: bool = True, sysfs: bool = True) -> None:
    if node:
        (root / "dev").mkdir(exist_ok=True)
        (root / f"dev/apex_{number}").touch()
    if sysfs:
        (root / f"sys/class/apex/apex_{number}").mkdir(parents=True)


def add_process(root: Path, pid: int, comm: str, fds: dict[int, str]) -> None:
    folder = root / f"proc/{pid}"
    (folder / "fd").mkdir(parents=True)
    (folder / "comm").write_text(comm + "\n")
    for fd, target in fds.items():
        os.symlink(target, folder / "fd" / str(fd))


@pytest.fixture(autouse=True)
def private_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "locks"
    monkeypatch.setenv("CONVEYOR_LOCK_DIR", str(folder))
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = tmp_path / "root"
    tree.mkdir()
    return tree


@pytest.fixture
def library_present(monkeypatch: pytest.MonkeyPatch) -> None:
    status = LibraryStatus("libedgetpu.so.1")
    monkeypatch.setattr(edgetpu_mod, "find_edgetpu_library", lambda: status)
    monkeypatch.setattr(auto_mod, "find_edgetpu_library", lambda: status)


class FakeDelegate:
    """Stands in for libedgetpu's delegate object."""

    def __init__(self, library: str, options: dict[str, str]) -> None:
        self.library, self.options = library, options


@pytest.fixture
def delegates(monkeypatch: pytest.MonkeyPatch) -> list[FakeDelegate]:
    """Make load_delegate succeed; the list records each delegate made."""
    import ai_edge_litert.interpreter

    made: list[FakeDelegate] = []

    def load_delegate(library: str, options: dict[str, str]) -> FakeDelegate:
        made.append(FakeDelegate(library, options))
        return made[-1]

    monkeypatch.setattr(ai_edge_litert.interpreter, "load_delegate", load_delegate)
    return made


# --- discovery ----------------------------------------------------------------------------


def test_discovery_finds_usb_in_both_states_in_bus_order(root: Path) -> None:
    add_usb(root, "2-1", CORAL_READY, busnum=2, devnum=5)
    add_usb(root, "1-3", CORAL_UNPROGRAMMED, busnum=1, devnum=9)
    add_usb(root, "1-1", ("046d", "c52b"), busnum=1, devnum=2)  # a mouse
    (root / "sys/bus/usb/devices/2-1:1.0").mkdir()  # an interface: no ids
    found = discover_edgetpus(root)
    assert [(d.bus, d.index, d.state, d.usb_id) for d in found] == [
        ("usb", 0, "unprogrammed", "1a6e:089a"),
        ("usb", 1, "ready", "18d1:9302"),
    ]
    assert found[0].path == "/sys/bus/usb/devices/1-3"
    assert found[0].node == "/dev/bus/usb/001/009"
    assert found[1].name == "usb:1"


def test_discovery_finds_pcie_apex_nodes(root: Path) -> None:
    add_pci(root, 0)
    add_pci(root, 1, node=False)  # driver loaded, node missing
    add_pci(root, 3, sysfs=False)
    found = discover_edgetpus(root)
    assert [(d.name, d.state, d.node) for d in found] == [
        ("pci:0", "ready", "/dev/apex_0"),
        ("pci:1", "no-device-node", None),
        ("pci:2", "ready", "/dev/apex_3"),
    ]
    assert found[0].path == "/sys/class/apex/apex_0"
    assert found[2].path == "/dev/apex_3"


def test_discovery_lists_pcie_before_usb_and_empty_tree_is_empty(root: Path) -> None:
    assert discover_edgetpus(root) == []
    add_usb(root, "3-2", CORAL_READY, busnum=3, devnum=4)
    add_pci(root, 0)
    assert [d.name for d in discover_edgetpus(root)] == ["pci:0", "usb:0"]


def test_find_holders_names_the_process(root: Path) -> None:
    add_process(root, 4242, "frigate.detector", {0: "/dev/null", 5: "/dev/apex_0"})
    add_process(root, 77, "bash", {0: "/dev/pts/0"})
    (root / "proc/self").mkdir()  # not a pid: ignored
    holders = find_holders("/dev/apex_0", root)
    assert [(h.pid, h.comm) for h in holders] == [(4242, "frigate.detector")]
    assert str(holders[0]) == "pid 4242 (frigate.detector)"
    assert find_holders("/dev/apex_1", root) == []


# --- edgetpu_pair and compiled models -----------------------------------------------------


def test_edgetpu_pair(tmp_path: Path) -> None:
    plain = tmp_path / "net.tflite"
    compiled = tmp_path / "net_edgetpu.tflite"
    plain.write_bytes(bundled_models()["face_detection_short_range"].read_bytes())
    assert edgetpu_pair(plain) == (plain, None)
    compiled.write_bytes(fake_edgetpu_model())
    assert edgetpu_pair(plain) == (plain, compiled)
    assert edgetpu_pair(compiled) == (plain, compiled)
    plain.unlink()
    assert edgetpu_pair(compiled) == (None, compiled)
    odd = tmp_path / "oddly_named.tflite"
    odd.write_bytes(fake_edgetpu_model())
    assert edgetpu_pair(odd) == (None, odd)


def test_compiled_model_on_the_cpu_says_to_use_the_edgetpu(tmp_path: Path) -> None:
    path = tmp_path / "net_edgetpu.tflite"
    path.write_bytes(fake_edgetpu_model())
    assert is_edgetpu_model(check_tflite_file(path))  # a valid flatbuffer
    with pytest.raises(EdgeTPUModelError, match="edgetpu-custom-op") as info:
        LiteRTDevice().load(path)
    assert "edgetpu" in str(info.value)


# --- library lookup -----------------------------------------------------------------------


def test_library_override_to_a_missing_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_EDGETPU_LIBRARY", "/nonexistent/libedgetpu.so.1")
    status = find_edgetpu_library()
    assert not status.found
    assert "CONVEYOR_EDGETPU_LIBRARY=/nonexistent/libedgetpu.so.1" in status.reason
    assert "no such file" in status.reason


def test_library_override_to_a_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVEYOR_EDGETPU_LIBRARY", str(tmp_path))
    status = find_edgetpu_library()
    assert not status.found and "a folder, not a library file" in status.reason


def test_library_override_to_a_library_that_is_not_a_delegate(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctypes.CDLL(ctypes.util.find_library("m"))  # a real library that is no delegate
    with open("/proc/self/maps") as maps:
        libm = next(line.split()[-1] for line in maps if "/libm.so" in line)
    monkeypatch.setenv("CONVEYOR_EDGETPU_LIBRARY", libm)
    status = find_edgetpu_library()
    assert not status.found
    assert "tflite_plugin_create_delegate" in status.reason and libm in status.reason
    add_usb(root, "2-1", CORAL_READY, busnum=2, devnum=3)
    with pytest.raises(EdgeTPURuntimeMissingError, match="not a TFLite delegate"):
        EdgeTPUDevice(parse_device("edgetpu"), root=str(root))


def _libm() -> str:
    ctypes.CDLL(ctypes.util.find_library("m"))
    with open("/proc/self/maps") as maps:
        return next(line.split()[-1] for line in maps if "/libm.so" in line)


def test_library_override_to_a_truncated_library_is_refused_not_loaded(
        tmp_path: Path) -> None:
    # dlopen of a shared library cut short maps segments past the file's end, and the
    # loader's first touch of them killed the process with SIGBUS: `conveyor devices`,
    # `auto` (which should fall back to the CPU) and `serve --device edgetpu` alike.
    whole = Path(_libm()).read_bytes()
    cuts = [tmp_path / f"cut{n}.so" for n in (3000, 20000, len(whole) // 2)]
    for cut in cuts:
        cut.write_bytes(whole[:int(cut.stem[3:])])
    text = tmp_path / "notes.so"
    text.write_text("not a library\n")
    code = """if True:
        import sys
        from conveyor.backends import open_device, parse_device
        from conveyor.backends.edgetpu import find_edgetpu_library
        print(find_edgetpu_library().reason)
        auto = open_device(parse_device("auto"))
        auto.load("face_detection_short_range")
        print(auto.describe()["choices"]["face_detection_short_range"]["device"])
    """
    for lib, why in [*((cut, "truncated") for cut in cuts), (text, "not an ELF file")]:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "CONVEYOR_EDGETPU_LIBRARY": str(lib)},
                             timeout=60)
        assert out.returncode == 0, (lib, out.returncode, out.stderr[-2000:])
        reason, device = out.stdout.splitlines()
        assert f"CONVEYOR_EDGETPU_LIBRARY={lib} is not usable: {why}" in reason
        assert device == "cpu", device  # auto runs on the CPU instead


def test_library_override_named_in_the_current_folder_is_that_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A name without a slash was checked here but handed to dlopen, which searched the
    # loader's path: "cannot open shared object file: No such file or directory".
    (tmp_path / "libcopy.so").write_bytes(Path(_libm()).read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVEYOR_EDGETPU_LIBRARY", "libcopy.so")
    status = find_edgetpu_library()
    assert "has no tflite_plugin_create_delegate" in status.reason, status.reason
    monkeypatch.setenv("CONVEYOR_EDGETPU_LIBRARY", "/dev/null")  # was "no such file"
    assert find_edgetpu_library().reason == "CONVEYOR_EDGETPU_LIBRARY=/dev/null: not a " \
                                            "regular file"


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_library_without_the_delegates_destroy_function_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It was taken for libedgetpu: LiteRT then printed a traceback for each delegate it
    # could not destroy.
    src = tmp_path / "half.c"
    src.write_text("void *tflite_plugin_create_delegate(void) { return 0; }\n")
    lib = tmp_path / "libhalf.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                   timeout=60)
    monkeypatch.setenv("CONVEYOR_EDGETPU_LIBRARY", str(lib))
    status = find_edgetpu_library()
    assert not status.found and "tflite_plugin_destroy_delegate" in status.reason


def test_library_not_on_the_loader_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_EDGETPU_LIBRARY", raising=False)
    monkeypatch.setattr(edgetpu_mod.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(edgetpu_mod, "_loads", lambda name: f"{name}: cannot open")
    status = find_edgetpu_library()
    assert status == LibraryStatus(None, status.reason)
    assert "libedgetpu.so.1 not found" in status.reason


def test_library_found_by_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_EDGETPU_LIBRARY", raising=False)
    monkeypatch.setattr(edgetpu_mod, "_loads", lambda name: None)
    assert find_edgetpu_library() == LibraryStatus("libedgetpu.so.1")


# --- opening: each error path ------------------------------------------------------------


def test_no_library_with_a_device_present(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_usb(root, "2-1", CORAL_READY, busnum=2, devnum=3)
    monkeypatch.setenv("CONVEYOR_EDGETPU_LIBRARY", str(root / "missing.so"))
    with pytest.raises(EdgeTPURuntimeMissingError) as info:
        EdgeTPUDevice(parse_device("edgetpu"), root=str(root))
    message = str(info.value)
    assert "usb:0" in message and "/sys/bus/usb/devices/2-1" in message
    assert "libedgetpu1-std" in message
    assert "CONVEYOR_EDGETPU_LIBRARY" in message


def test_no_device_says_what_was_searched(root: Path, library_present: None) -> None:
    with pytest.raises(DeviceNotFoundError) as info:
        EdgeTPUDevice(parse_device("edgetpu"), root=str(root))
    message = str(info.value)
    for looked_for in ("1a6e:089a", "18d1:9302", "/dev/apex_N", "found none"):
        assert looked_for in message


def test_no_matching_device_lists_the_ones_found(root: Path, library_present: None) -> None:
    add_usb(root, "2-1", CORAL_READY, busnum=2, devnum=3)
    with pytest.raises(DeviceNotFoundError, match=r"found usb:0 \(/sys/bus/usb/devices/2-1"):
        EdgeTPUDevice(parse_device("edgetpu:usb:1"), root=str(root))
    with pytest.raises(DeviceNotFoundError, match="edgetpu:pci"):
        EdgeTPUDevice(parse_device("edgetpu:pci"), root=str(root))


def test_device_held_by_another_program_is_named_before_libedgetpu_is_touched(
    root: Path, library_present: None, delegates: list[FakeDelegate]
) -> None:
    add_pci(root, 0)
    add_process(root, 31337, "python3", {7: "/dev/apex_0"})
    with pytest.raises(DeviceBusyError) as info:
        EdgeTPUDevice(parse_device("edgetpu:pci:0"), root=str(root))
    message = str(info.value)
    assert "pid 31337 (python3)" in message
    assert "conveyor serve" in message
    assert delegates == []  # never opened: a second opener can crash the first on USB
    assert lock_holder("edgetpu-pci-0") is None  # the lock was given back


@pytest.fixture
def lock_holder_process(private_locks: Path, src_env: dict[str, str]) -> Iterator[Any]:
    """Start a process holding a conveyor device lock; yields (start(name) -> pid)."""
    script = (
        "import sys\n"
        "from conveyor.backends._lock import acquire_device_lock\n"
        "lock = acquire_device_lock(sys.argv[1], 'test device')\n"
        "print('READY', flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {**src_env, "CONVEYOR_LOCK_DIR": str(private_locks)}
    procs: list[subprocess.Popen[str]] = []

    def start(name: str) -> int:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        return proc.pid

    def stop() -> None:
        for proc in procs:
            with proc:
                proc.communicate(timeout=10)
        procs.clear()

    start.stop = stop  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        stop()


def test_device_held_by_another_conveyor_process(
    root: Path, library_present: None, delegates: list[FakeDelegate], lock_holder_process: Any
) -> None:
    add_usb(root, "2-1", CORAL_UNPROGRAMMED, busnum=2, devnum=3)
    pid = lock_holder_process("edgetpu-usb-0")
    assert lock_holder("edgetpu-usb-0") == pid
    with pytest.raises(DeviceBusyError) as info:
        EdgeTPUDevice(parse_device("edgetpu:usb"), root=str(root))
    message = str(info.value)
    assert f"conveyor process {pid}" in message
    assert "conveyor serve" in message
    assert delegates == []

    lock_holder_process.stop()  # the lock dies with its process: nothing stale
    device = EdgeTPUDevice(parse_device("edgetpu:usb"), root=str(root))
    try:
        assert delegates[0].options == {"device": "usb:0"}
        assert lock_holder("edgetpu-usb-0") == os.getpid()
    finally:
        device.close()


def test_open_describe_close_and_a_second_open_in_this_process(
    root: Path, library_present: None, delegates: list[FakeDelegate]
) -> None:
    add_pci(root, 0)
    device = open_device_at(root, "edgetpu")
    try:
        facts = device.describe()
        assert facts["backend"] == "edgetpu" and facts["simulated"] is False
        assert (facts["name"], facts["node"], facts["state"]) == ("pci:0", "/dev/apex_0", "ready")
        with pytest.raises(DeviceBusyError, match="this program"):
            open_device_at(root, "edgetpu:pci:0")
        with pytest.raises(ModelNotFoundError, match="face_detection_short_range_edgetpu"):
            device.load("face_detection_short_range")
    finally:
        device.close()
    device.close()  # idempotent
    with pytest.raises(DeviceError, match="closed"):
        device.load("face_detection_short_range")
    open_device_at(root, "edgetpu:pci:0").close()  # free again


def open_device_at(root: Path, spec: str) -> EdgeTPUDevice:
    return EdgeTPUDevice(parse_device(spec), root=str(root))


def test_delegate_failure_without_visible_holder(
    root: Path, library_present: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ai_edge_litert.interpreter

    def fail(library: str, options: dict[str, str]) -> None:
        raise ValueError(f"Failed to load delegate from {library}\n")

    monkeypatch.setattr(ai_edge_litert.interpreter, "load_delegate", fail)
    add_pci(root, 0)
    with pytest.raises(
        DeviceError, match=r"Failed to load delegate from libedgetpu\.so\.1"
    ) as info:
        open_device_at(root, "edgetpu")
    assert isinstance(info.value.__cause__, ValueError)
    assert lock_holder("edgetpu-pci-0") is None


def test_open_device_edgetpu_on_this_machine_says_what_is_missing() -> None:
    if discover_edgetpus() and find_edgetpu_library().found:
        pytest.skip("this machine has a usable Edge TPU")
    with pytest.raises(ConveyorError) as info:
        open_device("edgetpu").close()
    message = str(info.value)
    if not discover_edgetpus():
        assert isinstance(info.value, DeviceNotFoundError)
        assert "1a6e:089a" in message and "/dev/apex_N" in message
    if not find_edgetpu_library().found:
        assert "libedgetpu1-std" in message


# --- auto ---------------------------------------------------------------------------------


def test_auto_uses_the_cpu_and_says_why(root: Path, library_present: None) -> None:
    device = auto_mod.AutoDevice(DeviceSpec("auto"), root=str(root))
    runner = device.load("face_detection_short_range")
    why = device.describe()["choices"]["face_detection_short_range"]
    assert why["device"] == "cpu" and "no Edge TPU found" in why["why"]
    assert runner.outputs[0].shape == (1, 896, 16)
    device.close()

    add_usb(root, "2-1", CORAL_READY, busnum=2, devnum=3)
    device = auto_mod.AutoDevice(DeviceSpec("auto"), root=str(root))
    device.load("face_detection_short_range")
    why = device.describe()["choices"]["face_detection_short_range"]
    assert why["device"] == "cpu" and "no Edge TPU build" in why["why"]
    device.close()


def test_auto_uses_the_edgetpu_for_a_compiled_pair(
    root: Path,
    tmp_path: Path,
    library_present: None,
    delegates: list[FakeDelegate],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded: list[Path] = []

    class FakeRunner:
        def __init__(self, path: Path, delegate: Any, name: str) -> None:
            loaded.append(path)

    monkeypatch.setattr(edgetpu_mod, "EdgeTPURunner", FakeRunner)
    add_usb(root, "2-1", CORAL_READY, busnum=2, devnum=3)
    plain, compiled = tmp_path / "net.tflite", tmp_path / "net_edgetpu.tflite"
    plain.write_bytes(bundled_models()["face_detection_short_range"].read_bytes())
    compiled.write_bytes(fake_edgetpu_model())
    device = auto_mod.AutoDevice(DeviceSpec("auto"), root=str(root))
    try:
        device.load(plain)
        assert loaded == [compiled]
        choice = device.describe()["choices"]["net"]
        assert choice["device"] == "edgetpu:usb:0" and str(compiled) in choice["why"]
    finally:
        device.close()
    assert lock_holder("edgetpu-usb-0") is None


def test_auto_with_only_a_compiled_model_and_no_edgetpu(tmp_path: Path, root: Path) -> None:
    compiled = tmp_path / "net_edgetpu.tflite"
    compiled.write_bytes(fake_edgetpu_model())
    device = auto_mod.AutoDevice(DeviceSpec("auto"), root=str(root))
    with pytest.raises(EdgeTPUModelError):
        device.load(compiled)


def test_lock_helper_refuses_a_second_open_in_the_same_process() -> None:
    with acquire_device_lock("thing", "the thing") as lock:
        assert lock.held
        with pytest.raises(DeviceBusyError, match="the thing is already open in this program"):
            acquire_device_lock("thing", "the thing")
    assert not lock.held
    acquire_device_lock("thing", "the thing").release()


# --- conveyor devices ---------------------------------------------------------------------


def test_devices_survey_shows_bus_path_state_and_holder(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conveyor._cli import devices

    monkeypatch.setattr(devices, "find_edgetpu_library", lambda: LibraryStatus("libedgetpu.so.1"))
    add_usb(root, "2-1", CORAL_UNPROGRAMMED, busnum=2, devnum=3)
    add_pci(root, 0)
    add_process(root, 999, "detector", {3: "/dev/apex_0"})
    entries = {e["spec"]: e for e in devices.survey(str(root))}
    usb, pci = entries["edgetpu:usb:0"], entries["edgetpu:pci:0"]
    assert usb["available"] and usb["state"] == "unprogrammed"
    assert usb["path"] == "/sys/bus/usb/devices/2-1" and "1a6e:089a" in usb["summary"]
    assert not pci["available"] and "pid 999 (detector)" in pci["why"]
    assert entries["sim-edgetpu"]["simulated"] and "simulation" in entries["sim-edgetpu"]["summary"]
    assert entries["cpu"]["available"] and entries["cpu"]["litert"]


def test_devices_command_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import conveyor.cli

    assert conveyor.cli.main(["devices", "--json"]) == 0
    entries = {e["spec"]: e for e in json.loads(capsys.readouterr().out)["devices"]}
    assert {"cpu", "onnx:cpu", "onnx:cuda", "sim-edgetpu"} <= set(entries)
    for entry in entries.values():
        assert entry["available"] or entry["why"]  # every absent kind says why
    if not discover_edgetpus():
        assert (
            "1a6e:089a" in entries["edgetpu"]["why"] and "/dev/apex_N" in entries["edgetpu"]["why"]
        )
    assert conveyor.cli.main(["devices"]) == 0
    text = capsys.readouterr().out
    assert "sim-edgetpu" in text and "simulation" in text and "LiteRT" in text


def _usb_and_pci_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery finds a USB Edge TPU, then a PCIe one."""
    from conveyor.backends import _discovery

    usb = _discovery.EdgeTPUInfo("usb", 0, "/sys/bus/usb/devices/2-1", "ready", None)
    pci = _discovery.EdgeTPUInfo("pci", 0, "/sys/class/apex/apex_0", "ready", "/dev/apex_0")
    monkeypatch.setattr(_discovery, "discover_edgetpus", lambda root="/": [usb, pci])


def test_stages_naming_one_edgetpu_differently_share_its_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import conveyor
    from conveyor._runtime._core import Core
    from conveyor.backends import _discovery

    _usb_and_pci_found(monkeypatch)
    devices = ["edgetpu", "edgetpu:usb:0", "edgetpu:pci", "edgetpu:1", "edgetpu:0", "cpu"]
    stages = [conveyor.infer("face_detection_short_range", device=d) for d in devices]
    core = Core(stages, maxsize=4, live=False, trace=None, inflight=2)
    # edgetpu, edgetpu:0 and edgetpu:usb:0 are the first (USB) device; edgetpu:1 and
    # edgetpu:pci the second: one worker each, as the device serves one process.
    assert sorted(core._device_groups()) == [[0, 1, 4], [2, 3], [5]]
    # With nothing found, specs still group by how they are written.
    monkeypatch.setattr(_discovery, "discover_edgetpus", lambda root="/": [])
    core = Core(stages, maxsize=4, live=False, trace=None, inflight=2)
    assert sorted(core._device_groups()) == [[0, 4], [1], [2], [3], [5]]


def test_an_auto_stage_and_a_stage_on_the_edge_tpu_it_would_take_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two workers raced for the one device: about one start in two failed with
    # DeviceBusyError, the others ran the auto stage on the CPU.
    import conveyor
    import conveyor._runtime._core as core_mod
    from conveyor._runtime._core import Core
    from conveyor.backends import _discovery

    _usb_and_pci_found(monkeypatch)

    def groups(*devices: str) -> list[list[int]]:
        stages = [conveyor.infer("face_detection_short_range", device=d) for d in devices]
        return sorted(Core(stages, maxsize=4, live=False, trace=None,
                           inflight=2)._device_groups())

    # A bundled model has no Edge TPU build: auto runs it on the CPU, no race (refusing
    # it broke pipelines that worked).
    assert groups("auto", "edgetpu") == [[0], [1]]
    monkeypatch.setattr(core_mod, "_auto_takes_tpu", lambda model: True)  # as with a build
    with pytest.raises(conveyor.DeviceSpecError, match="would both take Edge TPU usb:0"):
        groups("auto", "edgetpu:usb:0")
    with pytest.raises(conveyor.DeviceSpecError, match="'auto' for both"):
        groups("edgetpu", "auto")
    assert groups("auto", "edgetpu:pci") == [[0], [1]]  # another device: no race
    assert groups("auto", "auto", "cpu") == [[0, 1], [2]]
    monkeypatch.setattr(_discovery, "discover_edgetpus", lambda root="/": [])
    assert groups("auto", "edgetpu") == [[0], [1]]  # none here: auto runs on the CPU


def test_auto_takes_the_edge_tpu_only_for_a_model_with_a_build_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import conveyor._runtime._core as core_mod
    from conveyor._models import resolve_model

    plain = resolve_model("face_detection_short_range")
    (tmp_path / "m.tflite").write_bytes(plain.read_bytes())
    (tmp_path / "m_edgetpu.tflite").write_bytes(plain.read_bytes())
    monkeypatch.setattr(edgetpu_mod, "find_edgetpu_library",
                        lambda: LibraryStatus("libedgetpu.so.1"))
    assert core_mod._auto_takes_tpu(tmp_path / "m.tflite")
    assert not core_mod._auto_takes_tpu("face_detection_short_range")  # no build
    assert not core_mod._auto_takes_tpu(plain.with_suffix(".onnx"))  # ONNX Runtime's
    monkeypatch.setattr(edgetpu_mod, "find_edgetpu_library",
                        lambda: LibraryStatus(None, "missing"))
    assert not core_mod._auto_takes_tpu(tmp_path / "m.tflite")  # no runtime: the CPU


def test_lock_directory_problems_are_named_as_they_are(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from conveyor.backends._lock import lock_dir

    folder = tmp_path / "locks"
    folder.mkdir()
    link = tmp_path / "link"
    link.symlink_to(folder)
    monkeypatch.setenv("CONVEYOR_LOCK_DIR", str(link))  # was "not a directory owned by..."
    assert lock_dir() == link
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("CONVEYOR_LOCK_DIR", str(afile))  # was "[Errno 17] File exists"
    with pytest.raises(DeviceError, match=rf"^the lock directory {afile} \(CONVEYOR_LOCK_DIR\) "
                                          r"is a file, not a folder$"):
        lock_dir()
    # The default one, in a shared folder, must be this user's own folder.
    monkeypatch.delenv("CONVEYOR_LOCK_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = tmp_path / f"conveyor-{os.getuid()}"
    mine.symlink_to(folder)
    with pytest.raises(DeviceError, match=rf"^the lock directory {mine} is not a folder; "
                                          r"remove it or set CONVEYOR_LOCK_DIR$"):
        lock_dir()
    mine.unlink()
    assert lock_dir() == mine and mine.is_dir() and not mine.is_symlink()
    if os.geteuid() == 0:
        os.chown(mine, 65534, 65534)
        with pytest.raises(DeviceError, match=rf"^the lock directory {mine} belongs to uid "
                                              r"65534, not to this user \(uid 0\)"):
            lock_dir()
