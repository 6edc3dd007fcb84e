"""``--model`` for the command line: a reference model name, a saved masquant model, or a local
Hugging Face checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from ..refmodels.registry import REFERENCE_MODELS
from .hf import load_hf, processor_of


def load_any(spec: str, sidecar: bool = True, talker: bool = False):
    """``(model, processor, reference)``: ``reference`` names the reference model whose test
    slices evaluate this model (None for other checkpoints). An exported compressed-tensors
    directory loads through transformers, with its modality sidecar unless ``sidecar`` is False.
    A full Qwen2.5-Omni model (a download, or saved with its talker) gives its thinker, which every
    masquant tool runs, or with ``talker`` the whole model."""
    from ..refmodels import registry
    from . import serialization
    from .omni import thinker_of
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
        model, reference = serialization.load(path), serialization.read_meta(path).get("reference")
        return model if talker else thinker_of(model), processor_of(path), reference
    return (*load_hf(path, talker), None)


def full_precision_dir(spec: str) -> tuple[Path, str | None]:
    """``(directory, reference)`` of a full-precision checkpoint to stream: a reference model's
    folder or a local Hugging Face checkpoint directory (not a quantized or exported one)."""
    from ..refmodels import registry
    from . import serialization
    from .omni import is_full_dir
    from .sidecar import is_export

    path = Path(spec)
    if spec in REFERENCE_MODELS and not path.is_dir():
        return registry.model_dir(spec), spec
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r} is neither a reference model ({', '.join(REFERENCE_MODELS)}) "
                                "nor a directory")
    if (path / serialization.QUANT_CONFIG).exists() or is_export(path):
        raise ValueError(f"{path} is already quantized; streaming quantizes a full-precision checkpoint")
    if is_full_dir(path):
        raise ValueError(f"{path} is a full Qwen2.5-Omni checkpoint (thinker, talker, token2wav), which --stream does "
                         "not read; quantize it without --stream (its thinker is quantized, --talker keeps or drops "
                         "the rest)")
    return path, None
