"""Calibration files: JSONL, one sample per line, turned into model inputs by the model's own
processor and chat template. Each line is either

* ``{"text": "...", "image": "a.png" | [...], "audio": "a.wav" | [...], "answer": "..."}``: media
  before the text in the user turn; ``answer`` (optional) is the assistant turn, MBQ's answer tokens; or
* ``{"messages": [...]}`` in the Hugging Face chat format, with ``{"type": "image", "image": "a.png"}``
  / ``{"type": "audio", "audio": "a.wav"}`` content items.

Paths are relative to the JSONL file. Images: any format Pillow opens, camera rotation (EXIF)
applied, 16-bit grey scaled to 8 bits, transparency over white. Audio is PCM WAV (8/16/32-bit,
channels averaged), resampled linearly to the processor's rate with a warning. Every error names
the file and line.
"""

from __future__ import annotations

import json
import logging
import wave
from pathlib import Path

import numpy as np

from ..calibration.quantize import CalibrationError

log = logging.getLogger("masquant")

FIELDS = {"text", "image", "audio", "answer", "messages"}


def read_calibration(path: str | Path, processor, sample_rate: int = 16_000) -> list[dict]:
    """Model inputs (one dict per line) from a calibration JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    samples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            messages, images, audio = _parse(record, where, path.parent)
            media = {"images": [_image(p, where) for p in images]} if images else {}
            if audio:
                media["audio"] = [_audio(p, where, sample_rate) for p in audio]
            try:
                text = processor.apply_chat_template(messages)
                sample = dict(processor(text=[text], return_tensors="pt", **media))
            except Exception as err:
                raise CalibrationError(f"{where}: the processor rejected this sample: {err}") from err
            samples.append(sample)
    if not samples:
        raise CalibrationError(f"calibration file {path} holds no samples (one JSON object per line)")
    return samples


def _parse(record: object, where: str, root: Path) -> tuple[list[dict], list[Path], list[Path]]:
    if not isinstance(record, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - FIELDS)
    if unknown:
        raise CalibrationError(f"{where}: unknown field(s) {unknown}; use text, image, audio, answer or messages")
    if "messages" in record:
        if set(record) - {"messages"}:
            raise CalibrationError(f"{where}: 'messages' cannot be combined with text/image/audio/answer")
        return _chat(record["messages"], where, root)
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CalibrationError(f"{where}: 'text' must be a non-empty string")
    images, audio = (_paths(record.get(k), k, where, root) for k in ("image", "audio"))
    content = [{"type": "image"} for _ in images] + [{"type": "audio"} for _ in audio]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]
    if "answer" in record:
        if not isinstance(record["answer"], str):
            raise CalibrationError(f"{where}: 'answer' must be a string")
        messages.append({"role": "assistant", "content": record["answer"]})
    return messages, images, audio


def _chat(messages: object, where: str, root: Path) -> tuple[list[dict], list[Path], list[Path]]:
    if not isinstance(messages, list) or not messages:
        raise CalibrationError(f"{where}: 'messages' must be a non-empty list of chat turns")
    images, audio, out = [], [], []
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise CalibrationError(f"{where}: every chat turn needs 'role' and 'content'")
        content = turn["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind in ("image", "audio"):
                    (images if kind == "image" else audio).extend(_paths(item.get(kind), kind, where, root))
                    items.append({"type": kind})
                elif kind == "text":
                    items.append({"type": "text", "text": item.get("text", "")})
                else:
                    raise CalibrationError(f"{where}: content items must have type text, image or audio")
            content = items
        out.append({"role": turn["role"], "content": content})
    return out, images, audio


def _paths(value: object, kind: str, where: str, root: Path) -> list[Path]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise CalibrationError(f"{where}: '{kind}' must be a file path or a list of paths")
    paths = [root / v for v in values]
    for p in paths:
        if not p.is_file():
            raise CalibrationError(f"{where}: {kind} file {p} does not exist")
    return paths


def _image(path: Path, where: str):
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except Exception as err:
        raise CalibrationError(f"{where}: cannot read image {path}: {err}") from None


def to_rgb(image):
    """An 8-bit RGB image as a viewer shows it: 16- and 32-bit grey scaled to 8 bits (a plain
    conversion clips them to white), transparency over white, palettes expanded."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        grey = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" and grey.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _audio(path: Path, where: str, sample_rate: int) -> np.ndarray:
    try:
        with wave.open(str(path), "rb") as clip:
            width, channels, rate = clip.getsampwidth(), clip.getnchannels(), clip.getframerate()
            frames = clip.readframes(clip.getnframes())
    except (wave.Error, EOFError, OSError) as err:
        raise CalibrationError(f"{where}: cannot read audio {path} as WAV: {err}") from None
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes:
        raise CalibrationError(f"{where}: {path} has {8 * width}-bit samples; use 8, 16 or 32-bit PCM WAV")
    pcm = np.frombuffer(frames, dtype=dtypes[width]).astype(np.float32)
    if width == 1:
        pcm -= 128.0
    pcm /= float(2 ** (8 * width - 1))
    pcm = pcm.reshape(-1, channels).mean(1) if channels > 1 else pcm
    if pcm.size == 0:
        raise CalibrationError(f"{where}: audio {path} is empty")
    if rate != sample_rate:
        log.warning("%s: %s is sampled at %d Hz; resampling linearly to %d Hz", where, path.name, rate, sample_rate)
        n = max(round(pcm.size * sample_rate / rate), 1)
        pcm = np.interp(np.linspace(0, pcm.size - 1, n), np.arange(pcm.size), pcm).astype(np.float32)
    return pcm
