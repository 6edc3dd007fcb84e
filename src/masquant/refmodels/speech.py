"""Spoken words synthesised offline with espeak-ng (Debian ``espeak-ng``).

Words are the digit names and the clothing classes. Speakers are espeak-ng English voices
crossed with voice variants, speed and pitch; the train, calib and test splits use
disjoint sets of variants, so test speakers are never heard in training.
"""

from __future__ import annotations

import itertools
import random
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from .data import DIGIT_WORDS, FASHION_CLASSES, SEED, DataMissingError

WORDS = DIGIT_WORDS + FASHION_CLASSES
VOICES = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = {
    "train": ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "f4", "klatt", "klatt2", "whisper", "croak",
              "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mario", "Michael", "Mike", "Storm", "Tweaky",
              "adam", "anika", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed"),
    "calib": ("m6", "f5", "klatt3", "Alicia", "Hugo", "Marco"),
    "test": ("m7", "klatt4", "Alex", "Andrea", "Diogo", "Henrique", "Nguyen", "RicishayMax"),
}
RATE = 16_000


def synthesize(word: str, voice: str, variant: str, speed: int, pitch: int) -> np.ndarray:
    """Mono float32 waveform at 16 kHz."""
    if shutil.which("espeak-ng") is None:
        raise DataMissingError("espeak-ng not found: run scripts/prepare_data.sh (Debian package espeak-ng)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", f"{voice}+{variant}", "-s", str(speed), "-p", str(pitch), "-w", f.name,
                        word], check=True, capture_output=True)
        with wave.open(f.name) as w:
            rate, frames = w.getframerate(), w.readframes(w.getnframes())
    audio = np.frombuffer(frames, dtype=np.int16).astype(np.float32) / 32768
    return resample(audio, rate, RATE)


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio
    n = round(len(audio) * target / rate)
    return np.interp(np.linspace(0, len(audio) - 1, n), np.arange(len(audio)), audio).astype(np.float32)


def spoken_words(split: str, n: int, seed: int = SEED) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` random clips of the split's speakers, and the index of each word in ``WORDS``."""
    rng = random.Random(f"{seed}-{split}")
    clips, labels = [], []
    for _ in range(n):
        label = rng.randrange(len(WORDS))
        clip = synthesize(WORDS[label], rng.choice(VOICES), rng.choice(VARIANTS[split]),
                          rng.randrange(120, 221), rng.randrange(25, 76))
        clips.append(clip[: 2 * RATE])
        labels.append(label)
    return clips, np.array(labels)


def pack(clips: list[np.ndarray], labels: np.ndarray, prefix: str = "") -> dict[str, np.ndarray]:
    """Ragged clips as int16 PCM concatenated with offsets (arrays for one ``.npz``)."""
    return {f"{prefix}pcm": _pcm16(np.concatenate(clips)),
            f"{prefix}offsets": np.cumsum([0] + [len(c) for c in clips]), f"{prefix}labels": labels}


def unpack(arrays, prefix: str = "") -> tuple[list[np.ndarray], np.ndarray]:
    pcm, off = arrays[f"{prefix}pcm"].astype(np.float32) / 32767, arrays[f"{prefix}offsets"]
    return [pcm[a:b] for a, b in itertools.pairwise(off)], arrays[f"{prefix}labels"]


def _pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.asarray(audio) * 32767).clip(-32768, 32767).astype(np.int16)


def cached(name: str, build, folder: Path | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """``build()``'s ``(clips, labels)`` kept in ``folder/name`` (a temporary folder by default): synthesis is slow."""
    folder = folder or Path(tempfile.gettempdir()) / "masquant-speech"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        np.savez_compressed(path, **pack(*build()))
    return unpack(np.load(path))


def cache(split: str, n: int, folder: Path | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """``spoken_words`` cached on disk."""
    return cached(f"{split}-{n}.npz", lambda: spoken_words(split, n), folder)


def pack_flac(clips: list[np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """Clips as 16-bit FLAC files concatenated with offsets (half the bytes of compressed PCM)."""
    import io

    import soundfile as sf

    files = []
    for clip in clips:
        buffer = io.BytesIO()
        sf.write(buffer, _pcm16(clip), RATE, format="FLAC")
        files.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    return {f"{prefix}flac": np.concatenate(files), f"{prefix}flac_offsets": np.cumsum([0] + [len(f) for f in files])}


def unpack_flac(arrays, prefix: str = "") -> list[np.ndarray]:
    import io

    import soundfile as sf

    data, off = arrays[f"{prefix}flac"], arrays[f"{prefix}flac_offsets"]
    return [sf.read(io.BytesIO(data[a:b].tobytes()), dtype="int16")[0].astype(np.float32) / 32767
            for a, b in itertools.pairwise(off)]
