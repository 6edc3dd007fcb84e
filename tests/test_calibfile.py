"""Calibration JSONL files: samples through the model's own processor, errors with file:line."""

import json
import logging
import wave

import numpy as np
import pytest
from PIL import Image

from masquant import CalibrationError, modality_ids
from masquant.calibfile import read_calibration
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
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "content items must have type text, image or audio"),
])
def test_bad_lines_name_the_file_and_line(media, processor, line, message):
    calib = _write(media / "calib.jsonl", [{"text": "fine"}, line])
    with pytest.raises(CalibrationError, match=rf"calib\.jsonl:2: {message}"):
        read_calibration(calib, processor)


def test_empty_and_missing_files(media, processor):
    with pytest.raises(CalibrationError, match="holds no samples"):
        read_calibration(_write(media / "empty.jsonl", [""]), processor)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_calibration(media / "nope.jsonl", processor)
