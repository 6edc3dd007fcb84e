"""The shipped reference models: where they live, how to load them, their data slices.

Each model directory holds the weights and processor files, ``training.json`` (how it was
trained and what it scored) and ``slices.npz`` / ``slices.json``: fixed calibration and test
examples cut from the disjoint ``calib`` and ``test`` splits, so that evaluation and the
default calibration set need no data installation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WEIGHTS = Path(__file__).parent / "weights"
REFERENCE_MODELS = ("ref-vl",)
SLICE_SIZES = {"calib": {"item": 96, "digit": 32, "prose": 32}, "test": {"item": 300, "digit": 300, "prose": 100}}


def model_dir(name: str) -> Path:
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(REFERENCE_MODELS)}")
    path = WEIGHTS / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no weights; regenerate with python -m masquant.refmodels.train_vl")
    return path


def load(name: str, dtype: torch.dtype = torch.float32):
    """``(model, processor)`` of a reference model, in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .processor import RefProcessor

    path = model_dir(name)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    return model, RefProcessor.from_pretrained(path)


def export_slices(out: Path) -> None:
    """Cut the calibration and test slices from the installed data into ``out``."""
    from . import data

    arrays, texts = {}, {}
    for split, sizes in SLICE_SIZES.items():
        for s in data.image_sets(split):
            order = np.random.default_rng(data.SEED + 1).permutation(len(s.labels))[: sizes[s.name]]
            arrays[f"{split}_{s.name}_images"] = s.images[order]
            arrays[f"{split}_{s.name}_labels"] = s.labels[order]
        texts[f"{split}_prose"] = data.moby_dick(split)[: sizes["prose"]]
    np.savez_compressed(out / "slices.npz", **arrays)
    (out / "slices.json").write_text(json.dumps(texts, indent=0))


def slices(name: str, split: str) -> dict:
    """``{"item": (images, labels), "digit": (...), "prose": [paragraphs]}`` of one split."""
    path = model_dir(name)
    arrays = np.load(path / "slices.npz")
    texts = json.loads((path / "slices.json").read_text())
    out: dict = {task: (arrays[f"{split}_{task}_images"], arrays[f"{split}_{task}_labels"])
                 for task in ("item", "digit")}
    out["prose"] = texts[f"{split}_prose"]
    return out
