"""``--model`` for the command line: a reference model name, a saved masquant model, or a local
Hugging Face checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from .refmodels.registry import REFERENCE_MODELS

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


def load_any(spec: str, sidecar: bool = True):
    """``(model, processor, reference)``: ``reference`` names the reference model whose test
    slices evaluate this model (None for other checkpoints). An exported compressed-tensors
    directory loads through transformers, with its modality sidecar unless ``sidecar`` is False."""
    from . import serialization
    from .refmodels import registry
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
    from . import serialization
    from .refmodels import registry
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


def load_hf(path: Path):
    """``(model, processor)`` of a Hugging Face checkpoint directory (a reference model's too)."""
    from .refmodels import registry

    model = registry.load(path)[0] if (path / "masquant_processor.json").exists() else _hf_model(path)
    return model, processor_of(path)


def processor_of(path: Path):
    """The processor saved in a checkpoint directory (None when it has none)."""
    from .refmodels.processor import RefProcessor

    if (path / "masquant_processor.json").exists():
        return RefProcessor.from_pretrained(path)
    if any((path / f).exists() for f in PROCESSOR_FILES):
        return _hf_processor(path)
    return None  # a model saved without its processor


def _hf_model(path: Path):
    from .serialization import model_class

    cls, _ = model_class(path)
    return cls.from_pretrained(path).eval()


def _hf_processor(path: Path):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as err:
        raise RuntimeError(f"cannot load the processor of {path} with AutoProcessor ({err}); the Qwen2.5-VL / "
                           "Omni processors need torchvision installed") from err
