"""``--model`` for the command line: a reference model name, a saved masquant model, or a local
Hugging Face checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from ..refmodels.registry import REFERENCE_MODELS
from .hf import load_hf, processor_of


def load_any(spec: str, sidecar: bool = True):
    """``(model, processor, reference)``: ``reference`` names the reference model whose test
    slices evaluate this model (None for other checkpoints). An exported compressed-tensors
    directory loads through transformers, with its modality sidecar unless ``sidecar`` is False."""
    from ..refmodels import registry
    from . import serialization
    from .sidecar import is_export, load_export

    path = Path(spec)
    if spec in REFERENCE_MODELS and not path.is_dir():
        model, processor = registry.load(spec)
        return model, processor, spec
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r} is neither a reference model ({', '.join(REFERENCE_MODELS)}) "
                                "nor a directory")
    if is_export(path):
        return load_export(path, sidecar=sidecar)
    if (path / serialization.QUANT_CONFIG).exists():
        return serialization.load(path), processor_of(path), serialization.read_meta(path).get("reference")
    return (*load_hf(path), None)


def full_precision_dir(spec: str) -> tuple[Path, str | None]:
    """``(directory, reference)`` of a full-precision checkpoint to stream: a reference model's
    folder or a local Hugging Face checkpoint directory (not a quantized or exported one)."""
    from ..refmodels import registry
    from . import serialization
    from .sidecar import is_export

    path = Path(spec)
    if spec in REFERENCE_MODELS and not path.is_dir():
        return registry.model_dir(spec), spec
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r} is neither a reference model ({', '.join(REFERENCE_MODELS)}) "
                                "nor a directory")
    if (path / serialization.QUANT_CONFIG).exists() or is_export(path):
        raise ValueError(f"{path} is already quantized; streaming quantizes a full-precision checkpoint")
    return path, None
