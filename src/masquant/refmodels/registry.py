"""The shipped reference models: where they live, how to load them, their data slices.

Each model directory holds the weights and processor files, ``training.json`` (how it was
trained and what it scored) and ``slices.npz`` / ``slices.json`` (+ ``speech.npz`` for the
omni model): fixed calibration and test examples cut from the disjoint ``calib`` and
``test`` splits, so that evaluation and the default calibration set need no data
installation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import speech

WEIGHTS = Path(__file__).parent / "weights"
REFERENCE_MODELS = ("ref-vl", "ref-omni")
SLICE_SIZES = {"calib": {"item": 96, "digit": 32, "prose": 32, "word": 64},
               "test": {"item": 300, "digit": 300, "prose": 100, "word": 300}}


def model_dir(name: str | Path) -> Path:
    """The folder of a shipped reference model (by name), or a folder written by the training script."""
    if Path(name).is_dir():
        return Path(name)
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(REFERENCE_MODELS)}")
    path = WEIGHTS / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no weights; regenerate them with "
                                f"python -m masquant.refmodels.train --model {name}")
    return path


def load(name: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, processor)`` of a reference model, in eval mode."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    from .processor import RefProcessor

    path = model_dir(name)
    omni = AutoConfig.from_pretrained(path).model_type == "qwen2_5_omni_thinker"
    cls = Qwen2_5OmniThinkerForConditionalGeneration if omni else Qwen2_5_VLForConditionalGeneration
    return cls.from_pretrained(path, dtype=dtype).eval(), RefProcessor.from_pretrained(path)


def has_audio(name: str | Path) -> bool:
    return (model_dir(name) / "speech.npz").exists()


def export_slices(out: Path, family: str = "vl") -> None:
    """Cut the calibration and test slices from the installed data into ``out``."""
    from . import data

    if family == "omni":
        speech_arrays = {}
        for split, sizes in SLICE_SIZES.items():
            speech_arrays.update(speech.pack(*speech.spoken_words(split, sizes["word"]), prefix=f"{split}_"))
        np.savez_compressed(out / "speech.npz", **speech_arrays)
    arrays, texts = {}, {}
    for split, sizes in SLICE_SIZES.items():
        for s in data.image_sets(split):
            order = np.random.default_rng(data.SEED + 1).permutation(len(s.labels))[: sizes[s.name]]
            arrays[f"{split}_{s.name}_images"] = s.images[order]
            arrays[f"{split}_{s.name}_labels"] = s.labels[order]
        texts[f"{split}_prose"] = data.moby_dick(split)[: sizes["prose"]]
    np.savez_compressed(out / "slices.npz", **arrays)
    (out / "slices.json").write_text(json.dumps(texts, indent=0))


def slices(name: str | Path, split: str) -> dict:
    """``{"item": (images, labels), "digit": (...), "prose": [paragraphs], "word": (clips, labels)}``."""
    path = model_dir(name)
    arrays = np.load(path / "slices.npz")
    texts = json.loads((path / "slices.json").read_text())
    out: dict = {task: (arrays[f"{split}_{task}_images"], arrays[f"{split}_{task}_labels"])
                 for task in ("item", "digit")}
    out["prose"] = texts[f"{split}_prose"]
    if has_audio(path):
        out["word"] = speech.unpack(np.load(path / "speech.npz"), prefix=f"{split}_")
    return out
