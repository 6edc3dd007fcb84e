"""Text in images for ref-vl's reading tasks, rendered with the fonts Debian ships.

* ``read``: a word or a two-word phrase on a 168 x 28 strip, left-aligned (several fonts, sizes 16-21 px,
  colours, a slight rotation, blur and noise); the model writes the text.
* ``sign``: a 168 x 42 scene with two coloured signs, each with a word, on a cluttered background; the
  question names a sign's colour ("What is written on the red sign?").

Words are the ``VOCABULARY`` most frequent training-chapter words with 2-9 letters; phrases are adjacent
word pairs of the split's clauses. Splits differ in their random renderings (and phrases in their clauses),
so a test image was never seen in training.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np

from . import data, sentences

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation2",
             "/usr/share/fonts/truetype/freefont")
STRIP, SCENE = (168, 28), (168, 42)  # (width, height): multiples of the 14-pixel merged patch
VOCABULARY = 300  # the most frequent training-chapter words the strips and signs show
SIGN_COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (30, 150, 60), "yellow": (230, 200, 40),
                "white": (240, 240, 240), "black": (25, 25, 25)}


@functools.cache
def fonts() -> tuple[str, ...]:
    """The TrueType fonts found (DejaVu, Liberation, FreeFont), math and extra-light faces left out."""
    found = sorted(str(p) for d in FONT_DIRS for p in Path(d).glob("*.ttf")
                   if "Math" not in p.name and "ExtraLight" not in p.name)
    if not found:
        raise data.DataMissingError("no fonts found: run scripts/prepare_data.sh (Debian fonts-dejavu-core, "
                                    "fonts-dejavu-extra, fonts-liberation2, fonts-freefont-ttf)")
    return tuple(found)


@functools.cache
def words() -> tuple[str, ...]:
    return tuple(sorted(w for w in sentences.vocabulary(VOCABULARY) if 2 <= len(w) <= 9))


def phrases(split: str) -> list[str]:
    """Adjacent word pairs of the split's clauses, at most 14 letters in all."""
    pairs = {" ".join(c.split()[i: i + 2]) for c in sentences.clauses(split, VOCABULARY)
             for i in range(len(c.split()) - 1)}
    return sorted(p for p in pairs if len(p) <= 14)


def _contrast(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Background and ink colours at least 120 apart in brightness."""
    while True:
        bg, ink = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
        if abs(sum(bg) - sum(ink)) / 3 >= 120:
            return bg, ink


@functools.lru_cache(maxsize=1024)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _fit(draw, text: str, rng: random.Random, width: int, height: int, low: int, high: int):
    """A random font at the largest random size (from ``[low, high]``) whose text fits ``width x height``."""
    path = rng.choice(fonts())
    for size in range(rng.randrange(low, high + 1), 6, -1):
        font = _font(path, size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= width and bottom - top <= height:
            return font, (left, top, right, bottom)
    return font, (left, top, right, bottom)


def _finish(image, rng: random.Random, angle: float) -> np.ndarray:
    """Slight rotation, blur and noise: the distortions of a photographed text."""
    from PIL import ImageFilter

    image = image.rotate(rng.uniform(-angle, angle), resample=3, fillcolor=image.getpixel((0, 0)))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.7)))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 8), pixels.shape)
    return pixels.clip(0, 255).astype(np.uint8)


def render_strip(text: str, rng: random.Random) -> np.ndarray:
    """``text`` on a ``STRIP`` image, ``[28, 168, 3]`` uint8."""
    from PIL import Image, ImageDraw

    (width, height), (bg, ink) = STRIP, _contrast(rng)
    image = Image.new("RGB", STRIP, bg)
    draw = ImageDraw.Draw(image)
    font, (left, top, _, bottom) = _fit(draw, text, rng, width - 10, height - 4, 16, 21)
    x = rng.randrange(2, 9) - left  # left-aligned, a few pixels of jitter: a small ViT learns to read at a fixed
    y = (height - (bottom - top)) // 2 - top + rng.randrange(-1, 2)  # place, not anywhere along the strip
    draw.text((x, y), text, fill=ink, font=font)
    return _finish(image, rng, angle=2.5)


def render_scene(first: str, second: str, colours: tuple[str, str], rng: random.Random) -> np.ndarray:
    """Two signs side by side (``colours``, left then right) with a word each, over random shapes."""
    from PIL import Image, ImageDraw

    width, height = SCENE
    image = Image.new("RGB", SCENE, tuple(rng.randrange(90, 170) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(3, 8)):  # clutter
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x, y, x + rng.randrange(4, 20), y + rng.randrange(4, 20)),
                     fill=tuple(rng.randrange(60, 200) for _ in range(3)))
    half = width // 2
    for i, (word, colour) in enumerate(zip((first, second), colours, strict=True)):
        plate = SIGN_COLOURS[colour]
        ink = (20, 20, 20) if sum(plate) > 400 else (245, 245, 245)
        x0, y0 = i * half + rng.randrange(1, 4), rng.randrange(2, 8)
        x1, y1 = (i + 1) * half - rng.randrange(1, 4), height - rng.randrange(2, 8)
        draw.rectangle((x0, y0, x1, y1), fill=plate, outline=(10, 10, 10))
        font, (left, top, right, bottom) = _fit(draw, word, rng, x1 - x0 - 4, y1 - y0 - 2, 11, 16)
        draw.text(((x0 + x1 - (right - left)) // 2 - left, (y0 + y1 - (bottom - top)) // 2 - top), word, fill=ink,
                  font=font)
    return _finish(image, rng, angle=1.5)


def strip_example(rng: random.Random, pairs: list[str]) -> tuple[np.ndarray, str]:
    """A strip and its text: a word, or one time in three a phrase of ``pairs``."""
    text = rng.choice(pairs) if rng.random() < 1 / 3 else rng.choice(words())
    return render_strip(text, rng), text


def sign_example(rng: random.Random) -> tuple[np.ndarray, str, str]:
    """A two-sign scene, the colour of the sign asked about and its word."""
    first, second = rng.sample([w for w in words() if len(w) <= 7], 2)
    colours = tuple(rng.sample(sorted(SIGN_COLOURS), 2))
    pick = rng.randrange(2)
    return render_scene(first, second, colours, rng), colours[pick], (first, second)[pick]


def reading_set(split: str, n: int, seed: int = data.SEED) -> tuple[np.ndarray, list[str]]:
    """``n`` strips (``[n, 28, 168, 3]``) of the split and their texts."""
    rng, pairs = random.Random(f"{seed}-read-{split}"), phrases(split)
    images, texts = zip(*(strip_example(rng, pairs) for _ in range(n)), strict=True)
    return np.stack(images), list(texts)


def sign_set(split: str, n: int, seed: int = data.SEED) -> tuple[np.ndarray, list[str], list[str]]:
    """``n`` scenes (``[n, 42, 168, 3]``), the colour each question asks about, and the answer word."""
    rng = random.Random(f"{seed}-sign-{split}")
    images, asked, answers = zip(*(sign_example(rng) for _ in range(n)), strict=True)
    return np.stack(images), list(asked), list(answers)
