"""The face sub-commands: conveyor demo, conveyor detect and conveyor models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

import conveyor.cli
from conveyor._models import resolve_model
from conveyor.apps.faces import sample_images

SRC = Path(conveyor.cli.__file__).resolve().parents[1]
ASTRONAUT = SRC / "conveyor" / "samples" / "astronaut.png"
FACE_KEYS = ["xmin", "ymin", "xmax", "ymax", "score", "keypoints"]
FRAME_KEYS = ["source", "frame", "width", "height", "faces"]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a still, a 3-frame GIF, a 4-frame video and a nested still."""
    root = tmp_path_factory.mktemp("media")
    astronaut = Image.open(ASTRONAUT).convert("RGB")
    astronaut.save(root / "astronaut.png")
    frames = [astronaut, astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT), astronaut.rotate(10)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    with av.open(str(root / "clip.avi"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 256
        stream.pix_fmt = "yuv420p"
        for angle in (0, 3, 6, 9):
            small = astronaut.resize((256, 256)).rotate(angle)
            frame = av.VideoFrame.from_ndarray(np.asarray(small), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (root / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(ASTRONAUT, root / "nested" / "deeper" / "copy.png")
    (root / "nested" / "notes.txt").write_text("not an image, and not picked from a folder")
    return root


def main(*argv: str | os.PathLike[str]) -> int:
    return conveyor.cli.main([os.fspath(a) for a in argv])


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def check_frame(record: dict[str, Any], source: str, frame: int, size: tuple[int, int]) -> None:
    assert list(record) == FRAME_KEYS
    assert record["source"] == source
    assert record["frame"] == frame
    assert (record["width"], record["height"]) == size
    for face in record["faces"]:
        assert list(face) == FACE_KEYS
        assert all(isinstance(face[k], float) for k in FACE_KEYS[:5])
        assert len(face["keypoints"]) == 6
        assert all(len(p) == 2 for p in face["keypoints"])


# --- detect -------------------------------------------------------------------------------


def test_detect_json_for_one_image(media: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(media / "astronaut.png")
    assert main("detect", path, "--json") == 0
    out, err = capsys.readouterr()
    (record,) = json_lines(out)
    check_frame(record, path, 0, (512, 512))
    (face,) = record["faces"]
    assert [face["xmin"], face["ymin"], face["xmax"], face["ymax"]] == pytest.approx(
        [0.346, 0.157, 0.531, 0.342], abs=0.005
    )
    assert face["score"] == pytest.approx(0.92, abs=0.01)
    assert err == ""


def test_detect_human_readable(media: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(media / "astronaut.png")
    assert main("detect", path) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines() == [
        f"{path} frame 0 (512x512): 1 face; (0.348, 0.158)-(0.532, 0.342) score 0.92"
    ]


def test_detect_via_subprocess(media: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "detect", "astronaut.png", "--json"],
        cwd=media,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (record,) = json_lines(proc.stdout)
    check_frame(record, "astronaut.png", 0, (512, 512))
    assert len(record["faces"]) == 1
    assert not [line for line in proc.stderr.splitlines() if line.startswith("conveyor")]


def test_detect_reports_unreadable_file_and_goes_on(
    media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG but then garbage " * 20)
    missing = tmp_path / "missing.jpg"
    good = str(media / "astronaut.png")
    assert main("detect", bad, good, missing, "--json") == 1
    out, err = capsys.readouterr()
    (record,) = json_lines(out)
    assert record["source"] == good
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"conveyor: cannot read {bad}: ")
    assert lines[1] == f"conveyor: cannot read {missing}: no such file"


def test_detect_says_a_folder_has_nothing_to_read(
    media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    good = str(media / "astronaut.png")
    assert main("detect", empty, good, "--json") == 1  # the image is still done
    out, err = capsys.readouterr()
    assert [r["source"] for r in json_lines(out)] == [good]
    assert err.startswith(f"conveyor: no image or video files in {empty} (looked for ")


def test_detect_searches_folders_recursively(
    media: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given = str(media) + os.sep  # joined onto the folder exactly as given
    assert main("detect", given, "--json") == 0
    records = json_lines(capsys.readouterr().out)
    sources = [(r["source"], r["frame"]) for r in records]
    assert sources == [
        (given + "anim.gif", 0),
        (given + "anim.gif", 1),
        (given + "anim.gif", 2),
        (given + "astronaut.png", 0),
        (given + "clip.avi", 0),
        (given + "clip.avi", 1),
        (given + "clip.avi", 2),
        (given + "clip.avi", 3),
        (given + os.path.join("nested", "deeper", "copy.png"), 0),
    ]
    assert all(len(r["faces"]) == 1 for r in records)


def test_detect_gif_gives_a_line_per_frame(media: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(media / "anim.gif")
    assert main("detect", path, "--json") == 0
    records = json_lines(capsys.readouterr().out)
    for i, record in enumerate(records):
        check_frame(record, path, i, (512, 512))
    assert [r["frame"] for r in records] == [0, 1, 2]
    # Frame 1 is the mirror image of frame 0.
    first, mirrored = records[0]["faces"][0], records[1]["faces"][0]
    assert mirrored["xmin"] == pytest.approx(1 - first["xmax"], abs=0.02)


def test_detect_video_gives_a_line_per_frame(
    media: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(media / "clip.avi")
    assert main("detect", path, "--json", "--model", "full") == 0
    records = json_lines(capsys.readouterr().out)
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    for i, record in enumerate(records):
        check_frame(record, path, i, (256, 256))
        assert len(record["faces"]) == 1


def test_detect_landmarks_in_json(media: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main("detect", media / "astronaut.png", "--json", "--landmarks") == 0
    (record,) = json_lines(capsys.readouterr().out)
    (face,) = record["faces"]
    assert list(face) == [*FACE_KEYS, "landmarks"]
    assert len(face["landmarks"]) == 468
    assert all(len(p) == 3 for p in face["landmarks"])


def test_detect_writes_annotated_images(
    media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "annotated"
    assert main("detect", media / "astronaut.png", media / "anim.gif", "--out", out) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["anim/000000.png", "anim/000001.png", "anim/000002.png", "astronaut.png"]
    drawn = np.asarray(Image.open(out / "astronaut.png").convert("RGB"))
    assert drawn.shape == (512, 512, 3)
    assert not np.array_equal(drawn, np.asarray(Image.open(ASTRONAUT).convert("RGB")))


def test_detect_bad_device_spec(media: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main("detect", media / "astronaut.png", "--device", "tpu9000") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("conveyor: ")


def _flat(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [float(value)]


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every conveyor.Pipeline whose map() runs during the test, in order."""
    from conveyor._pipeline import Pipeline

    seen: list[Any] = []
    original = Pipeline.map

    def spy(self: Pipeline, inputs: Any) -> Any:
        seen.append(self)
        yield from original(self, inputs)

    monkeypatch.setattr(Pipeline, "map", spy)
    return seen


@pytest.mark.parametrize("landmarks", [False, True], ids=["detect", "landmarks"])
def test_detect_runs_through_the_pipeline(
    landmarks: bool, pipelines: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every frame goes through one conveyor.Pipeline (process pre-processing, the device,
    post-processing), and the faces are those FaceDetector finds in this thread."""
    from conveyor.apps.faces import FaceDetector

    samples = [str(p) for p in sample_images()]
    flags = ["--landmarks"] if landmarks else []
    assert main("detect", *samples, "--json", *flags) == 0
    records = json_lines(capsys.readouterr().out)
    (pipe,) = pipelines
    stats = pipe.stats()
    assert list(stats["stages"]) == ["preprocess", "detect", "postprocess"]
    assert stats["stages"]["preprocess"]["kind"] == "process"
    assert all(st["out"] == len(samples) for st in stats["stages"].values())
    assert stats["device"]["items"] == len(samples)
    with FaceDetector("short", landmarks=landmarks) as detector:
        for path, record in zip(samples, records, strict=True):
            expected = [face.to_json() for face in detector.detect(path)]
            assert [list(face) for face in record["faces"]] == [list(f) for f in expected]
            assert _flat(record["faces"]) == pytest.approx(_flat(expected), abs=1e-4)
    assert sum(len(r["faces"]) for r in records) == 2


def test_detect_keeps_a_bounded_backlog(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A long video streams: the frames held for drawing stay within the pipeline's bound,
    and every frame comes out, in order."""
    from conveyor._cli import detect

    frame = np.asarray(Image.open(ASTRONAUT).convert("RGB").resize((96, 96)))
    total = 100

    def long_video(path: Any) -> Any:
        for i in range(total):
            yield i, frame

    backlog: list[int] = []
    source = detect._frame_source

    def watched(sources: Any, names: Any, events: Any) -> Any:
        for item in source(sources, names, events):
            backlog.append(len(events))
            yield item

    monkeypatch.setattr(detect, "iter_frames", long_video)
    monkeypatch.setattr(detect, "_frame_source", watched)
    out = tmp_path / "annotated"
    assert main("detect", "long.mp4", "--json", "--out", out) == 0
    assert [r["frame"] for r in json_lines(capsys.readouterr().out)] == list(range(total))
    assert len(list((out / "long").iterdir())) == total
    assert len(backlog) == total
    assert max(backlog) <= 40


def test_detect_stops_a_file_whose_output_cannot_be_written(
    media: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"  # a folder that can be written, but not these two outputs:
    out.mkdir()
    (out / "anim").write_text("a file where the GIF's frame folder should be")
    (out / "astronaut.png").mkdir()  # a folder where the still's image should be
    gif, still = media / "anim.gif", media / "astronaut.png"
    assert main("detect", gif, still, "--out", out) == 1
    out, err = capsys.readouterr()
    assert [line.split(" (")[0] for line in out.splitlines()] == [
        f"{gif} frame 0",
        f"{still} frame 0",
    ]
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"conveyor: cannot write the output for {gif}: ")
    assert lines[1].startswith(f"conveyor: cannot write the output for {still}: ")


# --- demo ---------------------------------------------------------------------------------


def test_demo_writes_annotated_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main("demo", "--out", out, "--repeat", "2") == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in sample_images()]
    assert "astronaut.png (512x512): 1 face(s)" in text
    assert "box (0.348, 0.158)-(0.532, 0.342)  score 0.92" in text
    assert "chelsea.png (451x300): 0 face(s)" in text
    assert "images/s" in text
    assert str(out.resolve()) in text


def test_demo_refuses_an_unwritable_output_before_running(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("")
    assert main("demo", "--out", taken) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"conveyor: cannot write to {taken}: ")


# --- models -------------------------------------------------------------------------------


def test_models_lists_bundled(capsys: pytest.CaptureFixture[str]) -> None:
    assert main("models") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "INPUT"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) >= {"face_detection_full_range", "face_detection_short_range", "face_landmark"}
    assert list(rows) == sorted(rows)
    assert rows["face_detection_short_range"].endswith("float32[1, 128, 128, 3]")


def test_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main("models", "--json") == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert set(entries) >= {
        "face_detection_full_range",
        "face_detection_short_range",
        "face_landmark",
    }
    assert entries["face_landmark"]["inputs"][0]["shape"] == [1, 192, 192, 3]
    assert entries["face_detection_full_range"]["outputs"][1]["shape"] == [1, 2304, 1]


def test_models_shows_tensors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main("models", "face_detection_short_range") == 0
    text = capsys.readouterr().out
    assert "inputs:" in text
    assert "outputs:" in text
    assert "regressors      [1, 896, 16]  float32  0      0" in text
    assert "classificators  [1, 896, 1]   float32  0      0" in text
    assert main("models", SRC / "conveyor" / "models" / "face_landmark.tflite", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert [o["shape"] for o in info["outputs"]] == [[1, 1, 1, 1404], [1, 1, 1, 1]]
    assert set(info["outputs"][0]) == {"name", "shape", "dtype", "scale", "zero_point"}


@pytest.mark.parametrize("kind", ["missing", "not-a-model"])
def test_models_errors_exit_2(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.tflite"
    if kind == "not-a-model":
        path.write_bytes(b"hello, this is not a flatbuffer")
    assert main("models", path) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("conveyor: ")
    assert str(path) in err


# --- help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["demo", "detect", "models"])
def test_help_shows_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(command, "--help")
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: conveyor {command}" in text
    assert "examples:" in text
    assert f"\n  conveyor {command}" in text


def test_detect_progress_bar_only_on_a_terminal(
    media: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(media / "anim.gif")
    assert main("detect", path, "--json") == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main("detect", path, media / "missing.png", "--json") == 1
    out, err = capsys.readouterr()
    assert [r["frame"] for r in json_lines(out)] == [0, 1, 2]  # stdout stays clean
    assert "file" in err  # the bar's unit
    assert f"conveyor: cannot read {media / 'missing.png'}: no such file" in err


def test_detect_reports_a_folder_it_cannot_list(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "locked").mkdir()
    shutil.copy(ASTRONAUT, tmp_path / "a.png")
    shutil.copy(ASTRONAUT, tmp_path / "locked" / "b.png")
    real = os.scandir

    def scandir(path: Any = ".") -> Any:  # as a user without permission would see it
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert main("detect", tmp_path) == 1  # a.png was detected, but files went unseen
    out, err = capsys.readouterr()
    assert "a.png" in out and "b.png" not in out
    assert "cannot read the folder" in err and "Permission denied" in err


def test_detect_refuses_an_unwritable_out_before_the_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    assert main("detect", ASTRONAUT, "--out", blocker) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("cannot write to") == 1
    assert f"cannot write to {blocker}: it is a file, not a folder" in err  # "File exists"


@pytest.mark.parametrize("argv", [["status", "--timeout", "-1"], ["status", "--timeout", "nan"],
                                  ["top", "--interval", "0"]])
def test_seconds_must_be_above_zero(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "conveyor", *argv], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "above 0" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv", [["models"], ["models", "face_detection_short_range"],
                                  ["devices"]])
def test_a_reader_that_went_away_ends_the_command_quietly(argv: list[str]) -> None:
    read, write = os.pipe()
    os.close(read)  # nobody will ever read: the first write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "conveyor", *argv], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    said = [line for line in done.stderr.splitlines() if not line.startswith("INFO: Created")]
    assert done.returncode == 1 and said == [], done.stderr  # LiteRT's own line aside


def test_detect_skips_a_named_pipe_in_a_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading a named pipe would wait for a writer for ever: inside a folder it is
    reported and skipped."""
    shutil.copy(ASTRONAUT, tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    assert main("detect", tmp_path, "--json") == 1  # a.png was detected; b.png was not read
    out, err = capsys.readouterr()
    assert [r["source"].endswith("a.png") for r in json_lines(out)] == [True]
    assert f"cannot read {tmp_path / 'b.png'}: not a regular file" in err


def test_detect_reports_an_image_over_pillows_pixel_limit_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (30, 30), "gray").save(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # astronaut is now a "bomb"
    assert main("detect", ASTRONAUT, small, "--json") == 1
    out, err = capsys.readouterr()
    (record,) = json_lines(out)
    assert record["source"] == str(small)
    assert err.startswith(f"conveyor: cannot read {ASTRONAUT}: ") and "Traceback" not in err
    from conveyor.apps.faces import ImageReadError, load_image

    with pytest.raises(ImageReadError, match="exceeds limit"):
        load_image(ASTRONAUT)


def test_detect_out_on_the_inputs_folder_never_overwrites_an_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(ASTRONAUT, tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    monkeypatch.chdir(tmp_path)
    for out in (tmp_path, "."):
        assert main("detect", tmp_path / "a.png", "--out", out) == 0
        assert (tmp_path / "a.png").read_bytes() == before
    # The first run wrote a-2.png; the second took a-2.png as output, not as input.
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a-2.png", "a.png"]
    drawn = np.asarray(Image.open(tmp_path / "a-2.png").convert("RGB"))
    assert not np.array_equal(drawn, np.asarray(Image.open(ASTRONAUT).convert("RGB")))


def test_detect_an_empty_path_is_not_the_current_folder(
    media: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(media)  # full of images, none of which must be read
    assert main("detect", "", "--json") == 1
    out, err = capsys.readouterr()
    assert out == "" and "cannot read '' (an empty path)" in err


def test_frames_of_an_animation_never_overwrite_an_input_or_another_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # clip.gif's frames go to clip/000000.png...: the photo clip/000000.png beside it was
    # overwritten with --out on the inputs' folder, and elsewhere one of the two outputs
    # named clip/000000.png was lost.
    astronaut = Image.open(ASTRONAUT).convert("RGB")
    astronaut.save(tmp_path / "clip.gif", save_all=True,
                   append_images=[astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    (tmp_path / "clip").mkdir()
    photo = tmp_path / "clip" / "000000.png"
    astronaut.rotate(5).save(photo)
    kept = photo.read_bytes()
    for out in (tmp_path / "elsewhere", tmp_path):
        before = set(out.rglob("*.png")) if out.exists() else set()
        assert main("detect", tmp_path / "clip.gif", photo, "--json", "--out", out) == 0
        assert len(json_lines(capsys.readouterr().out)) == 3
        assert len(set(out.rglob("*.png")) - before) == 3  # one file a frame, none lost
        assert photo.read_bytes() == kept


def test_a_second_frame_that_cannot_be_read_comes_after_the_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Reading ahead to know whether a file has one frame raised the second frame's error
    # before the first was given: frame 0 went unreported.
    astronaut = Image.open(ASTRONAUT).convert("RGB")
    gif = tmp_path / "two.gif"
    astronaut.save(gif, save_all=True,
                   append_images=[astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    cut = tmp_path / "cut.gif"
    data = gif.read_bytes()
    cut.write_bytes(data[: len(data) - 20_000])  # inside the second frame
    assert main("detect", cut, "--json") == 1
    out, err = capsys.readouterr()
    (record,) = json_lines(out)
    assert record["frame"] == 0 and record["faces"]
    assert f"cannot read {cut}" in err


def test_a_phones_mpo_jpeg_is_one_upright_photo(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A JPEG saved as MPO (a photo and a preview after it, as many phones write) was read
    # as an animation: its EXIF orientation was not applied, and the preview was reported
    # as a frame of its own.
    with Image.open(ASTRONAUT) as image:
        upright = image.convert("RGB").crop((0, 0, 512, 400))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    photo = tmp_path / "photo.jpg"
    stored.save(photo, format="MPO", save_all=True, quality=95, exif=exif,
                append_images=[stored.resize((stored.width // 4, stored.height // 4))])
    with Image.open(photo) as check:
        assert check.format == "MPO"
    upright.save(tmp_path / "upright.png")
    assert main("detect", photo, tmp_path / "upright.png", "--json") == 0
    got, want = json_lines(capsys.readouterr().out)
    assert (got["frame"], got["width"], got["height"]) == (0, 512, 400)
    assert abs(got["faces"][0]["xmin"] - want["faces"][0]["xmin"]) < 0.01
    assert abs(got["faces"][0]["ymin"] - want["faces"][0]["ymin"]) < 0.01


def test_a_gif_cut_anywhere_is_an_image_read_error(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Cut at some lengths, Pillow's GIF decoder raised IndexError or struct.error, which
    # escaped iter_frames and ended `conveyor detect` with a traceback: the files after it
    # were never read.
    from conveyor.apps.faces import ImageReadError, iter_frames

    image = Image.open(ASTRONAUT).convert("RGB").resize((64, 64))
    image.save(tmp_path / "seed.gif", save_all=True, append_images=[image.rotate(10)])
    data = (tmp_path / "seed.gif").read_bytes()
    cut = tmp_path / "cut.gif"
    outcomes = set()
    for n in range(len(data) // 2, len(data), 7):
        cut.write_bytes(data[:n])
        try:
            list(iter_frames(cut))
            outcomes.add("read")
        except ImageReadError:
            outcomes.add("ImageReadError")
    assert "ImageReadError" in outcomes
    cut.write_bytes(data[:5153])  # an IndexError from Pillow 11-12's decoder
    image.save(tmp_path / "z.png")
    assert main("detect", cut, tmp_path / "z.png", "--json") == 1
    out, err = capsys.readouterr()
    assert [r["source"] for r in json_lines(out)][-1] == str(tmp_path / "z.png")
    assert f"cannot read {cut}" in err and "Traceback" not in err


def _frames_through_a_pipe(path: Path) -> list[np.ndarray]:
    from conveyor.apps.faces import iter_frames

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes the video into the pipe
        os.close(r)
        try:
            with open(path, "rb") as f, os.fdopen(w, "wb") as out:
                shutil.copyfileobj(f, out)
        finally:
            os._exit(0)
    os.close(w)
    try:
        return [f for _, f in iter_frames(f"/dev/fd/{r}")]
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def test_detect_reads_a_video_from_a_pipe(media: Path) -> None:
    # Pillow read the whole pipe to tell it was no image; FFmpeg then got an empty one.
    from conveyor.apps.faces import iter_frames

    frames = _frames_through_a_pipe(media / "clip.avi")
    want = [f for _, f in iter_frames(media / "clip.avi")]
    assert len(frames) == len(want) == 4
    assert all(np.array_equal(a, b) for a, b in zip(frames, want))


@pytest.mark.parametrize("faststart", [False, True])
def test_an_mp4_with_its_index_at_the_end_cannot_come_from_a_pipe_and_says_so(
        tmp_path: Path, faststart: bool) -> None:
    # It was "not an image or video file conveyor can decode", though its path read well.
    from conveyor.apps.faces import ImageReadError

    path = tmp_path / "clip.mp4"
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 128, "yuv420p"
        # Noise: about 60 kB of media, more than FFmpeg reads past when the index is last.
        for frame in np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), np.uint8):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if faststart:  # the index first: a pipe works
        assert len(_frames_through_a_pipe(path)) == 3
    else:
        with pytest.raises(ImageReadError, match=r"its index \(the 'moov' box\) at the end "
                           r"cannot be read from a pipe: give its path"):
            _frames_through_a_pipe(path)


def test_a_rotated_video_is_read_upright(tmp_path: Path) -> None:
    # A phone's portrait video is stored sideways with a display matrix saying "rotate
    # 90"; its frames came out sideways (stills had their EXIF orientation applied).
    from conveyor.apps.faces import iter_frames

    upright = np.zeros((64, 48, 3), np.uint8)
    upright[:16] = 255  # a white band at the top, as displayed
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # 48 high, 64 wide
    path = tmp_path / "plain.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(path.read_bytes())
    matrix = data.find(b"tkhd") + 4 + 40  # the track header's display matrix
    data[matrix:matrix + 36] = np.array([0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000],
                                        ">u4").tobytes()  # what ffmpeg writes for rotate=90
    (tmp_path / "rotated.mp4").write_bytes(bytes(data))
    ((_, frame),) = list(iter_frames(tmp_path / "rotated.mp4"))
    assert frame.shape == (64, 48, 3)
    assert frame[:12].mean() > 200 and frame[20:].mean() < 50


def test_a_file_name_that_is_not_utf8_is_written_escaped(tmp_path: Path) -> None:
    # With a strict UTF-8 stdout the name's lone surrogate raised UnicodeEncodeError, and
    # the files after it went unreported.
    name = os.fsdecode(b"a\xffb.png")
    shutil.copy(ASTRONAUT, tmp_path / name)
    shutil.copy(ASTRONAUT, tmp_path / "z.png")
    done = subprocess.run([sys.executable, "-m", "conveyor", "detect", str(tmp_path)],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 2 and "a\\udcffb.png" in lines[0] and "z.png" in lines[1]


def test_detect_ended_by_sigterm_cleans_up(tmp_path: Path) -> None:
    # Killed by the signal, `detect --landmarks` left its private socket's folder in /tmp.
    import signal
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    names = [tmp_path / f"{i}.png" for i in range(40)]
    for n in names:
        shutil.copy(ASTRONAUT, n)
    proc = subprocess.Popen([sys.executable, "-m", "conveyor", "detect", "--landmarks",
                             *map(str, names)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stdout is not None
    assert proc.stdout.readline()  # working: its device and socket are up
    assert list(tmp.iterdir())
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    time.sleep(0.2)
    assert not list(tmp.iterdir())


def test_a_closed_stderr_or_an_ascii_only_terminal_still_gets_the_results(
        media: Path, tmp_path: Path) -> None:
    # With stderr closed (2>&-), detect printed nothing and exited 1 (AttributeError on
    # sys.stderr, None); under PYTHONIOENCODING=ascii a non-ASCII name raised
    # UnicodeEncodeError (models, demo --out, status, a serve's ready line).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get(
        "PYTHONPATH", "")])}
    closed = subprocess.run(
        [sys.executable, "-m", "conveyor", "detect", "astronaut.png", "--json"], cwd=media,
        env=env, stdout=subprocess.PIPE, text=True, timeout=50,
        preexec_fn=lambda: os.close(2))  # the child's stderr closed, as by 2>&-
    assert closed.returncode == 0
    (record,) = json_lines(closed.stdout)
    assert len(record["faces"]) == 1
    model = tmp_path / "modèle.tflite"
    model.write_bytes(resolve_model("face_detection_short_range").read_bytes())
    ascii_only = subprocess.run([sys.executable, "-m", "conveyor", "models", str(model)],
                                env={**env, "PYTHONIOENCODING": "ascii"}, text=True,
                                capture_output=True, timeout=50)
    assert ascii_only.returncode == 0, ascii_only.stderr
    assert "mod\\xe8le" in ascii_only.stdout and "Traceback" not in ascii_only.stderr
