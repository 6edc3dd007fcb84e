"""A full-precision Hugging Face checkpoint directory (a reference model's too) and its processor."""

from __future__ import annotations

from pathlib import Path

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


def load_hf(path: Path):
    """``(model, processor)`` of a Hugging Face checkpoint directory (a reference model's too)."""
    from ..refmodels import registry

    model = registry.load(path)[0] if (path / "masquant_processor.json").exists() else _hf_model(path)
    return model, processor_of(path)


def processor_of(path: Path):
    """The processor saved in a checkpoint directory (None when it has none)."""
    from ..refmodels.processor import RefProcessor

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

    from .pil_processor import fallback

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as err:
        processor = fallback(path, err)  # (a Qwen checkpoint on an install without torchvision)
        if processor is not None:
            return processor
        raise RuntimeError(f"cannot load the processor of {path} with AutoProcessor ({err})") from err
