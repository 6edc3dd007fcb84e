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
SLICE_SIZES = {"calib": {"item": 96, "digit": 32, "prose": 32, "word": 64, "sentence": 48, "read": 48, "sign": 32},
               "test": {"item": 300, "digit": 300, "prose": 100, "word": 300, "sentence": 150, "read": 200,
                        "sign": 150}}


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
    from . import data, reading, sentences

    arrays, texts = {}, {}
    if family == "omni":
        speech_arrays = {}
        for split, sizes in SLICE_SIZES.items():
            speech_arrays.update(speech.pack(*speech.spoken_words(split, sizes["word"]), prefix=f"{split}_"))
            clips, texts[f"{split}_sentence"] = sentences.spoken_sentences(split, sizes["sentence"])
            speech_arrays.update(speech.pack_flac(clips, prefix=f"{split}_sentence_"))
        np.savez_compressed(out / "speech.npz", **speech_arrays)
    else:
        for split, sizes in SLICE_SIZES.items():
            arrays[f"{split}_read_images"], texts[f"{split}_read"] = reading.reading_set(split, sizes["read"])
            arrays[f"{split}_sign_images"], colours, answers = reading.sign_set(split, sizes["sign"])
            texts[f"{split}_sign"] = [list(pair) for pair in zip(colours, answers, strict=True)]
    for split, sizes in SLICE_SIZES.items():
        for s in data.image_sets(split):
            order = np.random.default_rng(data.SEED + 1).permutation(len(s.labels))[: sizes[s.name]]
            arrays[f"{split}_{s.name}_images"] = s.images[order]
            arrays[f"{split}_{s.name}_labels"] = s.labels[order]
        texts[f"{split}_prose"] = data.moby_dick(split)[: sizes["prose"]]
    np.savez_compressed(out / "slices.npz", **arrays)
    (out / "slices.json").write_text(json.dumps(texts, indent=0))


def slices(name: str | Path, split: str) -> dict:
    """``{"item": (images, labels), "digit": (...), "prose": [paragraphs]}``, with ``"read": (strips, texts)``
    and ``"sign": (scenes, [(colour, word)])`` for ref-vl, ``"word": (clips, labels)`` and ``"sentence": (clips,
    transcripts)`` for ref-omni (the generative tasks only in models trained with them)."""
    path = model_dir(name)
    arrays = np.load(path / "slices.npz")
    texts = json.loads((path / "slices.json").read_text())
    out: dict = {task: (arrays[f"{split}_{task}_images"], arrays[f"{split}_{task}_labels"])
                 for task in ("item", "digit")}
    out["prose"] = texts[f"{split}_prose"]
    for task in ("read", "sign"):
        if f"{split}_{task}" in texts:
            out[task] = (arrays[f"{split}_{task}_images"], texts[f"{split}_{task}"])
    if has_audio(path):
        clips = np.load(path / "speech.npz")
        out["word"] = speech.unpack(clips, prefix=f"{split}_")
        if f"{split}_sentence" in texts:
            out["sentence"] = (speech.unpack_flac(clips, prefix=f"{split}_sentence_"), texts[f"{split}_sentence"])
    return out
