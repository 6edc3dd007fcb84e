"""Calibration JSONL files: samples through the model's own processor, errors with file:line."""

import json
import logging
import re
import wave

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from masquant import CalibrationError, modality_ids
from masquant.io.calibfile import read_calibration
from masquant.refmodels.processor import RefProcessor
from masquant.refmodels.registry import model_dir


@pytest.fixture(scope="module")
def processor():
    return RefProcessor.from_pretrained(model_dir("ref-omni"))


def _wav(path, rate=16_000, seconds=0.5, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.repeat(pcm, channels).tobytes())


@pytest.fixture
def media(tmp_path):
    Image.fromarray((np.random.default_rng(0).random((56, 56, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    _wav(tmp_path / "a.wav")
    _wav(tmp_path / "slow.wav", rate=8_000, channels=2)
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    return tmp_path


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.reliability(
    case='JSONL with audio at 8 kHz stereo (another sample rate)',
    expect='channels averaged and resampled to 16 kHz, with a warning naming the file')
def test_both_line_formats_become_model_inputs(media, processor, caplog):
    calib = _write(media / "calib.jsonl", [
        {"text": "What item is this?", "image": "a.png", "answer": "shirt"},
        {"text": "Which word is spoken?", "audio": ["a.wav", "slow.wav"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                   {"type": "audio", "audio": "a.wav"},
                                                   {"type": "text", "text": "Do they match?"}]},
                      {"role": "assistant", "content": "yes"}]},
        "",
        {"text": "Call me Ishmael."},
    ])
    with caplog.at_level(logging.WARNING, logger="masquant"):
        samples = read_calibration(calib, processor)
    assert len(samples) == 4
    assert "8000 Hz" in caplog.text  # resampled, and said so
    from masquant.refmodels import registry

    model, _ = registry.load("ref-omni")
    kinds = [set(modality_ids(model, s["input_ids"]).unique().tolist()) for s in samples]
    assert kinds == [{0, 1}, {0, 2}, {0, 1, 2}, {0}]
    assert samples[0]["pixel_values"].shape[0] == 64 and samples[1]["input_features"].shape[0] == 2


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"txt": "typo"}, r"unknown field\(s\) \['txt'\]"),
    ({"text": ""}, "'text' must be a non-empty string"),
    ({"text": "hi", "image": "missing.png"}, "image file .*missing.png does not exist"),
    ({"text": "hi", "image": "broken.png"}, "cannot read image"),
    ({"text": "hi", "audio": "broken.wav"}, "cannot read audio"),
    ({"text": "hi", "image": 3}, "'image' must be a file path"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "table"}]}]},
     "content items must have type text, image, audio or video"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "a chat item of type video names no video"),
    ({"messages": [{"role": "user", "content": "hi"}], "text": "also"}, "'messages' cannot be combined"),
])
@pytest.mark.reliability(
    case='bad JSONL line (bad JSON, wrong field, missing or corrupt image/audio, chat item without media)',
    expect='CalibrationError `file:line: problem`')
def test_bad_lines_name_the_file_and_line(media, processor, line, message):
    calib = _write(media / "calib.jsonl", [{"text": "fine"}, line])
    with pytest.raises(CalibrationError, match=rf"calib\.jsonl:2: {message}"):
        read_calibration(calib, processor)


@pytest.mark.reliability(
    case='empty or missing calibration file',
    expect='CalibrationError naming the file')
def test_empty_and_missing_files(media, processor):
    with pytest.raises(CalibrationError, match="holds no samples"):
        read_calibration(_write(media / "empty.jsonl", [""]), processor)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_calibration(media / "nope.jsonl", processor)


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=3), max_leaves=6)
_fields = st.sampled_from(["text", "image", "audio", "answer", "messages", "role", "content", "type"])
_lines = st.one_of(
    st.text(max_size=40),  # arbitrary text, mostly not JSON
    _values.map(json.dumps),  # any JSON value
    st.dictionaries(_fields, _values | st.sampled_from(["a.png", "a.wav", "broken.png", "nowhere.wav", "hi"]),
                    max_size=4).map(json.dumps),  # objects with the real field names and odd values
)


@pytest.mark.reliability(case="fuzzed calibration files (hypothesis: random text, JSON and field values)",
                         expect="samples, or CalibrationError `file:line: problem`; never another exception")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_lines, min_size=1, max_size=4))
def test_the_reader_fails_only_with_file_and_line(media, processor, lines):
    path = media / "fuzz.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines) + "\n")
    try:
        samples = read_calibration(path, processor)
    except CalibrationError as err:
        assert re.match(r".*fuzz\.jsonl(:\d+)?: ", str(err)) or "holds no samples" in str(err), str(err)
        return
    assert samples and all("input_ids" in s for s in samples)


def test_images_in_the_formats_people_have_read_as_a_viewer_shows_them(tmp_path):
    """JPEG with a camera rotation, WebP, palette PNG, 16-bit grey PNG and RGBA: 8-bit RGB, rotated,
    grey levels kept (a plain conversion clipped 16-bit grey to white), transparency over white."""
    from PIL import Image

    from masquant.io.media import image as _image

    rng = np.random.default_rng(0)
    wide = Image.fromarray((rng.random((20, 40, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned 90 degrees
    wide.save(tmp_path / "turned.jpg", exif=exif)
    wide.save(tmp_path / "a.webp")
    wide.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "palette.png")
    ramp = (np.linspace(0, 65535, 40 * 20).reshape(20, 40)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    rgba = np.zeros((20, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    images = {p.name: _image(p, "test") for p in tmp_path.iterdir()}
    assert all(im.mode == "RGB" for im in images.values())
    assert images["turned.jpg"].size == (20, 40) and images["a.webp"].size == (40, 20)  # rotated upright
    grey = np.asarray(images["grey16.png"])[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and 100 < np.median(grey) < 155  # the ramp, not clipped to white
    alpha = np.asarray(images["alpha.png"])
    assert (alpha[:, :20] == (255, 0, 0)).all() and (alpha[:, 20:] == 255).all()  # transparent -> white
    assert len(np.unique(np.asarray(images["palette.png"]).reshape(-1, 3), axis=0)) <= 16
