"""Calibration media as the model's processor takes them, decoded by kept libraries: images by
Pillow, audio by soundfile (WAV, FLAC, OGG, MP3 where libsndfile has it) and resampled by soxr's
band-limited resampler, video by PyAV. A source is a path, the bytes or path of a ``datasets``
column read undecoded, an in-memory array (audio with its rate), or a PIL image. Every error
names ``where`` (file:line, or dataset row and column)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from ..calibration.quantize import CalibrationError

log = logging.getLogger("masquant")

MAX_FRAMES = 64  # frames of one video at most (evenly spread beyond that)


def _file(source: object, kind: str, where: str):
    """A path or a binary buffer for ``source`` (a path, or a ``{"bytes", "path"}`` dict)."""
    if isinstance(source, dict):
        if source.get("bytes"):
            return io.BytesIO(source["bytes"])
        source = source.get("path")
    if isinstance(source, (str, Path)) and str(source):
        if not Path(source).is_file():
            raise CalibrationError(f"{where}: {kind} file {source} does not exist")
        return Path(source)
    raise CalibrationError(f"{where}: cannot read {kind} from a {type(source).__name__}; give a file path")


def image(source: object, where: str):
    """An 8-bit RGB PIL image as a viewer shows it (see ``to_rgb``)."""
    from PIL import Image, ImageOps

    if isinstance(source, np.ndarray):
        try:
            return to_rgb(Image.fromarray(source))
        except (TypeError, ValueError) as err:
            raise CalibrationError(f"{where}: cannot read an image from an array {source.shape} {source.dtype}: "
                                   f"{err}") from None
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    file = _file(source, "image", where)
    try:
        with Image.open(file) as picture:
            return to_rgb(ImageOps.exif_transpose(picture))
    except Exception as err:
        raise CalibrationError(f"{where}: cannot read image {_name(source)}: {err}") from None


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


def audio(source: object, where: str, rate: int) -> np.ndarray:
    """Mono float32 samples at ``rate`` Hz: channels averaged, other rates resampled by soxr (HQ)."""
    if isinstance(source, dict) and source.get("array") is not None:  # an in-memory clip
        pcm, native = np.asarray(source["array"], dtype=np.float32), source.get("sampling_rate")
        if not isinstance(native, (int, np.integer)) or native <= 0:
            raise CalibrationError(f"{where}: an audio array needs its 'sampling_rate' (Hz)")
        pcm = pcm.mean(-1) if pcm.ndim == 2 else pcm
    else:
        pcm, native = _decode_audio(source, where)
    if pcm.ndim != 1 or pcm.size == 0:
        raise CalibrationError(f"{where}: audio {_name(source)} is empty" if pcm.size == 0 else
                               f"{where}: audio arrays must be [samples] or [samples, channels], got {pcm.shape}")
    if not np.isfinite(pcm).all():
        raise CalibrationError(f"{where}: audio {_name(source)} holds NaN or Inf samples")
    if native != rate:
        import soxr

        log.warning("%s: %s is sampled at %d Hz; resampling to %d Hz (soxr, band-limited)", where, _name(source),
                    native, rate)
        pcm = soxr.resample(pcm, native, rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(pcm, dtype=np.float32)


def _decode_audio(source: object, where: str) -> tuple[np.ndarray, int]:
    import soundfile

    file = _file(source, "audio", where)
    try:
        with soundfile.SoundFile(file) as clip:
            # integer PCM read as integers and scaled here, the same for every container (libsndfile's own
            # float conversion differs between WAV and FLAC in the last bits)
            pcm = clip.read(dtype="int32", always_2d=True).astype(np.float64) / 2.0**31 \
                if clip.subtype.startswith("PCM") else clip.read(dtype="float32", always_2d=True)
            native = clip.samplerate
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        hint = ""
        if _name(source).lower().endswith(".mp3") and "MP3" not in soundfile.available_formats():
            hint = (f" (this libsndfile {soundfile.__libsndfile_version__} has no MP3: install soundfile>=0.12, "
                    "whose wheels bring libsndfile 1.1+, or convert the clips to FLAC)")
        raise CalibrationError(f"{where}: cannot read audio {_name(source)}: {err}{hint}") from None
    return pcm.mean(1).astype(np.float32), int(native)


def video(source: object, where: str, fps: float, multiple: int = 2) -> tuple[np.ndarray, float]:
    """RGB frames ``[T, H, W, 3]`` (uint8) sampled at ``fps`` (at most ``MAX_FRAMES``, evenly spread),
    ``T`` a multiple of ``multiple`` (the model's temporal patch; the last frame repeated), and the
    rate the frames stand for."""
    try:
        import av
    except ImportError:
        raise CalibrationError(f"{where}: reading video needs PyAV, which is not installed: pip install av "
                               "(or masquant[video])") from None
    file = _file(source, "video", where)
    try:
        with av.open(str(file) if isinstance(file, Path) else file) as container:
            if not container.streams.video:
                raise CalibrationError(f"{where}: {_name(source)} has no video stream")
            frames, times = [], []
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else len(times) / 25.0)
    except CalibrationError:
        raise
    except Exception as err:  # PyAV's own errors (av.error.*) and corrupt streams
        raise CalibrationError(f"{where}: cannot read video {_name(source)}: {err}") from None
    if not frames:
        raise CalibrationError(f"{where}: video {_name(source)} has no frames")
    duration = times[-1] - times[0]
    count = min(max(int(duration * fps) + 1, 1), MAX_FRAMES)
    targets = times[0] + np.arange(count) * (duration / max(count - 1, 1) if count > 1 else 0.0)
    picks = [int(np.argmin(np.abs(np.asarray(times) - t))) for t in targets]
    picks += [picks[-1]] * (-len(picks) % multiple)
    rate = (len(picks) - 1) / duration if duration > 0 and len(picks) > 1 else fps
    return np.stack([frames[i] for i in picks]), float(rate)


def _name(source: object) -> str:
    if isinstance(source, dict):
        return str(source.get("path") or "<bytes>")
    return str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"
