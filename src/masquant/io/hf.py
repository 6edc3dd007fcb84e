"""A full-precision Hugging Face checkpoint directory (a reference model's too) and its processor."""

from __future__ import annotations

import logging
from pathlib import Path

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


def load_hf(path: Path, talker: bool = False):
    """``(model, processor)`` of a Hugging Face checkpoint directory (a reference model's too). A full
    Qwen2.5-Omni checkpoint gives its thinker, or with ``talker`` the whole model."""
    from ..refmodels import registry
    from . import omni

    if (path / "masquant_processor.json").exists():
        model = registry.load(path)[0]
    elif omni.is_full_dir(path):
        model = _full_omni(path, talker)
    else:
        model = _hf_model(path)
    return model, processor_of(path)


def processor_of(path: Path):
    """The processor saved in a checkpoint directory (None when it has none)."""
    from ..refmodels.processor import RefProcessor

    if (path / "masquant_processor.json").exists():
        return RefProcessor.from_pretrained(path)
    if any((path / f).exists() for f in PROCESSOR_FILES):
        return _hf_processor(path)
    return None  # a model saved without its processor


def pretrained(cls, path: Path, base: bool = False, **kwargs):
    """``cls.from_pretrained(path)`` in eval mode, refused when the files do not hold every weight
    (transformers would start those from random values, and masquant would quantize them). ``base``:
    PreTrainedModel's own loader, for classes whose override cannot report what it loaded."""
    from transformers import PreTrainedModel

    load = PreTrainedModel.from_pretrained.__func__ if base else cls.from_pretrained.__func__  # (classmethods)
    model, info = load(cls, path, output_loading_info=True, **kwargs)  # (tensors of another shape: it raises)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"the weights in {path} do not fit {cls.__name__}: {len(missing)} missing (e.g. "
                         f"{', '.join(missing[:3])}). An incomplete download (check the shards that "
                         "model.safetensors.index.json names) or a checkpoint of another layout or transformers "
                         "release")
    return model.eval()


def _full_omni(path: Path, talker: bool):
    """A full-precision Qwen2.5-Omni download: the whole model, or (``talker`` False) its thinker alone,
    without reading the talker's and token2wav's tensors."""
    import transformers

    from . import omni

    config = transformers.AutoConfig.from_pretrained(path)
    if not talker:
        # (transformers' load report would list every talker and token2wav tensor as unexpected)
        report = logging.getLogger("transformers.modeling_utils")
        level = report.level
        report.setLevel(logging.ERROR)
        try:
            return pretrained(transformers.Qwen2_5OmniThinkerForConditionalGeneration, path,
                              config=config.thinker_config)
        finally:
            report.setLevel(level)
    if not getattr(config, "enable_audio_output", True):
        raise ValueError(f"{path}/config.json has enable_audio_output false: the checkpoint has no talker to keep; "
                         "use --talker drop")
    if not (path / omni.SPEAKERS).is_file():
        raise FileNotFoundError(f"{path} has no {omni.SPEAKERS} (the talker's voices, part of every Qwen2.5-Omni "
                                "download): copy it there from the download, or drop the talker with --talker drop")
    cls = getattr(transformers, omni.FULL_CLASS)
    model = pretrained(cls, path, base=True)  # (the class's own from_pretrained cannot report what it loaded)
    model.load_speakers(str(path / omni.SPEAKERS))
    return model


def _hf_model(path: Path):
    from .serialization import model_class

    cls, _ = model_class(path)
    return pretrained(cls, path)


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
