"""The device spec grammar: every valid form parses and prints back; bad specs list the forms."""

from __future__ import annotations

import pytest

from conveyor._errors import DeviceSpecError
from conveyor.backends import VALID_FORMS, DeviceSpec, parse_device

PARSED = {
    "cpu": DeviceSpec("cpu"),
    "cpu:4": DeviceSpec("cpu", threads=4),
    "edgetpu": DeviceSpec("edgetpu"),
    "edgetpu:1": DeviceSpec("edgetpu", index=1),
    "edgetpu:usb": DeviceSpec("edgetpu", bus="usb"),
    "edgetpu:usb:2": DeviceSpec("edgetpu", bus="usb", index=2),
    "edgetpu:pci": DeviceSpec("edgetpu", bus="pci"),
    "edgetpu:pci:0": DeviceSpec("edgetpu", bus="pci", index=0),
    "sim-edgetpu": DeviceSpec("sim-edgetpu"),
    "sim-edgetpu:usb2": DeviceSpec("sim-edgetpu", profile="usb2"),
    "sim-edgetpu:1": DeviceSpec("sim-edgetpu", index=1),
    "sim-edgetpu:rpi4:2": DeviceSpec("sim-edgetpu", profile="rpi4", index=2),
    "onnx:cpu": DeviceSpec("onnx", bus="cpu"),
    "onnx:cuda": DeviceSpec("onnx", bus="cuda"),
    "onnx:cuda:1": DeviceSpec("onnx", bus="cuda", index=1),
    "auto": DeviceSpec("auto"),
}


def _example(form: str) -> str:
    return form.replace("PROFILE", "pci").replace("N", "3")


@pytest.mark.parametrize("text", sorted(PARSED))
def test_each_form_parses_and_round_trips(text: str) -> None:
    spec = parse_device(text)
    assert spec == PARSED[text]
    assert str(spec) == text
    assert parse_device(str(spec)) == spec


@pytest.mark.parametrize("form", VALID_FORMS)
def test_every_documented_form_parses(form: str) -> None:
    spec = parse_device(_example(form))
    assert str(spec) == _example(form)


def test_parse_is_case_and_space_tolerant_and_idempotent() -> None:
    assert parse_device("  EdgeTPU:USB:1 ") == DeviceSpec("edgetpu", bus="usb", index=1)
    spec = DeviceSpec("onnx", bus="cpu")
    assert parse_device(spec) is spec


@pytest.mark.parametrize(
    ("text", "device_string"),
    [
        ("edgetpu", ""),
        ("edgetpu:2", ":2"),
        ("edgetpu:usb", "usb"),
        ("edgetpu:usb:1", "usb:1"),
        ("edgetpu:pci", "pci"),
        ("edgetpu:pci:0", "pci:0"),
    ],
)
def test_libedgetpu_device_strings(text: str, device_string: str) -> None:
    assert parse_device(text).edgetpu_device_string == device_string


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "gpu",
        "cpu:0",
        "cpu:x",
        "cpu:1:2",
        "edgetpu:usb:x",
        "edgetpu:pcie",
        "edgetpu:usb:1:2",
        "onnx:tpu",
        "onnx:cuda:x",
        "auto:1",
        "sim-edgetpu:a:b",
        "sim-edgetpu:usb9",
        "sim-edgetpu:pci:x",
        "sim-edgetpu:1:pci",
        "sim-edgetpu:pci:1:2",
        "sim-edgetpu::1",
        "sim-edgetpu:",
        "cpu:\u00b2",  # digits to str.isdigit, not to int()
        "edgetpu:\u00b2",
        "onnx:cuda:\u0663",
    ],
)
def test_bad_specs_list_the_valid_forms(text: str) -> None:
    with pytest.raises(DeviceSpecError) as info:
        parse_device(text)
    message = str(info.value)
    assert repr(text) in message or repr(text.strip()) in message
    for form in VALID_FORMS:
        assert form in message
    assert isinstance(info.value, ValueError)


def test_unknown_simulation_profile_lists_the_profiles() -> None:
    from conveyor.backends._spec import SIM_PROFILES
    from conveyor.backends.sim import PROFILES, SimEdgeTPUDevice

    assert tuple(PROFILES) == SIM_PROFILES  # the grammar knows the simulation's profiles
    from conveyor.backends.sim import DEFAULT_PROFILE

    assert SIM_PROFILES[0] == DEFAULT_PROFILE  # what a pipeline takes for no profile
    for make in (lambda: parse_device("sim-edgetpu:usb9:1"),
                 lambda: SimEdgeTPUDevice(DeviceSpec("sim-edgetpu", profile="usb9"))):
        with pytest.raises(DeviceSpecError, match="profiles") as info:
            make()
        for name in PROFILES:
            assert f"sim-edgetpu:{name}" in str(info.value)


def test_onnx_alone_is_onnx_runtime_on_the_cpu() -> None:
    assert parse_device("onnx") == parse_device("onnx:cpu") == DeviceSpec("onnx", bus="cpu")


@pytest.mark.parametrize(("spec", "why"), [
    (5, r"^a device spec is a string such as 'cpu' or 'edgetpu:usb', got int 5$"),  # "empty"
    (None, r"got NoneType None$"),
    ("sim-edgetpu:-1", r"'-1' is not a device number"),  # "unknown simulation profile"
    ("sim-edgetpu:+2", r"'\+2' is not a device number"),
    ("cpu:-1", r"'-1' is not a thread count"),  # cpu:N is a thread count, not a device
])
def test_a_spec_that_is_no_string_or_a_negative_number_is_named_so(spec: object,
                                                                      why: str) -> None:
    with pytest.raises(DeviceSpecError, match=why):
        parse_device(spec)  # type: ignore[arg-type]
