"""``--model`` for the command line: a reference model name, a saved masquant model, or a local
Hugging Face checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from .refmodels.registry import REFERENCE_MODELS

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


def load_any(spec: str):
    """``(model, processor, reference)``: ``reference`` names the reference model whose test
    slices evaluate this model (None for other checkpoints)."""
    from . import serialization
    from .refmodels import registry
    from .refmodels.processor import RefProcessor

    path = Path(spec)
    if spec in REFERENCE_MODELS and not path.is_dir():
        model, processor = registry.load(spec)
        return model, processor, spec
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec!r} is neither a reference model ({', '.join(REFERENCE_MODELS)}) "
                                "nor a directory")
    reference = None
    if (path / serialization.QUANT_CONFIG).exists():
        model = serialization.load(path)
        reference = serialization.read_meta(path).get("reference")
    elif (path / "masquant_processor.json").exists():
        model, _ = registry.load(path)
    else:
        model = _hf_model(path)
    if (path / "masquant_processor.json").exists():
        processor = RefProcessor.from_pretrained(path)
    elif any((path / f).exists() for f in PROCESSOR_FILES):
        processor = _hf_processor(path)
    else:
        processor = None  # a model saved without its processor
    return model, processor, reference


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
